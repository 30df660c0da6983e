"""Peak memory of ``fit`` in memory and streamed under ``--max-memory``, on one set.

Each fit runs in a fresh process that reports its own peak RSS (``VmHWM``) and its RSS
just before fitting (Python, torch, featcache imported, the store opened): the base. What
streaming promises is ``peak - base <= budget + overhead``, where the overhead is the head
(weights, gradients, optimizer state), a batch, and one decompressed chunk per reading thread.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["run_memory"]


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MiB. Not ru_maxrss: Linux carries that over
    from the parent across fork and exec, so a child would report the benchmark's own peak."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(store: str, key: str, max_memory: str, epochs: int, runs: str) -> None:
    import featcache

    featcache.open_store(store, mode="r").get_set(key)
    base = _status_mb("VmRSS")
    t = time.perf_counter()
    res = featcache.fit(store=store, set=key, head="mlp", epochs=epochs, patience=0, plots=False, device="cpu",
                        max_memory=max_memory, runs=runs)
    total = time.perf_counter() - t
    print(json.dumps({"base_rss_mb": base, "peak_rss_mb": _status_mb("VmHWM"), "streamed": any(n.startswith("streaming") for n in res.notes),
                      "load_s": res.seconds["load"], "epoch_s": sum(r["seconds"] for r in res.history) / len(res.history),
                      "total_s": total, "val_acc": res.metrics["val"]["top1"]}))


def run_memory(rows: int = 8000, val: int = 2000, dim: int = 25_088, budgets=("auto", "1GB", "256MB"),
               epochs: int = 2) -> list[dict]:
    from featcache.stream import memory_budget

    from .throughput import synthetic_set

    tmp = Path(tempfile.mkdtemp(prefix="featcache-mem-"))
    try:
        store = str(tmp / "s.zarr")
        key = synthetic_set(store, rows, dim, classes=10, val=val)
        need_mb = (rows + val) * dim * 4 / 2**20
        out = []
        for budget in budgets:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.memory", store, key, budget, str(epochs), str(tmp / "runs")],
                capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
            )
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            budget_mb = memory_budget(budget) / 2**20
            r.update(rows=rows + val, dim=dim, features_mb=need_mb, max_memory=budget, budget_mb=budget_mb,
                     fit_rss_mb=r["peak_rss_mb"] - r["base_rss_mb"])
            r["over_budget_mb"] = r["fit_rss_mb"] - min(budget_mb, need_mb)
            out.append(r)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
