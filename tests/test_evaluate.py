"""evaluate RUN --data DIR: cached rows read, new images computed once (and stored), metrics as fit's."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import featcache
from featcache import compute
from featcache.cli import main
from featcache.evaluate import evaluate
from featcache.keys import space_key

from .helpers import COLOURS, TINY, make_folder


@pytest.fixture
def fitted(folder, store_url, tmp_path):
    featcache.extract(backbone=TINY, layer="features", data=str(folder), store=store_url, weights="none", workers=0)
    runs = {}
    for head, pool in (("mlp", "none"), ("logreg", "avg")):
        trains = {"epochs": 5, "lr": 1e-2} if head == "mlp" else {}  # logreg takes neither
        runs[head] = featcache.fit(head=head, store=store_url, pool=pool, plots=False, out=str(tmp_path / head),
                                   **trains).run_dir
    return runs


def _no_compute(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was run although every row is in the store")

    monkeypatch.setattr(compute, "run_backbone", refuse)


@pytest.mark.parametrize("head", ["mlp", "logreg"])
def test_evaluate_on_the_fitted_val_folder_equals_fit_and_computes_nothing(fitted, folder, store_url, head,
                                                                        monkeypatch):
    run = fitted[head]
    record = featcache.read_run(run)
    assert space_key(record.space_provenance) == featcache.open_store(store_url).get_set().space
    _no_compute(monkeypatch)
    res = evaluate(run, folder / "val", backbone=TINY, workers=0)
    assert list(res.metrics) == ["all"] and res.counts.computed == 0 and res.counts.from_store == 12
    got, want = res.metrics["all"], record.metrics["val"]
    assert got["top1"] == want["top1"] and got["confusion_matrix"] == want["confusion_matrix"]
    assert got["per_class_accuracy"] == want["per_class_accuracy"]
    assert got["log_loss"] == pytest.approx(want["log_loss"], rel=1e-6)
    whole = evaluate(run, folder, backbone=TINY, workers=0)  # the split folders: each split measured
    assert list(whole.metrics) == ["train", "val"] and whole.metrics["train"]["top1"] == record.metrics["train"]["top1"]


def test_evaluate_command_prints_metrics_and_says_nothing_was_computed(fitted, folder):
    runner = CliRunner()
    r = runner.invoke(main, ["evaluate", str(fitted["logreg"]), "--data", str(folder / "val"), "--backbone", TINY,
                             "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "all    n     12  top-1 1.0000" in r.output and "all confusion matrix (rows: true blue, green, red):" in r.output
    assert r.output.strip().splitlines()[-1].endswith("computed 0, from the store 12")
    r = runner.invoke(main, ["evaluate", str(fitted["logreg"]), "--data", str(folder / "val"), "--backbone", TINY,
                             "--workers", "0", "--json"])
    doc = json.loads(r.output[r.output.index("{"):])
    assert doc["computed"] == 0 and doc["from_store"] == 12 and doc["metrics"]["all"]["n"] == 12
    r = runner.invoke(main, ["evaluate", str(fitted["logreg"])])  # without --data: the stored metrics, as before
    assert r.exit_code == 0 and "val per class" in r.output
    r = runner.invoke(main, ["evaluate", str(fitted["logreg"]), "--no-store"])
    assert r.exit_code == 2 and "--no-store applies only with --data DIR" in r.output


def test_new_images_are_computed_once_and_stored_unless_no_store(fitted, folder, store_url, tmp_path):
    run = fitted["mlp"]
    mixed = tmp_path / "mixed"
    shutil.copytree(folder / "val", mixed)
    new = make_folder(tmp_path / "new", splits=(("", 2),), seed=7)
    for f in new.rglob("*.png"):  # 2 new images per class beside the 4 cached ones
        shutil.copy(f, mixed / f.parent.name / f"new_{f.name}")
    res = evaluate(run, mixed, store=False, backbone=TINY, workers=0)
    assert (res.counts.computed, res.counts.from_store, res.counts.stored) == (6, 12, 0)
    res = evaluate(run, mixed, backbone=TINY, workers=0)
    assert (res.counts.computed, res.counts.from_store, res.counts.stored) == (6, 12, 6)
    again = evaluate(run, mixed, backbone=TINY, workers=0)
    assert (again.counts.computed, again.counts.from_store) == (0, 18)
    assert again.metrics == res.metrics  # rows computed here are the rows read back
    assert not featcache.open_store(store_url).root["leases"].members()  # the lease is gone
    assert len(featcache.open_store(store_url).set_keys()) == 1  # rows only, never a set


def test_a_missing_store_is_an_error_and_recompute_computes_everything(fitted, folder, store_url, tmp_path):
    want = evaluate(fitted["mlp"], folder / "val", backbone=TINY, workers=0).metrics
    shutil.move(store_url, tmp_path / "elsewhere.zarr")
    args = ["evaluate", str(fitted["mlp"]), "--data", str(folder / "val"), "--backbone", TINY, "--workers", "0"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and r.output.startswith("Error: the store ") and "--recompute" in r.output, r.output
    r = CliRunner().invoke(main, args + ["--recompute"])
    assert r.exit_code == 0, r.output
    assert not [line for line in r.output.splitlines() if line.startswith("note:")]
    assert "computed 12, from the store 0" in r.output
    res = evaluate(fitted["mlp"], folder / "val", backbone=TINY, workers=0, recompute=True)
    assert res.metrics["all"]["top1"] == want["all"]["top1"]
    assert res.metrics["all"]["log_loss"] == pytest.approx(want["all"]["log_loss"], abs=1e-4)


def test_a_folder_with_classes_the_run_does_not_know_is_one_error_line(fitted, tmp_path):
    other = make_folder(tmp_path / "other", splits=(("", 2),), classes={**COLOURS, "purple": (160, 40, 200)})
    r = CliRunner().invoke(main, ["evaluate", str(fitted["mlp"]), "--data", str(other), "--backbone", TINY])
    errors = [line for line in r.output.splitlines() if "Error" in line]
    assert r.exit_code == 1 and len(errors) == 1 and "Traceback" not in r.output
    assert "class(es) the run does not know: purple" in errors[0] and "blue, green, red" in errors[0]


def test_a_subset_of_the_classes_is_mapped_by_name(fitted, tmp_path):
    two = make_folder(tmp_path / "two", splits=(("", 3),), classes={"red": COLOURS["red"], "green": COLOURS["green"]})
    res = evaluate(fitted["logreg"], two, backbone=TINY, workers=0)
    m = res.metrics["all"]
    assert m["n"] == 6 and m["per_class_accuracy"]["blue"] is None
    assert np.array(m["confusion_matrix"])[0].sum() == 0  # no blue image, and blue is class 0 of the run
