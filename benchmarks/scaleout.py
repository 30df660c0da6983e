"""One process against ``torchrun --nproc_per_node N``: wall time of the same extract, each
into a fresh store, process start and model build included (both pay them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["run_scaleout"]

ROOT = Path(__file__).resolve().parents[1]


def run_scaleout(data: str, backbone: str, layer: str | None, weights: str, procs=(1, 2), batch_size: int = 64) -> list[dict]:
    from featcache.data import scan

    images = len(scan(data).items)
    args = ["extract", "--backbone", backbone, "--weights", weights, "--data", data, "--batch-size", str(batch_size),
            "--no-progress"] + (["--layer", layer] if layer else [])
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="featcache-scale-"))
    try:
        for n in procs:
            store = str(tmp / f"p{n}.zarr")
            if n == 1:
                cmd = [sys.executable, "-m", "featcache.cli", *args, "--store", store]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                       "-m", "featcache.cli", *args, "--store", store]
            t = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, env={**os.environ})
            wall = time.perf_counter() - t
            rows.append({"backbone": backbone, "processes": n, "images": images, "wall_s": wall,
                         "images_per_s": images / wall})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in rows:
        r["speedup"] = rows[0]["wall_s"] / r["wall_s"]
    return rows
