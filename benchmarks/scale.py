"""How featcache's own costs grow with the number of images: tiny 8x8 PNGs, the tiny test backbone.

For each size (10k and 100k images by default, 1M with ``--million``), in a fresh temporary
folder (never in the repository): generate the images, extract them once, then measure, each
in a fresh process so that its peak memory (VmHWM) is its own:

* a re-run with nothing changed (median of ``rounds``), the share of it spent scanning and
  hashing the folder, its peak memory, and that peak above the process's memory before the
  extract started (featcache and the network's libraries imported: torchvision is imported lazily
  by newer code, so it is imported before the start on both sides), per image (what planning an
  extract holds);
* ``featcache ls``, then again once the store holds ``ls_sets`` sets over the same space (the first
  set recorded again for other folders, through the store call extract commits with), and their ratio;
* loading the set for fit (``load_fit_data``, what ``featcache fit`` does before training);
* files in the store per 10,000 rows;
* a new set in a full space (:func:`new_set_case`): a folder of 1,000 new images extracted into that
  store, whose space holds the size's rows, and the same into an empty store, then each set loaded for
  fit, every step in a fresh process; the ratios full / empty (the issue's target: within 1.5x).

``run_big_space`` does the last case alone over a space of many rows written through the store API
(random keys and rows, so it needs no million real images): ``python -m benchmarks scale --big-space 1000000``.

Then the growth of each number from one size to the next. ``code`` chooses the featcache the
measuring processes import (``PYTHONPATH``); ``against`` measures a second checkout on the same
folder and store, alternating with the first, and the ratios are printed:
``python -m benchmarks scale --against /path/to/main``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["run_scale", "make_images", "growth", "new_set_case", "run_big_space"]

REPO = Path(__file__).resolve().parents[1]
TINY = "tests.tiny_backbone:tiny_cnn"
CLASSES = ("a", "b")

# Runs in a fresh interpreter: argv[1] is a JSON job; prints one JSON line of results.
_CHILD = r"""
import json, os, sys, time

