"""Store format 2 against format 1, in one run on one machine, each written and read by its own code.

Format 1 is the package as it was at ``OLD_REV`` (the last commit before format 2), taken from
this repository's history with ``git archive``; format 2 is this checkout. For each round, in
alternating order, both run as whole processes:

* ``featcache extract`` of the same folder into a fresh store (wall seconds);
* a read of every split of the new set through that version's own API,
  ``open_store(url).get_set().to_numpy(split)`` (seconds, best of 3 in the process, after one
  untimed read), as float32 GB/s.

Also recorded: files and bytes on disk, files per 10,000 images, and whether both versions
read back bit-identical features and the same labels.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

__all__ = ["OLD_REV", "run_formats"]

ROOT = Path(__file__).resolve().parents[1]
OLD_REV = "1452be5"  # the last commit whose store format is 1 (vlen-utf8 hashes and paths)

_READ = """
import hashlib, json, sys, time
import numpy as np
from featcache import open_store
fs = open_store(sys.argv[1]).get_set()
out = {"bytes": 0, "seconds": 0.0, "digest": hashlib.sha256()}
for split in ("train", "val", "test"):
    if not fs.attrs["splits"].get(split):
        continue
    x, y = fs.to_numpy(split)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        x, y = fs.to_numpy(split)
        best = min(best, time.perf_counter() - t)
    out["seconds"] += best
    out["bytes"] += x.astype(np.float32).nbytes
    out["digest"].update(np.ascontiguousarray(x, dtype=np.float32).tobytes())  # newer to_numpy gives float32
    out["digest"].update(np.asarray(y, dtype=np.int64).tobytes())
out["digest"] = out["digest"].hexdigest()
print(json.dumps(out))
"""


def _old_package(dest: Path, rev: str) -> Path:
    """The featcache package at ``rev``, unpacked under ``dest``; returns the folder to put on the path."""
    archive = dest / "old.tar"
    with archive.open("wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "featcache"], stdout=f, check=True)
    with tarfile.open(archive) as t:
        t.extractall(dest / "old", filter="data")
    return dest / "old"


def _run(argv: list[str], path: Path, cwd: Path) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys([str(path), str(ROOT)]))}  # ROOT: tests' backbones
    t = time.perf_counter()
    p = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ... failed: {p.stderr[-2000:]}")
    return seconds, p.stdout


def _disk(url: Path) -> tuple[int, int]:
    files = [p for p in url.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def run_formats(data: str, backbone: str = "efficientnet_lite0", weights: str = "DEFAULT", rounds: int = 3,
                workers: int | None = None, old_rev: str = OLD_REV) -> list[dict]:
    """One row per format: medians over ``rounds`` of extract seconds and read GB/s; files and bytes on disk."""
    tmp = Path(tempfile.mkdtemp(prefix="featcache-formats-"))
    try:
        paths = {1: _old_package(tmp, old_rev), 2: ROOT}
        seen: dict[int, dict] = {v: {"extract_s": [], "read_gbs": [], "digest": set()} for v in paths}
        for r in range(rounds):
            for version in ((1, 2) if r % 2 == 0 else (2, 1)):
                url = tmp / f"v{version}-{r}.zarr"
                argv = [sys.executable, "-c", "import sys; from featcache.cli import main; sys.exit(main())",
                        "extract", "--backbone", backbone, "--weights", weights, "--data", data, "--store", str(url),
                        "--no-progress"] + (["--workers", str(workers)] if workers is not None else [])
                seconds, _ = _run(argv, paths[version], tmp)
                _, out = _run([sys.executable, "-c", _READ, str(url)], paths[version], tmp)
                read = json.loads(out)
                files, size = _disk(url)
                s = seen[version]
                s["extract_s"].append(seconds)
                s["read_gbs"].append(read["bytes"] / read["seconds"] / 1e9)
                s["digest"].add(read["digest"])
                s.update(files=files, bytes=size)
                shutil.rmtree(url, ignore_errors=True)
        images = sum(1 for p in Path(data).rglob("*") if p.is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for version, s in seen.items():
        rows.append({"format": version, "code": old_rev if version == 1 else "this checkout", "rounds": rounds,
                     "extract_s": statistics.median(s["extract_s"]), "read_gbs": statistics.median(s["read_gbs"]),
                     "files": s["files"], "files_per_10k": s["files"] * 10_000 / max(images, 1), "bytes": s["bytes"],
                     "digests": sorted(s["digest"])})
    old = rows[0]
    same = seen[1]["digest"] == seen[2]["digest"] and len(seen[1]["digest"]) == 1
    for row in rows:
        row.update(extract_vs_old=row["extract_s"] / old["extract_s"], read_vs_old=row["read_gbs"] / old["read_gbs"],
                   bytes_vs_old=row["bytes"] / old["bytes"], same_rows=same)
    return rows
