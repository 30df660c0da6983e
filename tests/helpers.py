"""What test modules import: the repository root, the tiny test backbones' names, the image-folder
maker, ``extract_tiny``, the CLI as a child process, ``one_error_line`` and where the real photo
set lives. Fixtures and pytest hooks stay in ``conftest.py``, which pytest loads by itself; test
modules import from here only (``from .helpers import ...``), never from ``conftest``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests.tiny_backbone:tiny_cnn"
SLOW = "tests.tiny_backbone:slow_tiny_cnn"  # sleeps per batch: an extract that runs for seconds
HYMENOPTERA = ROOT.parent / "shared" / "data" / "hymenoptera"
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 220)}


def extract_tiny(data, store, **kw):
    """``featcache.extract`` with the tiny test backbone, random weights and no worker processes."""
    import featcache

    kw.setdefault("backbone", TINY)
    kw.setdefault("weights", "none")
    kw.setdefault("workers", 0)
    return featcache.extract(data=str(data), store=str(store), **kw)


def make_folder(root: Path, splits=(("train", 8), ("val", 4)), classes=COLOURS, size=(24, 30), seed=0) -> Path:
    """ImageFolder of noisy solid-colour PNGs: classes separable by colour alone."""
    rng = np.random.default_rng(seed)
    for split, n in splits:
        for name, colour in classes.items():
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.integers(-30, 30, size + (3,)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i}.png")
    return root


def one_error_line(r, exit_code=1) -> str:
    """The one ``Error:`` line of a CliRunner result that exited ``exit_code`` without a traceback."""
    assert r.exit_code == exit_code, r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.output
    return errors[0]


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and children inherit that; Python then
    # installs no KeyboardInterrupt handler. The extract under test gets the terminal's default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_process(*args, **popen) -> subprocess.Popen:
    """``python -m featcache.cli ARGS`` as a child process (text pipes, SIGINT as in a terminal)."""
    cmd = [sys.executable, "-m", "featcache.cli", *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint, **popen)


def all_rows(store) -> dict:
    """Every row of the store's newest set, by image hash."""
    import featcache

    fs = featcache.open_store(str(store)).get_set()
    return {h: row for s in fs.splits for h, row in zip(fs.hashes(s).tolist(), fs.features(s))}


_IMPORTS_PROBE = """
import json, sys
from featcache.cli import main
try:
    main(sys.argv[2:])
except SystemExit as e:
    code = e.code
else:
    code = 0
sys.stdout.flush()
print(json.dumps({"code": code, "imported": [m for m in json.loads(sys.argv[1]) if m in sys.modules]}), file=sys.stderr)
"""


def cli_imports(args, modules, cwd=ROOT) -> tuple[int, list[str], str, str]:
    """``featcache ARGS`` in a fresh process, the way a user runs it: (exit status, which of ``modules`` were
    imported when the command returned, standard output, standard error without the probe's own line)."""
    import json
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("FEATCACHE_STORE", None)
    p = subprocess.run([sys.executable, "-c", _IMPORTS_PROBE, json.dumps(list(modules)), *map(str, args)], cwd=cwd,
                       env=env, capture_output=True, text=True)
    *err, last = p.stderr.splitlines() or [""]
    try:
        probe = json.loads(last)
    except ValueError:
        raise AssertionError(f"featcache {' '.join(map(str, args))} did not return: {p.stderr[-3000:]}") from None
    return probe["code"], probe["imported"], p.stdout, "\n".join(err)
