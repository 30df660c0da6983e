"""Sweeps in one process (comma lists in ``featcache fit``) and the ``featcache runs`` table."""

from __future__ import annotations

import csv
import json
import sys

import pytest
from click.testing import CliRunner

import featcache
from featcache.cli import main
from featcache.config import FitConfig
from featcache.runlist import list_runs
from featcache.runs import RunRecord
from featcache.sweep import combinations, sweep

from .helpers import TINY, make_folder


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    folder = make_folder(root / "data", classes={"a": (200, 30, 30), "b": (200, 30, 30), "c": (30, 30, 200)})
    url = str(root / "s.zarr")
    featcache.extract(backbone=TINY, data=str(folder), store=url, weights="none", workers=0)
    return url


def test_fit_and_sweep_resolve_each_head_name_once(store, tmp_path, monkeypatch):
    """From ``fit`` or ``sweep`` down to the estimator, a --head name becomes its class once."""
    import featcache.heads

    calls = []
    real = featcache.heads.head_class

    def counting(name):
        calls.append(name)
        return real(name)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("featcache") and getattr(module, "head_class", None) is real:
            monkeypatch.setattr(module, "head_class", counting)
    featcache.fit(head="mlp", store=store, epochs=1, plots=False, runs=str(tmp_path / "one"))
    assert calls == ["mlp"]
    calls.clear()
    sweep(FitConfig(store=store, epochs=1, plots=False, runs=str(tmp_path / "many")),
          {"head": ["mlp", "logreg", "linear"], "lr": [1e-3, 1e-2]})
    assert sorted(calls) == ["linear", "logreg", "mlp"]


def test_combinations_vary_each_head_only_in_what_it_takes():
    base = FitConfig(store="s.zarr", hidden=64)
    configs = combinations(base, {"head": ["logreg", "mlp"], "lr": [1e-3, 3e-3], "hidden": [64, 256]}, {"hidden"})
    assert [(c.head, c.lr, c.hidden) for c in configs] == [
        ("logreg", 1e-3, 256),  # mlp's options stay at their defaults in logreg's run
        ("mlp", 1e-3, 64), ("mlp", 1e-3, 256), ("mlp", 3e-3, 64), ("mlp", 3e-3, 256)]
    with pytest.raises(featcache.FeatcacheError, match="--hidden is not an option of --head logreg,svm"):
        combinations(base, {"head": ["logreg", "svm"], "C": [0.1, 1.0]}, {"hidden"})


def test_a_sweep_fits_every_combination_once_loaded_and_matches_separate_fits(store, tmp_path):
    base = FitConfig(store=store, epochs=4, out=str(tmp_path / "sw"))
    res = sweep(base, {"head": ["logreg", "mlp"], "lr": [1e-3, 1e-2]})
    assert [r["rank"] for r in res.rows] == [1, 2, 3]
    tops = [r["val_top1"] for r in res.rows]
    assert tops == sorted(tops, reverse=True)
    names = sorted(p.name for p in res.folder.iterdir())
    assert names == ["01-logreg", "02-mlp-lr=0.001", "03-mlp-lr=0.01", "report.html", "sweep.csv", "sweep.json"]
    for row in res.rows:  # every run directory reads back, and equals a separate fit with its settings
        record = RunRecord.read(res.folder / row["run"])
        assert record.metrics["val"]["top1"] == row["val_top1"]
        options = {"epochs": 4, "lr": record.config.lr} if record.config.head == "mlp" else {}
        alone = featcache.fit(head=record.config.head, store=store, runs=str(tmp_path / "alone"), plots=False, **options)
        assert alone.metrics["val"]["top1"] == row["val_top1"]
        assert alone.history == list(record.history) or [h["val_loss"] for h in alone.history] == [
            h["val_loss"] for h in record.history]
    with open(res.folder / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == [r["run"] for r in res.rows]
    doc = json.loads((res.folder / "sweep.json").read_text())
    assert doc["best"] == res.rows[0]["run"] and len(doc["rows"]) == 3


def test_fit_with_comma_lists_prints_one_table_and_plots_only_the_best(store, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sw"
    r = CliRunner().invoke(main, ["fit", "--store", store, "--head", "mlp,linear", "--lr", "1e-3,1e-2", "--epochs", "3",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rank"))
    assert lines[header].split()[:4] == ["rank", "run", "head", "lr"] and len(lines[header + 1: header + 5]) == 4
    assert lines[-2].startswith(f"sweep {out}: 4 runs in ") and "best " in lines[-2]
    best = json.loads((out / "sweep.json").read_text())["best"]
    assert lines[-1] == f"next: featcache report {out / best}"
    with_plots = sorted(p.parent.name for p in out.glob("*/curves.png"))
    assert with_plots == [best]


def test_an_option_no_chosen_head_takes_is_an_error(store, tmp_path):
    r = CliRunner().invoke(main, ["fit", "--store", store, "--head", "logreg,svm", "--C", "0.1,1", "--hidden", "64",
                                  "--runs", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "--hidden is not an option of --head logreg,svm" in r.output
    r = CliRunner().invoke(main, ["fit", "--store", store, "--lr", "1e-3,", "--runs", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "has an empty item" in r.output
    assert not (tmp_path / "runs").exists()


def test_runs_lists_every_run_and_names_the_damaged_ones(store, tmp_path):
    root = tmp_path / "runs"
    featcache.fit(head="logreg", store=store, runs=str(root), plots=False)
    sweep(FitConfig(store=store, epochs=2, plots=False, runs=str(root)), {"head": ["mlp", "svm"]})
    rows, skipped = list_runs(root, sort="val")
    assert len(rows) == 3 and skipped == []
    assert [r["val_top1"] for r in rows] == sorted((r["val_top1"] for r in rows), reverse=True)
    damaged = next(root.glob("*/02-svm"))
    (damaged / "metrics.json").write_text("{")
    r = CliRunner().invoke(main, ["runs", "--runs", str(root), "--sort", "head"])
    assert r.exit_code == 0 and "Traceback" not in r.output
    table = [line for line in r.output.splitlines() if line and not line.startswith(("skipped", "2 runs"))]
    assert table[0].split()[:5] == ["time", "run", "head", "set", "params"]
    assert [line.split()[2] for line in table[1:]] == ["logreg", "mlp"]
    assert "lr=0.001 hidden=256 dropout=0.4" in r.output
    assert f"skipped {damaged.relative_to(root)}: " in r.output and "metrics.json is not valid JSON" in r.output
    r = CliRunner().invoke(main, ["runs", "--runs", str(root), "--json", "--set", rows[0]["set"][:6]])
    assert r.exit_code == 0 and len(json.loads(r.stdout)) == 2
