"""Backbone + trained head on new images: predict, and export as one self-contained module.

The backbone, layer, weights and preprocessing are those recorded with the run's feature
set; the weights digest is checked so a prediction never silently uses other weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import Backbone, autocast, check_user_backbone, rebuild_backbone
from .data import IMAGE_EXTENSIONS, load_rgb
from .errors import RunError, WeightsError
from .heads import Head, head_from_record
from .runs import RunRecord

__all__ = ["Prediction", "Predictor", "predict", "export"]


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]
    error: str | None = None

    def to_dict(self) -> dict:
        return {"path": self.path, "top": [{"class": c, "probability": p} for c, p in self.top], "error": self.error}


def _expand(paths: list[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS and not q.name.startswith("."))
        else:
            out.append(p)
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
        if feats.ndim == 4 and self.pool == "avg":
            feats = feats.mean(dim=(2, 3))
        elif feats.ndim == 4 and self.pool == "max":
            feats = feats.amax(dim=(2, 3))
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


def _load(run: str | Path, backbone: str | None = None, weights: str | None = None) -> tuple[Predictor, Backbone, RunRecord]:
    check_user_backbone(backbone, weights)
    record = RunRecord.read(run)
    cfg = record.extract_config
    if cfg is None:
        raise RunError(f"{run} does not record how its features were extracted; re-run featcache fit")
    given = backbone
    backbone = rebuild_backbone(cfg, str(record.backbone), given=given, weights=weights)
    if backbone.weights_sha256 != record.weights["sha256"]:
        raise WeightsError(
            f"the weights {backbone.weights_id} resolve to other values than those the run was trained on "
            f"({record.weights['id']}); pass the same weights file"
        )
    if tuple(backbone.shape) != record.feature_shape:
        raise RunError(f"{run}: the backbone gives features of shape {list(backbone.shape)} but the run was trained on "
                       f"{list(record.feature_shape)}; the run directory is damaged, re-run featcache fit")
    head = _Head(head_from_record(record.head, str(run), given), record.config.pool, record.space_provenance["dtype"])
    return Predictor(backbone, head).eval(), backbone, record


def predict(run: str | Path, paths: list[str | Path], top_k: int = 5, batch_size: int = 32,
            backbone: str | None = None, weights: str | None = None) -> list[Prediction]:
    """Top-k classes for each image; unreadable files come back with ``error`` set.

    ``backbone``/``weights``: the user's --backbone/--weights, needed when the run's features came
    from a ``module:factory`` network or a weights file (never imported or read from the run)."""
    model, backbone, record = _load(run, backbone, weights)
    classes = record.classes
    k = max(1, min(top_k, len(classes)))
    files = _expand(paths)
    results: dict[int, Prediction] = {}
    good: list[tuple[int, torch.Tensor]] = []
    for i, f in enumerate(files):
        try:
            good.append((i, backbone.transform(load_rgb(f))))
        except Exception as e:  # Pillow raises many types for bad files
            results[i] = Prediction(str(f), [], f"cannot decode: {e.__class__.__name__}: {e}")
    precision = str(record.space_provenance.get("precision", "float32"))
    with torch.inference_mode(), autocast(precision, torch.device("cpu")):
        for start in range(0, len(good), batch_size):
            chunk = good[start : start + batch_size]
            proba = model(torch.stack([t for _, t in chunk])).numpy()
            for (i, _), p in zip(chunk, proba):
                order = np.argsort(-p)[:k]
                results[i] = Prediction(str(files[i]), [(classes[j], float(p[j])) for j in order])
    return [results[i] for i in range(len(files))]


def export(run: str | Path, out: str | Path, backbone: str | None = None, weights: str | None = None) -> Path:
    """Write ``out`` (torch.export program: normalised images → probabilities) and ``out.json`` (classes, preprocessing)."""
    model, backbone, record = _load(run, backbone, weights)
    crop = backbone.preprocessing.get("crop_size", [224])[0]
    example = torch.zeros(2, 3, crop, crop)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    out = Path(out)
    torch.export.save(program, str(out))
    meta = {"classes": list(record.classes), "preprocessing": backbone.preprocessing, "input": [None, 3, crop, crop],
            "output": "class probabilities", "backbone": record.backbone, "layer": record.layer,
            "weights": record.weights, "head": record.config.head}
    Path(str(out) + ".json").write_text(json.dumps(meta, indent=2))
    return out
