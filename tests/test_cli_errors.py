"""Every failed write (a full disk, a read-only store, a closed output) is one ``Error:`` line
naming the path, never a traceback, and leaves no partial file behind."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import featcache
from featcache.cli import main

from .helpers import ROOT, TINY


def _full(*_, **__):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "the/file")


@pytest.fixture
def store(tmp_path, folder) -> str:
    url = str(tmp_path / "s.zarr")
    featcache.extract(backbone=TINY, weights="none", data=str(folder), store=url, workers=0)
    return url


def _invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_standard_output_on_a_full_disk_is_one_error_line(store):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "featcache.cli", "ls", "--store", store], stdout=full,
                           stderr=subprocess.PIPE, text=True, env=env)
    assert p.returncode == 1
    assert p.stderr == "Error: writing to standard output failed (no space left on the device)\n"


def test_fit_on_a_full_disk_leaves_no_run_directory(store, tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setattr(np, "savez", _full)  # head.npz: the first big file of a run
    r = _invoke("fit", "--store", store, "--head", "logreg", "--runs", str(tmp_path / "runs"), "--no-plots")
    last = r.output.splitlines()[-1]
    assert r.exit_code == 1 and last.startswith(f"Error: writing the run directory {tmp_path / 'runs'}"), r.output
    assert "no space left on the device" in last and "Traceback" not in r.output
    assert list((tmp_path / "runs").iterdir()) == []


def test_sample_on_a_full_disk_leaves_no_folder(tmp_path, monkeypatch):
    from PIL import Image

    calls = []

    def save(self, *a, **k):
        calls.append(1)
        if len(calls) > 5:
            _full()

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Image.Image, "save", save)
    r = _invoke("sample", "--out", "digits")
    assert r.exit_code == 1 and r.output == "Error: cannot write digits: no space left on the device; nothing was " \
                                            "left half-written there\n"
    assert list(tmp_path.iterdir()) == []


def test_rm_on_a_read_only_store_is_one_error_line(store, monkeypatch):
    import shutil

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(shutil, "rmtree", read_only)
    monkeypatch.setattr(os, "remove", read_only)
    monkeypatch.setattr(os, "unlink", read_only)
    r = _invoke("rm", "--set", featcache.open_store(store).get_set().key, "--store", store)
    assert r.exit_code == 1 and "read-only file system" in r.output and "Traceback" not in r.output, r.output
    assert r.output.startswith("Error: ") and r.output.count("\n") == 1


def test_an_empty_store_path_never_makes_the_current_folder_a_store(tmp_path, monkeypatch, folder):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in (["extract", "--backbone", TINY, "--data", str(folder)], ["ls"], ["gc"], ["fit"]):
        r = _invoke(*args, "--store", "")
        assert r.exit_code == 2 and "empty store path" in r.output
    monkeypatch.setenv("FEATCACHE_STORE", "")  # an empty variable counts as unset
    assert featcache.config.default_store_url() == "featcache.zarr"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ------------------------------------------------- library parameter names -> the command line's flags


def test_every_config_field_is_found_as_its_commands_option():
    """The map from library parameter names to flags is read from click: every field of the configs the
    commands build is found, including those click keeps under another name or spells otherwise."""
    import dataclasses

    from featcache.cli.kit import cli_param, flag
    from featcache.config import ExtractConfig, FitConfig

    for config, command in ((ExtractConfig, main.commands["extract"]), (FitConfig, main.commands["fit"])):
        missing = [f.name for f in dataclasses.fields(config) if cli_param(command, f.name) is None]
        assert missing == [], (command.name, missing)
    spelled = {("extract", "checkpoint_s"): "--checkpoint-every", ("fit", "pool"): "--fit-pool",
               ("fit", "use_views"): "--views", ("fit", "set"): "--set", ("fit", "C"): "--C",
               ("runs", "set"): "--set", ("evaluate", "store"): "--store", ("predict", "run"): "RUN",
               ("predict", "paths"): "PATHS", ("extract", "--labels-from-name"): "--labels-from-name"}
    assert {key: flag(main.commands[key[0]], key[1]) for key in spelled} == spelled


def test_an_error_naming_a_python_parameter_is_a_usage_error_for_its_flag(tmp_path, monkeypatch):
    """A library error says ``param="store"``; report keeps that option as ``store_url``: the usage
    error names ``--store``. A parameter the command does not have is a plain ``Error:`` line."""
    import featcache.report
    from featcache.errors import FeatcacheError

    def refuse(run, **kwargs):
        raise FeatcacheError(f"no store for {run}", param=refused)

    monkeypatch.setattr(featcache.report, "write_report", refuse)
    for refused, named in (("store", "'--store'"), ("run", "'RUN'"), ("backbone", "'--backbone'")):  # noqa: B007  (refuse reads it)
        r = _invoke("report", str(tmp_path / "run"))
        assert r.exit_code == 2 and f"Error: Invalid value for {named}: no store for " in r.output, r.output
    refused = "layer"  # report has no --layer
    r = _invoke("report", str(tmp_path / "run"))
    assert r.exit_code == 1 and r.output == f"Error: no store for {tmp_path / 'run'}\n"
