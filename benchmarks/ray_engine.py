"""The same extract with the default engine and with ``--engine ray`` (a local Ray instance on this
machine's CPUs), as whole commands into fresh stores, side by side: wall time and images/s, CPU
seconds and peak memory of the command's whole process tree (Ray's own processes included), and
a Ray run with a model actor SIGKILLed midway. Start-up is included on both sides (each pays its own).

CPU seconds and memory come from sampling /proc every 0.2 s over the process tree: CPU is the sum
over processes of their last utime + stime seen, memory the largest sum of resident set sizes at
one moment (pages shared between processes, as Ray's object store, counted in each that touched them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["run_hashing", "run_ray"]

ROOT = Path(__file__).resolve().parents[1]
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p))
    found, todo = {pid}, [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


class _Sampler(threading.Thread):
    """CPU seconds and peak summed RSS of a process tree; optionally SIGKILLs the first model actor after a delay."""

    def __init__(self, pid: int, kill_actor_after_s: float | None = None):
        super().__init__(daemon=True)
        self.pid, self.kill_after = pid, kill_actor_after_s
        self.cpu: dict[int, float] = {}
        self.peak = 0
        self.killed: int | None = None
        self.seen_actor: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            rss = 0
            for p in _tree(self.pid):
                try:
                    fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
                    self.cpu[p] = (int(fields[11]) + int(fields[12])) / _TICK
                    rss += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * _PAGE
                    if self.kill_after is not None and self.killed is None:
                        cmd = Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
                        if "MapWorker" in cmd and "Forward" in cmd:
                            first = self.seen_actor.setdefault(p, time.monotonic())
                            if time.monotonic() - first >= self.kill_after:
                                os.kill(p, signal.SIGKILL)
                                self.killed = p
                except (OSError, IndexError, ValueError):
                    continue
            self.peak = max(self.peak, rss)
            self.stop.wait(0.2)


def _run(cmd: list[str], kill_actor_after_s: float | None = None) -> dict:
    t = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, start_new_session=True)
    sampler = _Sampler(p.pid, kill_actor_after_s)
    sampler.start()
    out, err = p.communicate()
    wall = time.perf_counter() - t
    sampler.stop.set()
    sampler.join()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    try:
        result = json.loads(out)
    except json.JSONDecodeError:
        raise RuntimeError(f"{' '.join(cmd)} printed no JSON on stdout:\n{out[-2000:]}\n{err[-3000:]}") from None
    return {"wall_s": wall, "cpu_s": sum(sampler.cpu.values()), "peak_rss_mb": sampler.peak / 2**20,
            "set": result["set"], "extracted": result["extracted"], "actor_killed": sampler.killed is not None,
            "extract_s": result["seconds"]}


def run_ray(data: str, backbone: str, layer: str | None, weights: str, batch_size: int = 64,
            kill_after_s: float = 15.0) -> list[dict]:
    from featcache.data import scan

    images = len(scan(data).items)
    base = ["extract", "--backbone", backbone, "--weights", weights, "--data", data, "--batch-size", str(batch_size),
            "--no-progress", "--json"] + (["--layer", layer] if layer else [])
    ray = ["--engine", "ray", "--ray-address", "local"]  # a private instance of its own, even where a cluster runs
    runs = (("default (one process + model processes)", [], None), ("--engine ray (local instance)", ray, None),
            ("--engine ray, a model actor SIGKILLed", ray, kill_after_s))
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="featcache-ray-"))
    try:
        for i, (name, extra, kill) in enumerate(runs):
            store = str(tmp / f"s{i}.zarr")
            cmd = [sys.executable, "-m", "featcache.cli", *base, "--store", store, *extra]
            r = _run(cmd, kill)
            rows.append({"engine": name, "backbone": backbone, "images": images, **r,
                         "images_per_s": images / r["wall_s"]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in rows:
        r["same_set"] = r["set"] == rows[0]["set"]
        r["wall_vs_default"] = r["wall_s"] / rows[0]["wall_s"]
    return rows


def run_hashing(files: int = 20_000, rounds: int = 3, block: int | None = None) -> list[dict]:
    """A scan of ``files`` tiny PNGs with every file hashed (no scan cache): the driver's threads against
    :class:`featcache.ray_hash.RayHasher` (blocks of ``block`` paths; default: the engine's, at least four tasks)
    on a private local instance, alternating,
    ``rounds`` times each. Ray is started once before the first round: its start-up is in :func:`run_ray`'s rows."""
    import statistics

    from featcache import ray_engine, ray_hash
    from featcache.data import scan

    from .scale import make_images

    tmp = Path(tempfile.mkdtemp(prefix="featcache-hash-"))
    try:
        make_images(tmp / "data", files)
        ray = ray_engine.connect("local")
        block = block or min(ray_hash.HASH_BLOCK, max(1, files // 4))  # at least four tasks
        hasher = ray_hash.RayHasher("local", block)
        times: dict[str, list[float]] = {"threads": [], "ray": []}
        tasks = 0
        for _ in range(rounds):
            for way in ("threads", "ray"):
                t = time.perf_counter()
                m = scan(tmp / "data", rehash=True, hasher=hasher if way == "ray" else None)
                times[way].append(time.perf_counter() - t)
                tasks = hasher.tasks if way == "ray" else tasks
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for way, spent in times.items():
        s = statistics.median(spent)
        rows.append({"way": "driver threads" if way == "threads" else f"Ray tasks ({tasks} of up to "
                     f"{block} paths)", "files": len(m.items), "rounds": rounds,
                     "median_s": s, "files_per_s": len(m.items) / s, "spread": f"{min(spent):.2f}-{max(spent):.2f}"})
    for r in rows:
        r["vs_threads"] = r["median_s"] / rows[0]["median_s"]
    return rows

