"""The stages every command that pushes images through a backbone shares: reader → model.

:class:`Images` reads each file once, checks its bytes against the SHA-256 they were looked
up (or stored) under and decodes those bytes; :func:`run_backbone` feeds it through DataLoader
workers in batches to the model, with a progress bar, and yields the features batch by batch
(so memory stays bounded by a batch, whatever the number of images); :func:`checked` keeps
anything non-finite or lost in the cast out of the store. ``extract``, ``evaluate`` and
``predict`` all run on these, through :mod:`featcache.compute` (whose writer commits the rows).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .backbones import Backbone, Joint, autocast, resolve_precision
from .data import decode_bytes, open_regular
from .errors import DataError, FeatcacheError
from .procs import forked_batches, model_processes
from .progress import Progress, progress_bar
from .runtime import keep_memory

__all__ = ["Batch", "Images", "run_backbone", "resolve_device", "progress_bar", "checked", "finite_rows",
           "cast_error", "MAX_CAST_ERROR"]


class _Item(Protocol):
    path: str
    sha256: str


def _augmenter(spec: dict):
    from torchvision.transforms import v2

    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(spec["size"], scale=tuple(spec["scale"]), ratio=tuple(spec["ratio"]), antialias=True),
        v2.RandomHorizontalFlip(spec["flip_p"]),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(spec["mean"], spec["std"]),
    ])


class Images(Dataset):
    """Decodes and preprocesses one image (or one seeded augmented view); a failure is returned, not raised.

    ``items`` have a ``path`` (relative to ``root``, or absolute) and the ``sha256`` their bytes
    must still have when read."""

    def __init__(self, root: Path, items: Sequence[_Item], transform, views: list[int] | None = None,
                 augment: dict | None = None):
        self.root, self.items, self.transform = root, items, transform
        self.views, self.augment = views, augment
        self._aug = None

    def __len__(self) -> int:
        return len(self.items)

    def _view(self, img, item: _Item, k: int) -> torch.Tensor:
        if self._aug is None:
            self._aug = _augmenter(self.augment)
        # the same (image bytes, view, seed) always gives the same view, in any worker, on any run
        seed = int(item.sha256[:15], 16) ^ (k * 1_000_003) ^ self.augment["seed"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._aug(img)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            # The bytes that are decoded are the bytes that are hashed: a file rewritten since the
            # scan must not have the new image's features stored under the old bytes' key.
            with open_regular(self.root / item.path) as f:
                data = f.read()
            if hashlib.sha256(data).hexdigest() != item.sha256:
                return i, None, "changed while reading (its bytes differ from when it was scanned); re-run to extract it"
            img = decode_bytes(data)
            if self.views is not None:
                return i, self._view(img, item, self.views[i]), None
            return i, self.transform(img), None
        except Exception as e:  # Pillow raises many types for bad files; each becomes a recorded skip
            return i, None, f"cannot decode: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


def _collate(batch):
    ok = [(i, t) for i, t, err in batch if err is None]
    bad = [(i, err) for i, _, err in batch if err is not None]
    tensor = torch.stack([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], tensor, bad


@dataclass
class Batch:
    """One batch out of the model: item positions, their features (float32, on the CPU; a list with one array per
    layer for a :class:`Joint`) and the items that failed."""

    indices: list[int]
    features: np.ndarray | list[np.ndarray] | None
    failed: list[tuple[int, str]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when there is one, else the CPU; ``cuda`` where there is none is an error for ``--device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FeatcacheError("CUDA is not available on this machine; valid here: auto, cpu", param="device")
    return torch.device(name)


def run_backbone(backbone: Backbone | Joint, root: Path, items: Sequence[_Item], *, device: str = "auto",
                 precision: str = "auto", batch_size: int = 64, workers: int | None = None, compile: bool = False,
                 progress: bool = False, desc: str = "extract", views: list[int] | None = None,
                 augment: dict | None = None, timings: dict[str, float] | None = None) -> Iterator[Batch]:
    """Decode ``items`` and push them through the backbone, one :class:`Batch` at a time, in order.

    ``workers=None`` on the CPU: forked model processes that each decode their own batches
    (:mod:`featcache.procs`), or, for a single batch, everything in this process. Elsewhere, or
    with ``workers`` given: DataLoader workers decode (``None``: min(8, CPUs)) and the model
    runs here. ``timings`` (if given) accumulates seconds this process waited for batches
    (``read``) and spent in the model (``model``); with model processes also their seconds
    decoding (``decode``) and in the forward (``forward``), and their number (``processes``).
    The caller's code between batches runs outside inference mode and autocast.
    """
    if not items:
        return
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    model = backbone.model.to(dev)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    if compile:  # compiled on the first batch; a smaller last batch compiles once more
        model = torch.compile(model)
    precision = resolve_precision(precision, dev)
    spent = timings if timings is not None else {}
    spent.setdefault("read", 0.0)
    spent.setdefault("model", 0.0)
    keep_memory()  # freed activations stay in the process: no page is faulted in again per batch
    shapes = [tuple(p.shape) for p in backbone.parts] if isinstance(backbone, Joint) else None

    def split(feats: np.ndarray | None):
        """A joint's flat rows back into one array per part (each exactly what that part alone gives)."""
        if shapes is None or feats is None:
            return feats
        out, at = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            out.append(np.ascontiguousarray(feats[:, at:at + size]).reshape(len(feats), *shape))
            at += size
        return out

    dataset = Images(root, items, backbone.transform, views, augment)
    procs = 0 if compile else model_processes(dev, len(items), batch_size, workers)
    shown = Progress(progress_bar(len(items), progress, desc), procs + 1)
    if not compile:  # a compiled model is traced once; hooks would be traced into it
        shown.watch(model)
    try:
        if procs:
            spent["processes"] = float(procs)

            def forward(x: torch.Tensor) -> np.ndarray:
                with torch.inference_mode(), autocast(precision, dev):
                    return flat(model(x))

            source = forked_batches(forward, _collate, dataset, len(items), batch_size, procs, spent, shown)
        else:
            source = _in_process(model, dataset, len(items), batch_size, workers, dev, precision, spent, shown)
        with contextlib.closing(source):
            for indices, feats, bad in source:
                yield Batch(indices, split(feats), bad)
    finally:
        shown.close()


