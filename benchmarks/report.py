"""Time ``featcache report RUN`` as a user runs it (a whole process, wall time), this checkout
against another one (``--before``, e.g. ``git archive <commit> | tar -x -C /tmp/before``), with
``python -c "import torch"`` for scale.

    python -m benchmarks.report RUN [--data DIR] [--before CHECKOUT] [--rounds 3] [--in-fit STORE]

``--in-fit STORE`` also times what ``fit`` spends on the report once its head is fitted (the
pictures and, in this checkout, report.html from the record in memory).

The ways run in rotation, one of each per round, so a busy machine slows them alike; each time
is the median over the rounds. The run is copied once per checkout, so neither overwrites the
other's pictures.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from .common import machine, machine_label, save, table

__all__ = ["run_report"]

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = "import sys; from featcache.cli import main; sys.exit(main())"
COLUMNS = [("way", "way"), ("rounds", "rounds"), ("median_s", "median wall s"), ("per_round", "per round s"),
           ("vs_torch", "wall / import torch"), ("cpu_s", "median CPU s"), ("cpu_vs_torch", "CPU / import torch")]


def _cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def _time(argv: list[str], checkout: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one process; CPU (user + system) is what a busy shared machine disturbs least."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    cpu, t = _cpu(), time.perf_counter()
    p = subprocess.run(argv, env=env, cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[3:])} failed: {p.stderr[-2000:]}")
    return seconds, _cpu() - cpu


def run_report(run: str, data: str | None = None, before: str | None = None, rounds: int = 3) -> list[dict]:
    """One row per way: the median wall seconds over ``rounds`` and the ratio to ``import torch``."""
    tmp = Path(tempfile.mkdtemp(prefix="featcache-report-"))
    try:
        extra = ["--data", str(Path(data).resolve())] if data else []
        ways = {'python -c "import torch"': ([sys.executable, "-c", "import torch"], ROOT)}
        checkouts = {"this checkout": ROOT, **({"before": Path(before).resolve()} if before else {})}
        for name, checkout in checkouts.items():
            copy = tmp / name.replace(" ", "-")
            shutil.copytree(run, copy)
            ways[f"featcache report ({name})"] = ([sys.executable, "-c", _SCRIPT, "report", str(copy), *extra],
                                                  checkout)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
        for _ in range(rounds):
            for name, (argv, checkout) in ways.items():
                times[name].append(_time(argv, checkout))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    torch = times['python -c "import torch"']
    torch_s, torch_cpu = statistics.median(t for t, _ in torch), statistics.median(c for _, c in torch)
    rows = []
    for name, ts in times.items():
        wall, cpu = statistics.median(t for t, _ in ts), statistics.median(c for _, c in ts)
        rows.append({"way": name, "rounds": rounds, "median_s": wall, "per_round": ", ".join(f"{t:.1f}" for t, _ in ts),
                     "vs_torch": wall / torch_s, "cpu_s": cpu, "cpu_vs_torch": cpu / torch_cpu})
    return rows


_IN_FIT = """
import inspect, json, statistics, sys, time
import featcache, featcache.report as rep
store, data, rounds = sys.argv[1], sys.argv[2] or None, int(sys.argv[3])
res = featcache.fit(head="mlp", store=store, epochs=5, runs=sys.argv[4], plots=False, data=data)
fs = featcache.open_store(store).get_set(res.set_key)
walls, cpus = [], []
for _ in range(rounds):
    t, c = time.perf_counter(), time.process_time()
    if "record" in inspect.signature(getattr(rep, "write_report", lambda: None)).parameters:  # this checkout: the page and its PNGs, from the record in memory
        rep.write_report(res.run_dir, data=data, record=res.record, fs=fs, head=res.head, probas=res.probas)
    else:  # before: fit wrote the PNGs only (report.html was a second command)
        rep.write_plots(res.run_dir, fs, res.head, res.probas, data=data)
    walls.append(time.perf_counter() - t)
    cpus.append(time.process_time() - c)
print(json.dumps({"wall": walls, "cpu": cpus}))
"""


def run_in_fit(store: str, data: str | None = None, before: str | None = None, rounds: int = 5) -> list[dict]:
    """What ``fit`` spends on its pictures (and, in this checkout, report.html) once the head is fitted:
    an mlp head fitted once per checkout, then the step timed ``rounds`` times in that process."""
    checkouts = {"this checkout": ROOT, **({"before": Path(before).resolve()} if before else {})}
    rows = []
    with tempfile.TemporaryDirectory(prefix="featcache-report-") as tmp:
        for name, checkout in checkouts.items():
            env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
            p = subprocess.run([sys.executable, "-c", _IN_FIT, str(Path(store).resolve()),
                                str(Path(data).resolve()) if data else "", str(rounds), str(Path(tmp) / name)],
                               env=env, cwd=checkout, capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"fit's report step with {name} failed: {p.stderr[-2000:]}")
            got = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append({"way": f"fit's report step ({name})", "rounds": rounds,
                         "median_s": statistics.median(got["wall"]),
                         "per_round": ", ".join(f"{t:.1f}" for t in got["wall"]),
                         "cpu_s": statistics.median(got["cpu"])})
    return rows


@click.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--data", default=None, type=click.Path(exists=True, file_okay=False),
              help="The set's image folder (the misclassified grid).")
@click.option("--before", default=None, type=click.Path(exists=True, file_okay=False),
              help="Another checkout of featcache to time the same command with.")
@click.option("--rounds", default=3, show_default=True, type=int)
@click.option("--in-fit", "store", default=None, help="Also time fit's report step on this store's set (an mlp head).")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Results folder [default: benchmarks/results].")
def main(run, data, before, rounds, store, out) -> None:
    info = machine()
    click.echo(f"machine: {machine_label(info)}")
    rows = run_report(run, data, before, rounds)
    click.echo(table(rows, COLUMNS))
    if store:
        fitted = run_in_fit(store, data, before, rounds)
        click.echo(table(fitted, [c for c in COLUMNS if "torch" not in c[0]]))
        rows += fitted
    click.echo(f"saved {save('report', {'machine': info, 'run': run, 'data': data, 'rows': rows}, out)}")


if __name__ == "__main__":
    main()
