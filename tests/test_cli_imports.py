"""The command line answers at once: commands that need no network import no torch, and
Ctrl-C at any moment is one ``Interrupted`` line (exit status 130), never a traceback.

Each command runs in a fresh process, the way a user runs it; the process reports which
heavy modules it imported (``sys.modules``) when the command returns.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import featcache

from .helpers import ROOT, TINY, cli_imports, make_folder

HEAVY = ("torch", "torchvision", "sklearn", "matplotlib", "mlflow", "tensorboard")
def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("FEATCACHE_STORE", None)
    return env


def _heavy(args: list[str], cwd: Path) -> tuple[int, list[str], str]:
    code, heavy, out, err = cli_imports(args, HEAVY, cwd=cwd)
    return code, heavy, out + err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("imports")
    data = make_folder(root / "data")
    store = root / "s.zarr"
    key = featcache.extract(backbone=TINY, weights="none", data=str(data), store=str(store), workers=0).set_key
    return {"root": root, "data": str(data), "store": str(store), "key": key}


@pytest.mark.parametrize("args,allowed", [
    (["--help"], ()),
    (["--version"], ()),
    (["fit", "--help"], ()),
    (["extract", "--help"], ()),
    (["ls"], ()),
    (["ls", "--json"], ()),
    (["status", "--data", "DATA", "--json"], ()),
    (["info", "KEY"], ()),
    (["status", "--data", "DATA"], ()),
    (["gc", "--dry-run"], ()),
    (["fit", "--head", "logreg", "--no-plots"], ("sklearn",)),
    (["fit", "--head", "svm"], ("sklearn", "matplotlib")),
    (["fit", "--head", "logreg", "--no-plots", "--tracker", "tensorboard", "--tracking-uri", "TB"],
     ("sklearn", "torch", "tensorboard")),
    (["backbones"], ()),
    (["rm", "KEY"], ()),
])
def test_commands_import_only_what_they_need(world, args, allowed):
    argv = [{"KEY": world["key"], "DATA": world["data"], "TB": str(world["root"] / "tb")}.get(a, a) for a in args]
    if argv and argv[0] not in ("--help", "--version", "backbones") and "--help" not in argv:
        argv += ["--store", world["store"]]
    if argv[0] == "fit":
        argv += ["--runs", str(world["root"] / "runs")]
    if argv[0] == "rm":  # last: the other commands need the set
        pytest.importorskip("zarr")
    code, heavy, output = _heavy(argv, world["root"])
    assert code == 0, output
    assert set(heavy) <= set(allowed), (argv, heavy)


def _interrupted_at(args: list[str], delay: float, cwd: Path) -> subprocess.CompletedProcess:
    p = subprocess.Popen([sys.executable, "-m", "featcache.cli", *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0])
def test_ctrl_c_at_any_moment_is_one_line(world, tmp_path, delay):
    """While Python starts, while torch imports, while the folder is scanned: one line, exit 130."""
    r = _interrupted_at(["extract", "--backbone", TINY, "--weights", "none", "--data", world["data"], "--store",
                         str(tmp_path / "s.zarr"), "--workers", "0", "--no-progress"], delay, tmp_path)
    if r.returncode == 0:
        pytest.skip("the extract finished before the signal")  # a fast machine
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr
    assert [line for line in lines if line.startswith("Interrupted")] == [lines[-1]], r.stderr


def test_torchvision_names_read_as_text_are_torchvisions_own():
    """``featcache backbones`` reads torchvision's registry without importing it: the same names."""
    import torchvision

    from featcache.names import torchvision_names

    assert list(torchvision_names()) == sorted(torchvision.models.list_models(module=torchvision.models))


