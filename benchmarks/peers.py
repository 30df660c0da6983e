"""featcache against what people use without it, in one run on one machine, alternating.

* extract: ``featcache.extract`` (no environment set) against a plain ImageFolder-style
  DataLoader loop (2 workers, the model on every core) without and with glibc's
  ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` set at process start, HF ``datasets``
  ``.map(num_proc=N)`` with one torch thread per process and the same settings (when
  ``datasets`` is installed), and the bare forward on tensors decoded beforehand. Every way runs
  in a fresh process (allocator settings only count from process start) with the same model,
  preprocessing, batch size and images; images/s over the timed part, peak RSS of the process
  and of its largest child.
* load: a set's rows as float32, warm cache: featcache (what fit does) against ``np.load`` of
  a float32 ``.npy`` and an HF ``datasets`` column (``load_from_disk``, numpy format); GB/s of
  float32 delivered and bytes on disk per image.
* fit: ``featcache.fit`` mlp against a bare PyTorch loop over the ``np.load``-ed matrix, same
  model, optimizer, batch size and epochs, seconds per epoch (load included once).
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

__all__ = ["run_peers", "extract_ways", "load_ways", "fit_ways", "load_and_fit", "has_datasets"]

_BIG = str(2**40)
_REPO = str(Path(__file__).resolve().parents[1])


def has_datasets() -> bool:
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


def _spread(values: list[float]) -> str:
    return f"{min(values):.3g}-{max(values):.3g}"


# ------------------------------------------------------------------ extraction, one way per process

def _files(data: str) -> list[str]:
    from featcache.data import scan

    m = scan(data)
    return [str(m.root / it.path) for it in m.items]


def _peak() -> dict:
    """Peak RSS of this process (VmHWM: ``ru_maxrss`` would carry the parent's peak over exec) and of its
    largest finished child (forked children count the pages they share with this process)."""
    import resource

    hwm = next((int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")), 0)
    return {"peak_rss_mb": hwm / 1024,
            "child_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


_HF_MODEL: dict = {}


def _hf_batch(backbone: str, layer: str | None, weights: str, batch: dict) -> dict:
    """One HF ``.map`` batch: the model is built once per process, one torch thread each."""
    import torch

    from featcache.backbones import create_backbone
    from featcache.data import load_rgb

    if "b" not in _HF_MODEL:
        torch.set_num_threads(1)
        _HF_MODEL["b"] = create_backbone(backbone, layer, weights)
    b = _HF_MODEL["b"]
    x = torch.stack([b.transform(load_rgb(p)) for p in batch["path"]])
    with torch.inference_mode():
        return {"features": b.model(x).reshape(len(x), -1).numpy()}


def _way(args: dict) -> dict:
    """One extraction way in this (fresh) process; returns images and seconds of the timed part."""
    import torch

    from featcache.backbones import create_backbone

    way, data, batch = args["way"], args["data"], args["batch_size"]
    if way == "featcache":
        import featcache

        t = time.perf_counter()
        r = featcache.extract(backbone=args["backbone"], layer=args["layer"], weights=args["weights"], data=data,
                              store=args["store"], batch_size=batch)
        return {"images": r.extracted, "seconds": time.perf_counter() - t,
                "timings": {k: round(v, 3) for k, v in r.timings.items()}, **_peak()}
    b = create_backbone(args["backbone"], args["layer"], args["weights"])
    files = _files(data)
    from featcache.data import load_rgb

    if way == "bare":
        tensors = [b.transform(load_rgb(f)) for f in files]
        batches = [torch.stack(tensors[i : i + batch]) for i in range(0, len(tensors), batch)]
        t = time.perf_counter()
        with torch.inference_mode():
            for x in batches:
                b.model(x)
        return {"images": len(files), "seconds": time.perf_counter() - t, **_peak()}
    if way == "dataloader":
        from torch.utils.data import DataLoader

        class Files(torch.utils.data.Dataset):
            def __len__(self):
                return len(files)

            def __getitem__(self, i):
                return b.transform(load_rgb(files[i]))

        t = time.perf_counter()
        out = []
        with torch.inference_mode():
            for x in DataLoader(Files(), batch_size=batch, num_workers=args["workers"]):
                out.append(b.model(x).numpy())
        return {"images": sum(len(o) for o in out), "seconds": time.perf_counter() - t, **_peak()}
    if way == "hf_map":
        import functools

        import datasets

        datasets.disable_progress_bars()
        t = time.perf_counter()
        fn = functools.partial(_hf_batch, args["backbone"], args["layer"], args["weights"])  # by reference, not pickled
        ds = datasets.Dataset.from_dict({"path": files}).map(fn, batched=True, batch_size=batch,
                                                             num_proc=args["workers"], remove_columns=["path"],
                                                             cache_file_name=args["store"] + ".arrow")
        return {"images": len(ds), "seconds": time.perf_counter() - t, **_peak()}
    raise ValueError(way)


def _run_way(args: dict, env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra)
    env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
    code = "import json,sys; from benchmarks.peers import _way; print('RESULT ' + json.dumps(_way(json.loads(sys.argv[1]))))"
    p = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{args['way']} failed: {p.stderr[-2000:]}")
    return json.loads(lines[-1][7:])


def extract_ways(data: str, backbone: str, layer: str | None = None, weights: str = "DEFAULT", batch_size: int = 64,
                 workers: int = 2, repeats: int = 3) -> list[dict]:
    """Each way ``repeats`` times, alternating; one row per way with the median images/s and the spread."""
    alloc = {"MALLOC_MMAP_THRESHOLD_": _BIG, "MALLOC_TRIM_THRESHOLD_": _BIG}
    ways = [("featcache", "featcache extract (no env)", {}), ("dataloader", "DataLoader loop", {}),
            ("dataloader", "DataLoader loop + malloc env", alloc)]
    if has_datasets():
        ways.append(("hf_map", "HF datasets .map + malloc env", alloc))
    ways.append(("bare", "bare forward + malloc env", alloc))
    runs: dict[str, list[dict]] = {label: [] for _, label, _ in ways}
    tmp = Path(tempfile.mkdtemp(prefix="featcache-peers-"))
    try:
        for i in range(repeats):
            for way, label, env in ways:
                args = {"way": way, "data": data, "backbone": backbone, "layer": layer, "weights": weights,
                        "batch_size": batch_size, "workers": workers, "store": str(tmp / f"{way}-{i}.zarr")}
                runs[label].append(_run_way(args, env))
                shutil.rmtree(tmp / f"{way}-{i}.zarr", ignore_errors=True)
                for f in tmp.glob("*.arrow"):
                    f.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for _, label, _ in ways:
        rates = [r["images"] / r["seconds"] for r in runs[label]]
        k = int(np.argsort(rates)[len(rates) // 2])
        rows.append({"backbone": backbone, "way": label, "images": runs[label][k]["images"],
                     "ips": float(np.median(rates)), "spread": _spread(rates), "runs": [round(x, 2) for x in rates],
                     "peak_rss_mb": runs[label][k]["peak_rss_mb"], "child_peak_rss_mb": runs[label][k]["child_peak_rss_mb"],
                     "timings": runs[label][k].get("timings")})
    ours = rows[0]["ips"]
    peers = [r["ips"] for r in rows[1:] if not r["way"].startswith("bare")]
    bare = [r["ips"] for r in rows if r["way"].startswith("bare")][0]
    for r in rows:
        r["featcache_over"] = ours / r["ips"]
    rows[0]["over_fastest_peer"] = ours / max(peers)
    rows[0]["over_bare"] = ours / bare
    return rows


# ------------------------------------------------------------------ loading and fitting

def _featcache_rows(store: str, key: str):
    import featcache
    from featcache.stream import RowReader

    st = featcache.open_store(store)
    fs = st.get_set(key)
    hashes = list(fs.hashes("train")) + list(fs.hashes("val"))
    return st, fs, lambda: RowReader(st, fs.space, hashes, fs.shape).load()


def load_ways(store: str, key: str, label: str, repeats: int = 5) -> list[dict]:
    """featcache, np.load and (when installed) an HF column for the rows of set ``key``, warm, alternating."""
    st, fs, load = _featcache_rows(store, key)
    ref = load()  # warm-up (page cache, index)
    tmp = Path(tempfile.mkdtemp(prefix="featcache-load-"))
    try:
        np.save(tmp / "x.npy", ref)
        ways = {"featcache": load, "np.load": lambda: np.load(tmp / "x.npy", allow_pickle=False)}
        disk = {"featcache": st.space_stats(fs.space)["bytes_stored"] / len(ref),
                "np.load": (tmp / "x.npy").stat().st_size / len(ref)}
        if has_datasets():
            import datasets
            import pyarrow as pa

            datasets.disable_progress_bars()
            flat = ref.reshape(len(ref), -1)
            col = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
            datasets.Dataset(pa.table({"features": col})).save_to_disk(str(tmp / "hf"))
            disk["HF datasets"] = sum(f.stat().st_size for f in (tmp / "hf").rglob("*.arrow")) / len(ref)

            def hf():
                ds = datasets.load_from_disk(str(tmp / "hf")).with_format("numpy")
                return np.array(ds["features"], dtype=np.float32, copy=True)  # in memory, as np.load delivers

            ways["HF datasets"] = hf
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(repeats):
            for name, f in ways.items():
                t = time.perf_counter()
                x = f()
                times[name].append(time.perf_counter() - t)
                if not np.array_equal(np.asarray(x).reshape(ref.shape), ref):
                    raise AssertionError(f"{name} returned other rows")
                del x
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gb = ref.nbytes / 1e9
    rows = []
    for name, ts in times.items():
        rates = [gb / t for t in ts]
        rows.append({"features": label, "shape": "x".join(map(str, fs.shape)), "rows": len(ref), "way": name,
                     "gbs": float(np.median(rates)), "spread": _spread(rates), "bytes_per_image": disk[name]})
    ours = rows[0]["gbs"]
    for r in rows:
        r["featcache_over"] = ours / r["gbs"]
    return rows


def fit_ways(store: str, key: str, epochs: int = 5, batch_size: int = 64, repeats: int = 3) -> list[dict]:
    """featcache.fit mlp against a bare loop over the np.load-ed rows (load included), alternating."""
    import torch
    from torch import nn

    import featcache
    from featcache.heads import MLPHead

    st, fs, load = _featcache_rows(store, key)
    tmp = Path(tempfile.mkdtemp(prefix="featcache-fitp-"))
    ours, bare = [], []
    try:
        np.save(tmp / "x.npy", fs.store.gather(fs.space, fs.hashes("train"), fs.shape, fs.record.dtype).astype(np.float32))
        y = torch.from_numpy(fs.labels("train").astype(np.int64))
        for i in range(repeats):
            t = time.perf_counter()
            featcache.fit(head="mlp", store=store, set=key, epochs=epochs, batch_size=batch_size, patience=0, plots=False,
                          device="cpu", runs=str(tmp / f"runs{i}"))
            ours.append((time.perf_counter() - t) / epochs)
            t = time.perf_counter()
            x = torch.from_numpy(np.load(tmp / "x.npy", allow_pickle=False)).reshape(len(y), -1)
            torch.manual_seed(0)
            model = MLPHead()._build_module(x.shape[1], len(fs.classes))
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            loss_fn = nn.CrossEntropyLoss()
            for _ in range(epochs):
                model.train()
                for idx in torch.randperm(len(y)).split(batch_size):
                    loss = loss_fn(model(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            bare.append((time.perf_counter() - t) / epochs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [{"rows": len(y), "epochs": epochs, "featcache_epoch_s": float(np.median(ours)), "featcache_spread": _spread(ours),
             "bare_epoch_s": float(np.median(bare)), "bare_spread": _spread(bare),
             "featcache_over_bare": float(np.median(ours)) / float(np.median(bare))}]


def load_and_fit(data: str, name: str, layer: str | None, weights: str, spatial_layer: str | None = None,
                 batch_size: int = 64, repeats: int = 3, epochs: int = 5) -> dict:
    """Load (pooled, and spatial at ``spatial_layer``) and fit on one backbone's features of ``data``."""
    import featcache

    tmp = Path(tempfile.mkdtemp(prefix="featcache-peerstore-"))
    try:
        store = str(tmp / "s.zarr")
        pooled = featcache.extract(backbone=name, layer=layer, weights=weights, data=data, store=store).set_key
        load = load_ways(store, pooled, "pooled", repeats)
        if spatial_layer:
            spatial = featcache.extract(backbone=name, layer=spatial_layer, pool="none", weights=weights, data=data,
                                        store=store).set_key
            load += load_ways(store, spatial, "spatial", repeats)
        fit = fit_ways(store, pooled, epochs, batch_size, repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"load": load, "fit": fit}


def run_peers(data: str, cases: list[tuple[str, str | None, str]], spatial_layer: str | None = None,
              batch_size: int = 64, workers: int = 2, repeats: int = 3, epochs: int = 5) -> dict:
    """Extraction for every case; load and fit on the last case's features (pooled, and spatial at ``spatial_layer``)."""
    extract = []
    for name, layer, weights in cases:
        extract += extract_ways(data, name, layer, weights, batch_size, workers, repeats)
    return {"extract": extract, **load_and_fit(data, *cases[-1], spatial_layer, batch_size, repeats, epochs)}
