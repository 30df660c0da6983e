import json

import pytest
from click.testing import CliRunner

import featcache
import featcache.report
from featcache.cli import main
from featcache.heads import C_GRID, load_head

from .conftest import TINY, make_folder


@pytest.fixture
def confusable(tmp_path):
    """Two classes of the same colour: a head must get some wrong."""
    folder = make_folder(tmp_path / "d", classes={"a": (200, 30, 30), "b": (200, 30, 30), "c": (30, 30, 200)})
    store = str(tmp_path / "s.zarr")
    featcache.extract(backbone=TINY, data=str(folder), store=store, weights="none", workers=0)
    return store


def test_fit_writes_plots_and_report(confusable, tmp_path):
    pytest.importorskip("matplotlib")
    res = featcache.fit(head="mlp", store=confusable, epochs=5, runs=str(tmp_path / "runs"), data=str(tmp_path / "d"))
    names = {p.name for p in res.run_dir.iterdir()}
    assert {"curves.png", "confusion.png", "per_class.png", "misclassified.png"} <= names
    assert len(res.notes) == 1 and res.notes[0].startswith("val numbers are selection-biased")  # no test split
    (res.run_dir / "misclassified.png").unlink()
    r = CliRunner().invoke(main, ["report", str(res.run_dir)])  # images are read only from a folder the user names
    assert r.exit_code == 0 and not (res.run_dir / "misclassified.png").exists()
    r = CliRunner().invoke(main, ["report", str(res.run_dir), "--data", str(tmp_path / "d")])
    assert r.exit_code == 0 and r.output == f"wrote {res.run_dir / 'report.html'}\n"
    page = (res.run_dir / "report.html").read_text()
    for png in ("curves.png", "confusion.png", "per_class.png", "misclassified.png"):
        assert f'src="{png}"' in page
    assert "<td>val</td><td>12</td>" in page
    for setting in ("<td>hidden</td><td>256</td>", "<td>lr</td><td>0.001</td>", "<td>dropout</td><td>0.4</td>",
                    "<td>patience</td><td>10</td>", f"<td>data folder</td><td>{tmp_path / 'd'}</td>"):
        assert setting in page, setting


def test_without_matplotlib_fit_says_how_and_report_is_an_error(confusable, tmp_path, monkeypatch):
    monkeypatch.setattr(featcache.report, "have_matplotlib", lambda: False)
    res = featcache.fit(head="linear", store=confusable, epochs=2, runs=str(tmp_path / "runs"))
    assert res.notes[-1] == "plots skipped: matplotlib is not installed (pip install 'featcache[plots]')"
    assert not any(p.suffix == ".png" for p in res.run_dir.iterdir())
    r = CliRunner().invoke(main, ["report", str(res.run_dir)])
    assert r.exit_code == 1 and r.output == "Error: plots need matplotlib: pip install 'featcache[plots]'\n"


def test_sklearn_heads_choose_C_by_cross_validation_of_train_and_record_it(confusable, tmp_path):
    res = featcache.fit(head="logreg", store=confusable, runs=str(tmp_path / "runs"), plots=False)
    info = json.loads((res.run_dir / "config.json").read_text())
    assert info["C"] in C_GRID and res.chosen_C == info["C"]
    search = info["C_search"]
    assert search["by"] == "5-fold cross-validated accuracy" and len(search["scores"]) == len(search["grid"])
    # C was chosen on train alone, so val is held out (and says so); nothing warns
    assert info["selection"] == {"chosen": [{"what": "C", "on": "5-fold cross-validated accuracy of train"}],
                                 "biased": [], "score": "val"}
    assert res.notes == [] and "val top-1" in res.summary() and "(held out)" in res.summary()
    assert set(C_GRID) <= set(search["grid"])  # a C at the edge of the grid extends it
    assert load_head(res.run_dir).C_ == info["C"]
    page = featcache.report.write_report(res.run_dir).read_text() if featcache.report.have_matplotlib() else ""
    if page:  # every C tried, with its score, the chosen one marked
        assert "C search (5-fold cross-validated accuracy)" in page and f"<td>{info['C']:g} (chosen)</td>" in page
    fixed = featcache.fit(head="svm", store=confusable, C=0.5, runs=str(tmp_path / "runs"), plots=False)
    assert fixed.chosen_C == 0.5


def test_C_by_cross_validation_without_a_val_split(tmp_path):
    folder = make_folder(tmp_path / "d", splits=(("train", 10),))
    store = str(tmp_path / "s.zarr")
    featcache.extract(backbone=TINY, data=str(folder), store=store, weights="none", workers=0)
    res = featcache.fit(head="logreg", store=store, runs=str(tmp_path / "runs"), plots=False)
    info = json.loads((res.run_dir / "config.json").read_text())
    assert info["C_search"]["by"] == "5-fold cross-validated accuracy"
    assert set(res.metrics) == {"train"}



def test_classes_on_the_same_point_share_one_label():
    from featcache.report import point_labels

    labels = point_labels(["0", "1", "4", "6", "9"], [107, 109, 109, 109, 108], [1.0, 1.0, 1.0, 1.0, float("nan")])
    assert labels == {(107, 1.0): "0", (109, 1.0): "1, 4, 6"}