def test_backbones_names_every_source(world):
    p = subprocess.run([sys.executable, "-m", "featcache.cli", "backbones"], cwd=world["root"], env=_env(),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    names = p.stdout.split()
    assert "resnet18" in names and "efficientnet_lite0" in names and "vit_b_16" in names
    assert all(":" not in n for n in names)  # standard output stays a plain list of names
    assert "timm:NAME" in p.stderr and "hf:HUB_ID_OR_FOLDER" in p.stderr and "package.module:factory" in p.stderr


def test_a_mistyped_backbone_is_refused_before_the_scan_and_without_torch(world, tmp_path):
    code, heavy, output = _heavy(["extract", "--backbone", "resnet181", "--data", world["data"], "--store",
                                  str(tmp_path / "s.zarr")], world["root"])
    assert code == 2, output
    assert "Unknown backbone 'resnet181'" in output and "closest: resnet18" in output
    assert "layout:" not in output and "hashing" not in output  # nothing was scanned
    assert heavy == [], heavy
    assert not (tmp_path / "s.zarr").exists()


def test_a_mistyped_backbone_is_refused_before_the_scan_in_python(tmp_path, monkeypatch):
    import importlib

    from featcache.errors import UnknownBackbone

    extract_module = importlib.import_module("featcache.extract")

    monkeypatch.setattr(extract_module, "scan", lambda *a, **k: pytest.fail("the folder was scanned"))
    with pytest.raises(UnknownBackbone, match="closest: resnet18"):
        featcache.extract(backbone="resnet181", data=str(tmp_path), store=str(tmp_path / "s.zarr"))


def test_a_closed_pipe_ends_the_command_quietly(world):
    """``featcache backbones | head -1``: the reader is gone; no error line, no traceback."""
    read, write = os.pipe()
    os.close(read)  # the reader has already left
    with os.fdopen(write, "wb") as out:
        p = subprocess.run([sys.executable, "-m", "featcache.cli", "backbones"], cwd=world["root"], env=_env(),
                           stdout=out, stderr=subprocess.PIPE, text=True)
    assert p.returncode == 141, p.stderr
    assert "Error" not in p.stderr and "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr


def test_runs_checks_every_run_without_torch_scikit_learn_or_numpy(world, tmp_path):
    """``featcache runs`` reads and checks each run's head (mlp, logreg, rest) from the head table:
    damaged heads are still named and skipped, and neither torch, scikit-learn nor NumPy is imported."""
    import shutil

    import numpy as np

    root, flat, maps = tmp_path / "runs", str(tmp_path / "flat.zarr"), str(tmp_path / "maps.zarr")
    featcache.extract(backbone=TINY, weights="none", data=world["data"], store=flat, workers=0)
    featcache.extract(backbone=TINY, layer="features", weights="none", data=world["data"], store=maps, workers=0)
    for head, store, options in (("mlp", flat, {"epochs": 1}), ("logreg", flat, {}),
                                 ("rest", maps, {"epochs": 1, "backbone": TINY})):
        featcache.fit(head=head, store=store, out=str(root / head), plots=False, **options)
    damage = {"mlp": ("0.weight", lambda a: a[:, :-1]), "logreg": ("scaler_scale", lambda a: -a),
              "rest": ("classifier.3.weight", lambda a: np.full_like(a, np.nan))}
    for head, (name, change) in damage.items():
        bad = Path(shutil.copytree(root / head, root / f"bad-{head}"))
        with np.load(bad / "head.npz") as z:
            arrays = {k: z[k] for k in z.files}
        arrays[name] = change(arrays[name])
        np.savez(bad / "head.npz", **arrays)
    code, heavy, out, err = cli_imports(["runs", "--runs", str(root)], ("numpy",) + HEAVY, cwd=tmp_path)
    output = out + err
    assert code == 0, output
    assert heavy == [], heavy
    assert "3 runs in" in output and "3 damaged skipped" in output, output
    for head, (name, _) in damage.items():
        assert f"skipped bad-{head}: " in output and name in output.split(f"skipped bad-{head}: ")[1].splitlines()[0]
