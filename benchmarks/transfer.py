"""Cached training against end-to-end training, side by side, in one run on one machine.

End to end: the usual PyTorch transfer-learning loop. The frozen backbone (eval mode, no
grad) runs on every image every epoch from a DataLoader with workers; the head trains on
its output; validation runs every epoch.

Cached: ``featcache.extract`` once, then ``featcache.fit`` for the same epochs.

Both use the same images in the same order, the same backbone, head, initialisation,
optimizer, seed, batch size and batch order (no augmentation), so their validation
accuracies should agree within about one image (the cache holds float16).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import featcache
from featcache.backbones import create_backbone
from featcache.data import load_rgb
from featcache.heads import make_head

__all__ = ["run_transfer", "run_transfer_processes"]


class _Folder(Dataset):
    def __init__(self, root: Path, paths: list[str], labels: np.ndarray, transform):
        self.root, self.paths, self.labels, self.transform = root, paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(load_rgb(self.root / self.paths[i])), int(self.labels[i])


def _end_to_end(
    backbone_name: str,
    layer: str | None,
    weights: str,
    root: Path,
    split_items: dict[str, tuple[list[str], np.ndarray]],
    n_classes: int,
    head_params: dict,
    epochs: int,
    workers: int,
) -> dict:
    """The notebook loop; returns setup seconds and one row per epoch."""
    t0 = time.perf_counter()
    backbone = create_backbone(backbone_name, layer, weights)
    model = backbone.model.eval()
    dim = int(np.prod(backbone.shape))
    kind = head_params.pop("kind")
    proto = make_head(kind, **head_params)
    torch.manual_seed(proto.seed)  # same initialisation as featcache's head
    head = proto._build_module(dim, n_classes)
    gen = torch.Generator().manual_seed(proto.seed)  # same batch order as featcache's head
    opt = torch.optim.Adam(head.parameters(), lr=proto.lr, weight_decay=proto.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    train = _Folder(root, *split_items["train"], backbone.transform)
    val = _Folder(root, *split_items["val"], backbone.transform)

    def loader(ds, order=None):
        # A private generator keeps the DataLoader from drawing on the global RNG (dropout's).
        return DataLoader(
            ds if order is None else torch.utils.data.Subset(ds, order.tolist()),
            batch_size=proto.batch_size,
            num_workers=workers,
            generator=torch.Generator(),
        )

    setup = time.perf_counter() - t0
    rows = []
    for epoch in range(1, epochs + 1):
        t = time.perf_counter()
        order = torch.randperm(len(train), generator=gen)
        head.train()
        total = correct = 0.0
        for x, y in loader(train, order):
            with torch.no_grad():
                feats = model(x).flatten(1)
            logits = head(feats)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            correct += float((logits.argmax(1) == y).sum())
        head.eval()
        v_logits, v_y = [], []
        with torch.no_grad():
            for x, y in loader(val):
                v_logits.append(head(model(x).flatten(1)))
                v_y.append(y)
        vl, vy = torch.cat(v_logits), torch.cat(v_y)
        rows.append(
            {
                "epoch": epoch,
                "train_loss": total / len(train),
                "train_acc": correct / len(train),
                "val_loss": float(loss_fn(vl, vy)),
                "val_acc": float((vl.argmax(1) == vy).float().mean()),
                "seconds": time.perf_counter() - t,
            }
        )
    return {"setup_s": setup, "history": rows}


def _warm_up(data: Path, backbone: str, layer: str | None, weights: str) -> None:
    """Read every file once and run the network once, untimed, so neither side pays a cold start."""
    for p in data.rglob("*"):
        if p.is_file():
            p.read_bytes()
    b = create_backbone(backbone, layer, weights)
    crop = b.preprocessing.get("crop_size", [224])[0]
    with torch.no_grad():
        b.model(torch.zeros(8, 3, crop, crop))


def run_transfer(
    data: str,
    backbone: str,
    layer: str | None = None,
    weights: str = "DEFAULT",
    head: str = "mlp",
    epochs: tuple[int, ...] = (10, 30),
    workers: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> dict:
    """Time both ways; one result row per epoch count in ``epochs``."""
    import os

    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    max_epochs = max(epochs)
    _warm_up(Path(data), backbone, layer, weights)
    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-"))
    try:
        store = str(tmp / "store.zarr")
        t0 = time.perf_counter()
        ext = featcache.extract(
            backbone=backbone, layer=layer, weights=weights, data=data, store=store, workers=workers,
            batch_size=batch_size,
        )
        extract_s = time.perf_counter() - t0
        fs = featcache.open_store(store).get_set(ext.set_key)
        layer_text = ext_layer(fs)  # read while the store is there (it is removed below)
        split_items = {s: (fs.paths(s), fs.labels(s)) for s in ("train", "val")}
        head_params = {"kind": head, "lr": 1e-3, "batch_size": batch_size, "seed": seed, "patience": 0, "device": "cpu"}
        cached = {}
        for e in epochs:
            t = time.perf_counter()
            res = featcache.fit(
                head=head, set=ext.set_key, store=store, epochs=e, patience=0, seed=seed, batch_size=batch_size,
                device="cpu", runs=str(tmp / "runs"),
            )
            cached[e] = {"fit_s": time.perf_counter() - t, "history": res.history}
        e2e = _end_to_end(
            backbone, layer, weights, Path(data), split_items, len(fs.classes), head_params, max_epochs, workers
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n_val = len(split_items["val"][0])
    rows = []
    for e in epochs:
        e2e_hist = e2e["history"][:e]  # a run of e epochs is the first e epochs of the longer run
        e2e_epoch = float(np.mean([r["seconds"] for r in e2e_hist]))
        cached_epoch = float(np.mean([r["seconds"] for r in cached[e]["history"]]))
        e2e_total = e2e["setup_s"] + sum(r["seconds"] for r in e2e_hist)
        cached_total = extract_s + cached[e]["fit_s"]
        acc_e2e = e2e_hist[-1]["val_acc"]
        acc_cached = cached[e]["history"][-1]["val_acc"]
        rows.append(
            {
                "backbone": backbone,
                "layer": layer_text,
                "head": head,
                "epochs": e,
                "images": ext.images,
                "extract_s": extract_s,
                "e2e_epoch_s": e2e_epoch,
                "cached_epoch_s": cached_epoch,
                "e2e_total_s": e2e_total,
                "cached_total_s": cached_total,
                "epoch_speedup": e2e_epoch / cached_epoch,
                "total_speedup": e2e_total / cached_total,
                "total_speedup_per_epoch": e2e_total / cached_total / e,
                "val_acc_e2e": acc_e2e,
                "val_acc_cached": acc_cached,
                "val_images_apart": round(abs(acc_e2e - acc_cached) * n_val),
            }
        )
    return {"rows": rows, "weights": weights, "workers": workers, "batch_size": batch_size, "data": str(data)}


def ext_layer(fs) -> str:
    return f"{fs.attrs['layer']} ({'x'.join(map(str, fs.shape))})"


def run_transfer_processes(data: str, backbone: str = "resnet18", weights: str = "DEFAULT", head: str = "linear",
                           epochs: int = 10, rounds: int = 3, workers: int | None = None) -> dict:
    """Whole processes, started as a user starts them: ``featcache extract`` then ``featcache fit
    --head HEAD --epochs E`` (a fresh store each round, so the extract computes every row) against
    ``python benchmarks/e2e_script.py`` (the plain loop) for the same epochs. The two ways
    alternate, ``rounds`` times; times are wall seconds from start to exit, medians over rounds."""
    import os
    import statistics
    import sys

    from .cli import ROOT, _featcache, _wall

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    script = [sys.executable, str(ROOT / "benchmarks" / "e2e_script.py"), "--data", data, "--backbone", backbone,
              "--weights", weights, "--head", head, "--epochs", str(epochs)]
    if workers is not None:
        script += ["--workers", str(workers)]
    _warm_up(Path(data), backbone, None, weights)
    featcache_s, extract_s, e2e_s = [], [], []
    tmp = Path(tempfile.mkdtemp(prefix="featcache-processes-"))
    try:
        for i in range(rounds):
            store = str(tmp / f"s{i}.zarr")
            extract = ["extract", "--backbone", backbone, "--weights", weights, "--data", data, "--store", store,
                       "--no-progress"] + (["--workers", str(workers)] if workers is not None else [])
            fit = ["fit", "--head", head, "--epochs", str(epochs), "--store", store, "--runs", str(tmp / "runs")]
            first = _wall(_featcache(*extract), env, tmp)
            featcache_s.append(first + _wall(_featcache(*fit), env, tmp))
            extract_s.append(first)
            e2e_s.append(_wall(script, env, tmp))
            shutil.rmtree(store, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cached, e2e = statistics.median(featcache_s), statistics.median(e2e_s)
    return {"backbone": backbone, "weights": weights, "head": head, "epochs": epochs, "rounds": rounds,
            "featcache_s": cached, "featcache_extract_s": statistics.median(extract_s), "e2e_s": e2e,
            "speedup": e2e / cached, "speedups": [round(b / a, 2) for a, b in zip(featcache_s, e2e_s)],
            "featcache_all_s": featcache_s, "e2e_all_s": e2e_s}
