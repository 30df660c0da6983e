"""Backbone + trained head on new images: predict, and export as one self-contained module.

The backbone, layer, weights and preprocessing are those recorded with the run's feature
set; the rebuilt backbone's whole feature space (weights digest, preprocessing as applied,
decode recipe, layer, pool, a Hugging Face model's config and transformers version) is
checked against the run's, so a prediction never silently uses another network.
``predict`` streams: images whose bytes are already in the run's feature space are read from
its store, the others go through the extract pipeline's reader in batches (DataLoader
workers, a progress bar), so memory does not grow with the number of images.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import Backbone
from .data import IMAGE_EXTENSIONS
from .data.manifest import hash_all
from .errors import DataError, OutputError, os_error_text
from .heads import Head, head_from_record
from .lookup import RowCounts, load_run, run_rows, space_differences
from .persist import write_atomic
from .pooling import pool_tensor
from .runs import RunRecord
from .tails import RestNetwork

__all__ = ["Prediction", "Predictions", "Predictor", "predict", "export"]

_log = logging.getLogger("featcache.predict")


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]
    error: str | None = None

    def to_dict(self) -> dict:
        return {"path": self.path, "top": [{"class": c, "probability": p} for c, p in self.top], "error": self.error}


class Predictions(list):
    """The predictions, in the order of the files, plus where their features came from (``counts``)."""

    def __init__(self, items=(), counts: RowCounts | None = None):
        super().__init__(items)
        self.counts = counts or RowCounts()

    @property
    def notes(self) -> list[str]:
        return self.counts.notes


def _expand(paths: list[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS and not q.name.startswith("."))
        elif os.path.lexists(p):
            out.append(p)
        else:
            raise DataError(f"{str(p)!r} does not exist; pass image files or folders of them", param="paths")
    return out


class _Head(nn.Module):
    """A fitted head as a plain torch module: stored features → class probabilities."""

    def __init__(self, head: Head, pool: str, dtype: str):
        super().__init__()
        self.pool, self.round_trip = pool, dtype == "float16"
        self.keep_shape = head.takes_maps
        self.net = head.torch_module()

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if self.round_trip:  # the head was trained on float16-stored features
            feats = feats.half().float()
        feats = pool_tensor(feats, self.pool)
        x = feats if self.keep_shape else feats.flatten(1)
        return torch.softmax(self.net(x), dim=1)


class Predictor(nn.Module):
    """Normalised image batch (N, 3, H, W) → class probabilities (N, C)."""

    def __init__(self, backbone: Backbone, head: _Head):
        super().__init__()
        self.backbone = backbone.model
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _load(run: str | Path, backbone: str | None = None, weights: str | None = None, store: str | None = None,
          recompute: bool = True) -> tuple[Predictor, Backbone, RunRecord]:
    net, record = load_run(run, backbone, weights, store=store, recompute=recompute)
    head = _Head(head_from_record(record.head, str(run), RestNetwork(backbone)), record.config.pool, record.space_provenance["dtype"])
    return Predictor(net, head).eval(), net, record


@dataclass(frozen=True)
class _File:
    path: str
    sha256: str


def predict(run: str | Path, paths: list[str | Path], top_k: int = 5, batch_size: int = 32,
            backbone: str | None = None, weights: str | None = None, *, workers: int | None = None,
            device: str = "auto", progress: bool = False, store: str | None = None,
            recompute: bool = False) -> Predictions:
    """Top-k classes for each image, in the order given; unreadable files come back with ``error`` set.

    ``backbone``/``weights``: the user's --backbone/--weights, needed when the run's features came
    from a ``module:factory`` network or a weights file (never imported or read from the run).
    Rows already in the run's store are read, not computed (``result.counts`` says how many);
    ``store`` names where that store is now, ``recompute`` uses none (every image is computed).
    A path that does not exist is a :class:`DataError` for ``PATHS``."""
    files = _expand(paths)
    model, net, record = _load(run, backbone, weights, store, recompute)
    if not files:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, paths))}")
    classes = record.classes
    k = max(1, min(top_k, len(classes)))
    results: list[Prediction | None] = [None] * len(files)
    items, where = [], []
    for i, (f, h) in enumerate(zip(files, hash_all(files))):
        if isinstance(h, OSError):
            results[i] = Prediction(str(f), [], f"cannot read: {h.strerror or h}")
        else:
            items.append(_File(str(f), h[0]))
            where.append(i)

    def on_rows(positions: np.ndarray, feats: np.ndarray) -> None:
        with torch.inference_mode():
            proba = model.head(torch.from_numpy(feats)).numpy()
        for j, p in zip(positions.tolist(), proba):
            order = np.argsort(-p)[:k]
            results[where[j]] = Prediction(str(files[where[j]]), [(classes[c], float(p[c])) for c in order])

    counts = run_rows(record, net, Path("."), items, on_rows, device=device, batch_size=batch_size, workers=workers,
                      progress=progress, desc="predict")
    for j, reason in counts.failed.items():
        results[where[j]] = Prediction(str(files[where[j]]), [], reason)
    return Predictions(results, counts)


def export(run: str | Path, out: str | Path, backbone: str | None = None, weights: str | None = None) -> Path:
    """Write ``out`` (torch.export program: normalised images → probabilities) and ``out.json`` (classes, preprocessing)."""
    model, backbone, record = _load(run, backbone, weights)  # an exported program reads no store
    for note in space_differences(record, backbone)[1]:
        _log.warning("note: %s", note)
    crop = backbone.preprocessing.get("crop_size", [224])[0]
    example = torch.zeros(2, 3, crop, crop)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    out = Path(out)
    meta = {"classes": list(record.classes), "preprocessing": backbone.preprocessing, "input": [None, 3, crop, crop],
            "output": "class probabilities", "backbone": record.backbone, "layer": record.layer,
            "weights": record.weights, "head": record.config.head}
    # torch's archive writer aborts the process (a C++ exception in its destructor) when a write
    # fails, so it writes into memory and this process writes the bytes, where a full disk is an OSError
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    # each file appears whole or not at all; a program without its classes file is removed again
    try:
        write_atomic(out, lambda tmp: tmp.write_bytes(buffer.getbuffer()))
        try:
            write_atomic(Path(str(out) + ".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
        except BaseException:
            out.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise OutputError(f"cannot write {e.filename or out}: {os_error_text(e)}; nothing was left there. "
                          "Free space or choose another OUT, then re-run export") from None
    return out
