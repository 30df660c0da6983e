"""Start-up of the command line, as a user runs it: whole processes, wall time.

``featcache --help``, ``--version``, ``ls``, ``fit --head logreg``, ``runs``, ``backbones``, an extract
with a mistyped ``--backbone`` and an extract with nothing to compute, on a small set, each as a
ratio to ``python -c pass`` and to ``python -c "import torch"`` (and ``--help`` to ``python -c
"import click"``, and ``python -c "import numpy"``, the floor of anything that reads arrays with it).
The commands are run in rotation, one of each per round, so a busy machine slows them alike; each
time is the median over the rounds. With ``against`` (another checkout, e.g. main), each featcache
command also runs from that checkout, in the same rotation and on the same store, as ``...
(against)``. The load average is sampled before and after each round.

With ``compiled`` (the default), each checkout's package is copied and its bytecode compiled first
(``python -m compileall``, as ``pip install`` does), so featcache starts as installed, like click
and torch beside it; without it, from the checkout's sources (where ``PYTHONDONTWRITEBYTECODE`` is
set, every start then compiles featcache's modules again).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["run_cli"]

ROOT = Path(__file__).resolve().parents[1]
# what the installed ``featcache`` script runs, with this checkout's package first on the path
_SCRIPT = "import sys; from featcache.cli import main; sys.exit(main())"


def _featcache(*args: str) -> list[str]:
    return [sys.executable, "-c", _SCRIPT, *args]


def _load() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def _wall(argv: list[str], env: dict, cwd: Path, code: int = 0) -> float:
    t = time.perf_counter()
    p = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t
    if p.returncode != code:
        raise RuntimeError(f"{' '.join(argv[3:] if argv[1] == '-c' else argv)} failed: {p.stderr[-2000:]}")
    return seconds


def _compiled(checkout: Path, into: Path) -> str:
    """A copy of ``checkout``'s package in ``into`` with its bytecode compiled, as installed; the folder to put first
    on the path."""
    shutil.copytree(checkout / "featcache", into / "featcache", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(into / "featcache")], check=True)
    return str(into)


def run_cli(data: str, backbone: str = "efficientnet_lite0", weights: str = "DEFAULT", rounds: int = 5,
            workers: int | None = None, against: str | None = None, loads: list[float] | None = None,
            compiled: bool = True) -> list[dict]:
    """One row per command: median wall seconds and the ratios; the set is extracted first, untimed (by each
    checkout, so each has its caches). ``loads`` receives the load averages sampled around the rounds."""
    tmp = Path(tempfile.mkdtemp(prefix="featcache-cli-"))

    def path(checkout: Path, side: str) -> str:
        first = [_compiled(checkout, tmp / side)] if compiled else []
        return os.pathsep.join(filter(None, [*first, str(checkout), os.environ.get("PYTHONPATH")]))

    env = {**os.environ, "PYTHONPATH": path(ROOT, "this"),
           "FEATCACHE_STORE": str(tmp / "s.zarr"), "FEATCACHE_SCAN_CACHE": str(tmp / "scans"),
           "FEATCACHE_PROVENANCE_CACHE": str(tmp / "provenance")}
    other = None if against is None else {**env, "PYTHONPATH": path(Path(against).resolve(), "against")}
    loads = [] if loads is None else loads
    try:
        extract = ["extract", "--backbone", backbone, "--weights", weights, "--data", data, "--no-progress"]
        if workers is not None:
            extract += ["--workers", str(workers)]
        for e in filter(None, (env, other)):
            _wall(_featcache(*extract), e, tmp)
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            'python -c "import click"': [sys.executable, "-c", "import click"],
            'python -c "import numpy"': [sys.executable, "-c", "import numpy"],
            'python -c "import torch"': [sys.executable, "-c", "import torch"],
            "featcache --help": _featcache("--help"),
            "featcache --version": _featcache("--version"),
            "featcache ls": _featcache("ls"),
            "featcache fit --head logreg": _featcache("fit", "--head", "logreg", "--runs", str(tmp / "runs")),
            "featcache runs": _featcache("runs", "--runs", str(tmp / "runs")),
            "featcache backbones": _featcache("backbones"),
            "featcache extract (a mistyped --backbone)": _featcache("extract", "--backbone", "resnet181", "--data", data),
            "featcache extract (nothing to compute)": _featcache(*extract),
        }
        refused = {"featcache extract (a mistyped --backbone)": 2}  # a usage error is the expected answer
        runs = []
        for name, argv in commands.items():  # each featcache command beside its twin from the other checkout
            runs.append((name, argv, env))
            if other is not None and name.startswith("featcache"):
                runs.append((f"{name} (against)", argv, other))
        times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
        for _ in range(rounds):
            loads.append(_load())
            for name, argv, e in runs:
                times[name].append(_wall(argv, e, tmp, refused.get(name.removesuffix(" (against)"), 0)))
        loads.append(_load())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    median = {name: statistics.median(t) for name, t in times.items()}
    base, torch_s, click_s = median["python -c pass"], median['python -c "import torch"'], median['python -c "import click"']
    return [{"command": name, "rounds": rounds, "median_s": s, "min_s": min(times[name]), "max_s": max(times[name]),
             "over_pass": s / base, "over_torch": s / torch_s, "over_click": s / click_s} for name, s in median.items()]