def flat(out) -> np.ndarray:
    """The model's output as float32 rows; a joint's tuple (one tensor per part) side by side, flattened."""
    if isinstance(out, (tuple, list)):
        return np.concatenate([o.float().cpu().reshape(len(o), -1).numpy() for o in out], axis=1)
    return out.float().cpu().numpy()


def _in_process(model, dataset: Images, n: int, batch_size: int, workers: int | None, dev: torch.device,
                precision: str, spent: dict[str, float], shown: Progress) -> Iterator[tuple[list[int], np.ndarray | None, list]]:
    """DataLoader workers decode, the model runs here on all its threads."""
    slot = shown.slot(0, decoding=False)
    cuda = dev.type == "cuda"
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if n > batch_size else 0
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate, pin_memory=cuda,
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    t = time.perf_counter()
    for indices, batch, bad in loader:
        spent["read"] += time.perf_counter() - t
        t = time.perf_counter()
        slot.start(len(indices) + len(bad))
        feats = None
        if batch is not None:
            with torch.inference_mode(), autocast(precision, dev):
                x = batch.to(dev, non_blocking=True)
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                feats = flat(model(x))
        spent["model"] += time.perf_counter() - t
        slot.finish()
        yield indices, feats, bad
        t = time.perf_counter()


def finite_rows(rows: np.ndarray) -> np.ndarray:
    """Per row: whether every value is finite."""
    return np.isfinite(rows.reshape(len(rows), -1)).all(axis=1) if len(rows) else np.zeros(0, bool)


def checked(out: np.ndarray, dtype: str, backbone: Backbone, items: Sequence[_Item]) -> np.ndarray:
    """The batch in the stored dtype; nothing non-finite is ever committed."""
    finite = finite_rows(out)
    if not finite.all():
        first = items[int(np.flatnonzero(~finite)[0])].path
        raise DataError(f"the backbone produced non-finite values (NaN or inf) at layer {backbone.layer} for "
                        f"{int((~finite).sum())} image(s), first {first}; nothing of this batch was stored")
    stored = out.astype(dtype)
    if not np.isfinite(stored).all():
        top = float(np.abs(out).max())
        raise DataError(f"features overflow {dtype} at layer {backbone.layer} (largest |value| {top:.3g}); "
                        "pass --dtype float32", param="dtype")
    if stored.dtype != out.dtype and len(out):
        lost = cast_error(out, stored)
        bad = lost > MAX_CAST_ERROR
        if bad.any():
            top = float(np.abs(out[bad]).max())
            raise DataError(f"features underflow {dtype} at layer {backbone.layer}: {int(bad.sum())} image(s) lose "
                            f"their values in the cast (relative L2 error up to {float(lost.max()):.3g}, largest "
                            f"|value| {top:.3g}; first {items[int(np.flatnonzero(bad)[0])].path}); nothing of this "
                            "batch was stored. Pass --dtype float32", param="dtype")
    return stored


MAX_CAST_ERROR = 1e-2  # float16 rounds a normal value within 5e-4; beyond 1% of a row, values fell into subnormals or 0


def cast_error(out: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """Per row: the relative L2 error of the cast to the stored dtype (0 for an all-zero row)."""
    if not len(out):
        return np.zeros(0, np.float32)
    x = out.reshape(len(out), -1).astype(np.float32, copy=False)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows are refused elsewhere
        if stored.dtype == np.float16:
            # float16 rounds a normal value within 2^-11 of itself and anything smaller by at most 2^-25, so a
            # row whose largest |value| is above this bound (nearly every row) is within 1% unchecked
            top = np.maximum(x.max(axis=1), -x.min(axis=1))
            suspect = ~(top >= np.sqrt(x.shape[1]) * 2.0**-24 / MAX_CAST_ERROR)
            errors = np.zeros(len(x), np.float32)
            if suspect.any():
                errors[suspect] = _cast_error(x[suspect], stored.reshape(len(x), -1)[suspect])
            return errors
        return _cast_error(x, stored.reshape(len(x), -1))


def _cast_error(x: np.ndarray, stored: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        # each row scaled by its largest |value| first, so squares of tiny values do not underflow in the norm
        top = np.abs(x).max(axis=1, keepdims=True)
        scale = np.divide(1.0, top, out=np.zeros_like(top), where=top > 0)
        diff = np.linalg.norm((x - stored.astype(np.float32)) * scale, axis=1)
        norm = np.linalg.norm(x * scale, axis=1)
        return np.divide(diff, norm, out=np.zeros_like(diff), where=norm > 0)
