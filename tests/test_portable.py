"""Runs work from any folder and after being copied: the store is recorded as an absolute URL,
``--store`` names where it is now, and report, evaluate and predict never fall back to computing
every row without saying so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import featcache
from featcache.cli import main
from featcache.errors import StoreError

from .helpers import TINY, make_folder

B = ("--backbone", TINY)  # a factory network is imported only when the user names it


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder where `featcache extract` and `featcache fit` ran with a relative store."""
    home = tmp_path / "project"
    data = make_folder(home / "data")
    monkeypatch.chdir(home)
    featcache.extract(backbone=TINY, weights="none", data="data", store="s.zarr", workers=0)
    res = featcache.fit(head="logreg", store="s.zarr", runs="runs", plots=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return {"home": home, "data": data, "run": Path(res.run_dir).resolve(), "store": home / "s.zarr",
            "elsewhere": elsewhere}


def _run(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def test_a_run_records_its_store_as_an_absolute_path_and_works_from_another_folder(project, monkeypatch):
    recorded = json.loads((project["run"] / "config.json").read_text())["store"]
    assert recorded == str(project["store"])
    monkeypatch.chdir(project["elsewhere"])
    code, out = _run("evaluate", project["run"], "--data", project["data"], "--no-progress", *B)
    assert code == 0, out
    assert "computed 0" in out and "from the store 36" in out
    code, out = _run("predict", project["run"], project["data"] / "val" / "red", "--no-progress", *B)
    assert code == 0, out
    assert "computed 0" in out and "from the store 4" in out
    code, out = _run("report", project["run"])
    assert code == 0 and "note:" not in out, out


def test_a_run_that_recorded_a_relative_store_finds_it_beside_its_runs_folder(project, monkeypatch):
    """Runs of an older featcache recorded the store as typed (``s.zarr``)."""
    config = project["run"] / "config.json"
    doc = json.loads(config.read_text())
    config.write_text(json.dumps({**doc, "store": "s.zarr"}))
    monkeypatch.chdir(project["elsewhere"])
    code, out = _run("evaluate", project["run"], "--data", project["data"], "--no-progress", *B)
    assert code == 0, out
    assert "from the store 36" in out


def test_a_store_that_is_not_found_is_an_error_with_the_fix_never_a_silent_recomputation(project, monkeypatch):
    moved = project["home"].parent / "moved.zarr"
    shutil.move(project["store"], moved)
    monkeypatch.chdir(project["elsewhere"])
    for args in (["evaluate", project["run"], "--data", project["data"], *B], ["predict", project["run"], project["data"], *B]):
        code, out = _run(*args, "--no-progress")
        assert code == 1, out
        last = out.strip().splitlines()[-1]
        assert last.startswith(f"Error: the store {project['store']} that {project['run']} was fitted from is not here")
        assert "Pass --store with where it is now, or --recompute" in last
        code, out = _run(*args, "--no-progress", "--store", moved)
        assert code == 0 and "computed 0" in out, out
        code, out = _run(*args, "--no-progress", "--recompute")
        assert code == 0 and "computed 36, from the store 0" in out, out
    from featcache.evaluate import evaluate

    with pytest.raises(StoreError, match="was fitted from is not here"):
        evaluate(project["run"], project["data"], backbone=TINY)
    assert evaluate(project["run"], project["data"], backbone=TINY,
                              store_url=str(moved)).counts.from_store == 36


def test_a_copied_run_without_its_store_is_reported_from_its_own_folder(project, monkeypatch):
    pytest.importorskip("matplotlib")
    copy = project["elsewhere"] / "copied-run"
    shutil.copytree(project["run"], copy)
    shutil.rmtree(project["store"])
    monkeypatch.chdir(project["elsewhere"])
    code, out = _run("report", copy)  # drawn from the run's own files: the store is not needed
    assert code == 0 and "note:" not in out, out
    assert "confusion.png" in (copy / "report.html").read_text()
    code, out = _run("report", copy, "--data", project["data"])  # the misclassified grid needs the store's rows
    assert code == 0, out
    assert "note: the store" in out and "pass --store with where it is now" in out
    page = (copy / "report.html").read_text()
    assert "confusion.png" in page and "note: the store" in page and 'id="misclassified"' not in page
