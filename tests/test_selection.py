"""Honest model selection: what chose a hyper-parameter (C, the kept epoch, a sweep's best run) is
never the number reported as held out, and the output, the run record, the report and ``--json``
say which split is which; metrics are scikit-learn's own."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import featcache
import featcache.report
from featcache.cli import main
from featcache.metrics import compute_metrics
from featcache.runs import RunRecord
from featcache.sweep import sweep

from .helpers import TINY, make_folder

BIASED = "val numbers are selection-biased: the kept epoch was chosen on val loss"


def _store(root, splits):
    folder = make_folder(root / "d", splits=splits)
    url = str(root / "s.zarr")
    featcache.extract(backbone=TINY, data=str(folder), store=url, weights="none", workers=0)
    return url


@pytest.fixture(scope="module")
def val_only(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("val_only"), (("train", 8), ("val", 4)))


@pytest.fixture(scope="module")
def with_test(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("with_test"), (("train", 8), ("val", 4), ("test", 4)))


def test_a_kept_epoch_chosen_on_val_is_said_and_recorded_as_biased(val_only, tmp_path):
    r = CliRunner().invoke(main, ["fit", "--store", val_only, "--head", "linear", "--epochs", "3", "--no-plots",
                                  "--runs", str(tmp_path / "runs"), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    notes = [line for line in r.output.splitlines() if line.startswith("note: ")]
    assert any(line.startswith(f"note: {BIASED}") for line in notes), r.output
    doc = json.loads(r.output[r.output.index("{"):])
    want = {"chosen": [{"what": "epoch", "on": "val loss"}], "biased": ["val"], "score": None}
    assert doc["selection"] == want and any(n.startswith(BIASED) for n in doc["notes"])
    run = doc["run"]
    assert json.loads(Path(run, "config.json").read_text())["selection"] == want
    assert RunRecord.read(run).selection == want
    res = featcache.fit(head="linear", store=val_only, epochs=3, plots=False, runs=str(tmp_path / "runs"))
    assert "val top-1" in res.summary() and "(selection-biased: chose the kept epoch)" in res.summary()


def test_with_a_test_split_the_held_out_score_is_test_and_nothing_warns(with_test, tmp_path):
    res = featcache.fit(head="linear", store=with_test, epochs=3, plots=False, runs=str(tmp_path / "runs"))
    assert res.selection == {"chosen": [{"what": "epoch", "on": "val loss"}], "biased": ["val"], "score": "test"}
    assert not any(n.startswith("val numbers") for n in res.notes)
    line = res.summary()
    assert "val top-1" in line and "(selection-biased" in line and "test top-1" in line and "(held out)" in line
    pytest.importorskip("matplotlib")
    page = featcache.report.write_report(res.run_dir).read_text()
    assert "model selection: epoch chosen on val loss; held-out score: test; val selection-biased" in page


def test_a_fixed_C_chooses_nothing(val_only, tmp_path):
    res = featcache.fit(head="logreg", store=val_only, C=1.0, plots=False, runs=str(tmp_path / "runs"))
    assert res.selection == {"chosen": [], "biased": [], "score": "val"} and res.notes == []


def test_a_sweep_picks_on_val_and_reports_the_best_runs_test(with_test, val_only, tmp_path):
    base = featcache.FitConfig(store=with_test, head="linear", epochs=2, plots=False, out=str(tmp_path / "a"))
    res = sweep(base, {"lr": [1e-3, 1e-2]})
    best = res.rows[0]
    assert res.selection == {"chosen": [{"what": "best run", "on": "val top-1 (then val log loss)"}],
                             "biased": ["val"], "score": "test"}
    assert f"held-out test top-1 {best['test_top1']:.4f}" in res.summary() and "selection-biased" in res.summary()
    assert json.loads((res.folder / "sweep.json").read_text())["selection"] == res.selection
    alone = sweep(featcache.FitConfig(store=val_only, head="linear", epochs=2, plots=False,
                                                out=str(tmp_path / "b")), {"lr": [1e-3, 1e-2]})
    assert alone.selection["score"] is None
    assert any(f"the best run {alone.rows[0]['run']} was chosen on val top-1" in n for n in alone.notes)
    assert sum("selection-biased" in n for n in alone.notes) == 1  # said once for the sweep, not once per run


def test_metrics_are_scikit_learns_own():
    from sklearn.metrics import (
        balanced_accuracy_score,
        classification_report,
        f1_score,
        precision_recall_fscore_support,
    )

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 50)  # class 3 has no image; some are predicted as it
    proba = rng.dirichlet(np.ones(4), 50)
    proba[np.arange(50), y] += rng.random(50)
    proba /= proba.sum(1, keepdims=True)
    pred = proba.argmax(1)
    m = compute_metrics(proba, y, ["a", "b", "c", "d"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m["balanced_accuracy"] == balanced_accuracy_score(y, pred)
        assert m["macro"]["f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
        report = classification_report(y, pred, output_dict=True, zero_division=0)
        p, _r, f, s = precision_recall_fscore_support(y, pred, labels=[0, 1, 2, 3], zero_division=0)
    assert m["weighted"] == pytest.approx({"precision": report["weighted avg"]["precision"],
                                           "recall": report["weighted avg"]["recall"],
                                           "f1": report["weighted avg"]["f1-score"]})
    assert m["per_class"]["support"] == s.tolist() == [int((y == k).sum()) for k in range(4)]
    assert m["per_class"]["precision"][:3] == pytest.approx(p[:3].tolist())
    assert m["per_class"]["recall"][3] is None  # no image of class d: its recall is undefined, not 0
    assert m["per_class"]["f1"][:3] == pytest.approx(f[:3].tolist())