def mem(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0

job = json.loads(sys.argv[1])
import featcache
import importlib
E = importlib.import_module("featcache.extract")
try:
    from featcache.config import FitConfig
except ImportError:  # a checkout from before config.py held it (--against an older commit)
    from featcache.fit import FitConfig
try:
    from featcache.prepare import load_fit_data
    from featcache.heads import head_class
    def load(cfg, fs, klass=head_class("logreg")):  # resolved (sklearn imported) before the clock starts
        return load_fit_data(cfg, klass, fs)
except ImportError:  # a checkout from before prepare.py (--against an older commit)
    from featcache.fit import load_fit_data
    def load(cfg, fs):
        return load_fit_data(cfg, fs)

import torchvision  # noqa: F401  (the network's library: imported lazily by newer code, counted by none)
out = {}
base = mem("VmRSS")
warm = base
if job["op"] == "extract":
    # torch's first model build (its allocator, thread pools, FX's first trace: about 10 MB, the same at any
    # size) is done once before the clock, so the peak can also be read above a process that has built one
    from featcache import backbones
    try:
        backbones.create_backbone(job["backbone"], None, "none", None)
    except TypeError:  # an older signature
        backbones.create_backbone(job["backbone"], None, "none")
    warm = mem("VmRSS")
if job["op"] == "extract":
    spent = {"scan": 0.0}
    real = E.scan
    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            spent["scan"] += time.perf_counter() - t
    E.scan = timed
    t = time.perf_counter()
    r = featcache.extract(data=job["data"], store=job["store"], backbone=job["backbone"], weights="none",
                          workers=job.get("workers"))
    out.update(seconds=time.perf_counter() - t, scan_s=spent["scan"], set=r.set_key, extracted=r.extracted,
               images=r.images)
elif job["op"] == "ls":
    import io
    from featcache.cli import main
    t = time.perf_counter()
    stdout = sys.stdout
    sys.stdout = io.StringIO()
    try:
        main(["ls", "--store", job["store"], "--json"], standalone_mode=False)
        listed = json.loads(sys.stdout.getvalue())["sets"]
    finally:
        sys.stdout = stdout
    out.update(seconds=time.perf_counter() - t, sets=len(listed), sized=sum(s["bytes"] is not None for s in listed))
elif job["op"] == "sets":
    import numpy as np
    from featcache.keys import set_key
    st = featcache.open_store(job["store"])
    fs = st.get_set(job["set"])
    r = fs.record
    arrays = {s: {"sha256": fs.hashes(s), "labels": fs.labels(s), "paths": np.array(fs.paths(s))} for s in fs.splits}
    t = time.perf_counter()
    for i in range(job["count"]):
        root = f"{r.data_root}-team{i + 1}"
        attrs = {**r.to_attrs(), "data_root": root, "skipped": fs.skipped(), "ignored": fs.ignored()}
        st.write_set(set_key(r.space, r.manifest_sha256, root, r.split_fractions, r.split_seed, r.views, r.view_space),
                     attrs, arrays)
    out["seconds"] = time.perf_counter() - t
elif job["op"] == "space":
    fs = featcache.open_store(job["store"]).get_set(job["set"])
    out.update(space=fs.space, shape=list(fs.shape), dtype=fs.record.dtype)
elif job["op"] == "load":
    t = time.perf_counter()
    fs = featcache.open_store(job["store"]).get_set(job["set"])
    data, _, _ = load(FitConfig(head="logreg", set=job["set"], store=job["store"]), fs)
    out.update(seconds=time.perf_counter() - t, rows=sum(len(y) for _, y in data.values()))
out.update(base_rss=base, warm_rss=warm, peak_rss=mem("VmHWM"))
print("RESULT " + json.dumps(out))
"""


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` distinct random 8x8 PNGs in train/ and val/ (80/20) class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    n_train = int(n * 0.8)
    dirs = {}
    for split in ("train", "val"):
        for c in CLASSES:
            (folder / split / c).mkdir(parents=True, exist_ok=True)
            dirs[split, c] = folder / split / c
    pixels = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    pixels[:, 0, 0, :] = np.stack([np.arange(n) % 256, np.arange(n) // 256 % 256, np.arange(n) // 65536], axis=1)
    for i in range(n):  # pixel (0, 0) numbers the image, so every file's bytes differ
        split = "train" if i < n_train else "val"
        Image.fromarray(pixels[i]).save(dirs[split, CLASSES[i % 2]] / f"{i:07d}.png")


def _child(job: dict, code: Path, env: dict) -> dict:
    print(f"  {job['op']} ({code.name})", file=sys.stderr, flush=True)
    run = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(job)], capture_output=True, text=True,
                         env={**env, "PYTHONPATH": str(code)}, cwd=str(code))
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if run.returncode != 0 or line is None:
        raise RuntimeError(f"{job['op']} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def _count_files(path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def _ls(store: Path, code: Path, env: dict, sets: int) -> dict:
    """``featcache ls --json`` in a fresh process; it must list ``sets`` sets, each with its size."""
    r = _child({"op": "ls", "store": str(store)}, code, env)
    if (r["sets"], r["sized"]) != (sets, sets):
        raise RuntimeError(f"ls listed {r['sets']} sets, {r['sized']} with a size; {sets} expected")
    return r


def _row(n: int, reruns: list[dict], ls: dict, load: dict) -> dict:
    if any(r["extracted"] for r in reruns):
        raise RuntimeError("a re-run with nothing changed computed rows")
    mid = sorted(reruns, key=lambda r: r["seconds"])[len(reruns) // 2]
    return {
        "images": n, "rerun_s": mid["seconds"], "rerun_runs_s": [r["seconds"] for r in reruns],
        "rerun_scan_s": mid["scan_s"], "scan_share": mid["scan_s"] / mid["seconds"],
        "rerun_peak_mb": mid["peak_rss"] / 2**20, "plan_bytes_per_image": (mid["peak_rss"] - mid["base_rss"]) / n,
        "plan_bytes_per_image_warm": (mid["peak_rss"] - mid.get("warm_rss", mid["base_rss"])) / n,
        "plan_peak_above_warm_mb": (mid["peak_rss"] - mid.get("warm_rss", mid["base_rss"])) / 2**20,
        "ls_s": ls["seconds"], "ls_peak_mb": ls["peak_rss"] / 2**20,
        "load_s": load["seconds"], "load_peak_mb": load["peak_rss"] / 2**20, "load_rows": load["rows"],
    }


def run_scale(sizes=(10_000, 100_000), code: str | os.PathLike | None = None, rounds: int = 3,
              workers: int | None = None, tmp: str | None = None,
              against: str | os.PathLike | None = None, ls_sets: int = 20,
              new_set: int = 1000) -> dict[str, list[dict]]:
    """Rows per size (see the module docstring) for ``code`` (default: this checkout) and, when given,
    ``against``: another checkout measured on the same folder and store, their re-runs alternating
    (the first extract and the other ``ls_sets - 1`` sets are made by ``code``, so they carry what it
    records, and ``against`` reads them as it reads any set; a warm-up re-run of each fills any cache it keeps)."""
    codes = {"code": Path(code or REPO).resolve()}
    if against is not None:
        codes = {"against": Path(against).resolve(), **codes}
    out: dict[str, list[dict]] = {k: [] for k in codes}
    for n in sizes:
        top = Path(tempfile.mkdtemp(prefix="featcache-scale-", dir=tmp))
        try:
            data, store = top / "data", top / "s.zarr"
            envs = {k: {**os.environ, "FEATCACHE_SCAN_CACHE": str(top / f"scan-cache-{k}"), "HF_HUB_OFFLINE": "1"}
                    for k in codes}
            print(f"{n} images", file=sys.stderr, flush=True)
            t = time.perf_counter()
            make_images(data, n)
            make_s = time.perf_counter() - t
            time.sleep(2.5)  # the folder exists before the first extract, as a downloaded data set does
            job = {"op": "extract", "data": str(data), "store": str(store), "backbone": TINY, "workers": workers}
            first = _child(job, codes["code"], envs["code"])
            warm = {k: _child(job, c, envs[k]) for k, c in codes.items()}
            reruns: dict[str, list[dict]] = {k: [] for k in codes}
            for _ in range(rounds):  # alternating, so both see the same load on a shared machine
                for k, c in codes.items():
                    reruns[k].append(_child(job, c, envs[k]))
            for k, c in codes.items():
                ls = _ls(store, c, envs[k], 1)
                load = _child({"op": "load", "store": str(store), "set": first["set"]}, c, envs[k])
                out[k].append({**_row(n, reruns[k], ls, load), "warm_rerun_s": warm[k]["seconds"]})
            files = _count_files(store)
            made = _child({"op": "sets", "store": str(store), "set": first["set"], "count": ls_sets - 1}, codes["code"],
                          envs["code"])
            for k, c in codes.items():
                many = _ls(store, c, envs[k], ls_sets)
                out[k][-1].update(ls_sets=ls_sets, ls_many_s=many["seconds"], ls_many_peak_mb=many["peak_rss"] / 2**20,
                                  ls_many_over_one=many["seconds"] / out[k][-1]["ls_s"],
                                  set_commit_s=made["seconds"] / max(ls_sets - 1, 1))
            if new_set:
                case = new_set_case(store, n, codes, envs, top, rounds, new_set, workers)
                for k in codes:
                    out[k][-1].update(case[k])
        finally:
            shutil.rmtree(top, ignore_errors=True)
        for k in codes:
            out[k][-1].update(make_s=make_s, first_s=first["seconds"], files=files, files_per_10k=files * 10_000 / n)
    return out


NEW_SET_KEYS = ("new_extract_empty_s", "new_extract_full_s", "new_extract_ratio", "new_extract_peak_empty_mb",
                "new_extract_peak_full_mb", "new_load_empty_s", "new_load_full_s", "new_load_ratio",
                "new_load_peak_empty_mb", "new_load_peak_full_mb")


def _median(values: list[float]) -> float:
    return float(np.median(values))


def new_set_case(full: Path, space_rows: int, codes: dict[str, Path], envs: dict[str, dict], top: Path, rounds: int = 3,
                 n: int = 1000, workers: int | None = None) -> dict[str, dict]:
    """Per checkout: a folder of ``n`` new images extracted into ``full`` (whose space holds ``space_rows``
    rows) and into a new empty store, then each new set loaded for fit; every step a fresh process, the
    two stores alternating (which goes first alternates too), ``rounds`` times, each round and checkout
    with a folder of its own so that every extract computes all ``n`` rows. Medians, and full / empty."""
    folders = {}
    for r in range(rounds):
        for k in codes:
            folders[k, r] = top / f"new-{k}-{r}"
            make_images(folders[k, r], n, seed=1000 + 17 * r + len(folders))
    time.sleep(2.5)  # as for the first extract: the folder exists before it is extracted
    runs: dict[str, dict[str, list]] = {k: {} for k in codes}
    for r in range(rounds):
        for k, c in codes.items():
            empty = top / f"empty-{k}-{r}.zarr"
            order = [("empty", empty), ("full", full)]
            for which, store in order if r % 2 == 0 else order[::-1]:
                job = {"op": "extract", "data": str(folders[k, r]), "store": str(store), "backbone": TINY,
                       "workers": workers}
                ex = _child(job, c, envs[k])
                if ex["extracted"] != n:
                    raise RuntimeError(f"the new folder extracted {ex['extracted']} rows into the {which} store, not {n}")
                ld = _child({"op": "load", "store": str(store), "set": ex["set"]}, c, envs[k])
                if ld["rows"] != n:
                    raise RuntimeError(f"the new set loaded {ld['rows']} rows, not {n}")
                got = runs[k]
                got.setdefault(f"new_extract_{which}_s", []).append(ex["seconds"])
                got.setdefault(f"new_extract_peak_{which}_mb", []).append(ex["peak_rss"] / 2**20)
                got.setdefault(f"new_load_{which}_s", []).append(ld["seconds"])
                got.setdefault(f"new_load_peak_{which}_mb", []).append(ld["peak_rss"] / 2**20)
            shutil.rmtree(empty, ignore_errors=True)
    out = {}
    for k, got in runs.items():
        row = {key: _median(v) for key, v in got.items()}
        row.update({f"{key}_runs": v for key, v in got.items()})
        for step in ("extract", "load"):
            pairs = [f / e for f, e in zip(got[f"new_{step}_full_s"], got[f"new_{step}_empty_s"])]
            row[f"new_{step}_ratio"] = row[f"new_{step}_full_s"] / row[f"new_{step}_empty_s"]
            row[f"new_{step}_ratio_runs"] = pairs
        out[k] = {"new_set_images": n, "new_set_space_rows": space_rows, **row}
    return out


def fill_space(url: str, space: str, rows: int, shape: tuple[int, ...], dtype: str, seed: int = 0,
               per_segment: int = 100_000) -> float:
    """``rows`` rows of random keys and finite random values in ``space``, segments of ``per_segment`` rows,
    through the store calls extract writes with. Returns the seconds taken."""
    import featcache
    from featcache.store.segments import arrays_to_keys

    t = time.perf_counter()
    st = featcache.open_store(url)
    rng = np.random.default_rng(seed)
    for start in range(0, rows, per_segment):
        m = min(per_segment, rows - start)
        keys = arrays_to_keys(rng.integers(0, 256, (m, 32), dtype=np.uint8))
        writer = st.new_segment(space, m, shape, dtype)
        for a in range(0, m, 20_000):
            b = min(m, a + 20_000)
            writer.append(rng.standard_normal((b - a, *shape)).astype(dtype), keys[a:b])
        writer.commit()
    return time.perf_counter() - t


def run_big_space(rows: int = 1_000_000, code: str | os.PathLike | None = None, rounds: int = 3,
                  workers: int | None = None, tmp: str | None = None, against: str | os.PathLike | None = None,
                  n: int = 1000) -> dict[str, dict]:
    """:func:`new_set_case` over a space of ``rows`` rows: a folder of 16 images extracted first makes the
    space (the tiny backbone's), then :func:`fill_space` writes the rest of the rows into it."""
    codes = {"code": Path(code or REPO).resolve()}
    if against is not None:
        codes = {"against": Path(against).resolve(), **codes}
    top = Path(tempfile.mkdtemp(prefix="featcache-bigspace-", dir=tmp))
    try:
        envs = {k: {**os.environ, "FEATCACHE_SCAN_CACHE": str(top / f"scan-cache-{k}"), "HF_HUB_OFFLINE": "1"}
                for k in codes}
        seed_folder, store = top / "seed", top / "s.zarr"
        make_images(seed_folder, 16, seed=99)
        first = _child({"op": "extract", "data": str(seed_folder), "store": str(store), "backbone": TINY,
                        "workers": workers}, codes["code"], envs["code"])
        info = _child({"op": "space", "store": str(store), "set": first["set"]}, codes["code"], envs["code"])
        print(f"  writing {rows} rows into space {info['space']}", file=sys.stderr, flush=True)
        fill_s = fill_space(str(store), info["space"], rows - 16, tuple(info["shape"]), info["dtype"])
        load = os.getloadavg()
        case = new_set_case(store, rows, codes, envs, top, rounds, n, workers)
        for k in codes:
            case[k].update(fill_s=fill_s, files=_count_files(store), load_before=load, load_after=os.getloadavg())
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return case


GROWTH_KEYS = ("rerun_s", "rerun_scan_s", "rerun_peak_mb", "plan_bytes_per_image", "ls_s", "ls_many_s", "load_s", "files")


def growth(rows: list[dict]) -> list[dict]:
    """Each measured number at one size over the same number at the size before; and the planning peak's growth
    per added image (above the warm start: what each more image costs the planning process)."""
    out = []
    for a, b in zip(rows, rows[1:]):
        added = b.get("plan_peak_above_warm_mb", 0) - a.get("plan_peak_above_warm_mb", 0)
        out.append({"step": f"{a['images']} -> {b['images']}", "images_x": b["images"] / a["images"],
                    **{k: b[k] / a[k] if a.get(k) else None for k in GROWTH_KEYS},
                    "plan_bytes_per_added_image": added * 2**20 / (b["images"] - a["images"])})
    return out
