"""A fitted run measured on a labelled image folder, from the cache where the bytes are there.

``evaluate(run, data)`` scans ``data`` in any layout that ``extract`` understands (a flat folder
of class folders is taken whole), maps its classes to the run's by name, reads the rows whose
image bytes are already in the run's feature space from the store, computes the rest through
the extract pipeline's reader (and, unless ``store=False``, adds them to the store), and
measures the head on them exactly as ``fit`` does (:func:`featcache.fit.compute_metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .choices import SPLITS
from .config import parse_name_pattern
from .data import Skip, scan
from .errors import DataError
from .heads import head_from_record
from .lookup import RowCounts, load_run, run_rows
from .metrics import compute_metrics
from .tails import RestNetwork

__all__ = ["Evaluation", "evaluate"]

WHOLE = "all"
"""The name metrics are reported under for a folder without split folders."""


@dataclass
class Evaluation:
    """Metrics per split of the folder (``all`` for a folder without split folders) and where the rows came from."""

    run: str
    data: str
    layout: str
    classes: list[str]
    metrics: dict[str, dict]
    counts: RowCounts
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(m["n"] for m in self.metrics.values())

    def summary(self) -> str:
        """One line: images, top-1 per split, and how many rows were computed and read from the store."""
        tops = ", ".join(f"{s} top-1 {m['top1']:.4f}" for s, m in self.metrics.items())
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        return f"evaluated {self.run} on {self.data}: {self.images} images{skipped}; {tops}; {self.counts.line()}"

    def to_dict(self) -> dict:
        return {
            "run": self.run, "data": self.data, "layout": self.layout, "classes": list(self.classes),
            "metrics": self.metrics, "computed": self.counts.computed, "from_store": self.counts.from_store,
            "stored": self.counts.stored, "skipped": [s.to_dict() for s in self.skipped], "notes": list(self.notes),
        }


def evaluate(run: str | Path, data: str | Path, store: bool = True, backbone: str | None = None,
             weights: str | None = None, *, labels: str | None = None, labels_from_name: str | None = None,
             batch_size: int = 64, workers: int | None = None, device: str = "auto",
             progress: bool = False, store_url: str | None = None, recompute: bool = False) -> Evaluation:
    """Measure the run's head on the labelled images of ``data``.

    Rows whose bytes are in the run's feature space are read from its store; the others are
    computed and, with ``store``, committed to it (under a lease; never as a set). The folder's
    classes must all be classes of the run (matched by name). ``backbone``/``weights``: the
    user's --backbone/--weights for a run whose features came from a ``module:factory`` network
    or a weights file. ``labels``/``labels_from_name`` as for ``extract``. ``store_url`` names where
    the run's store is now; ``recompute`` uses none (every image is computed, nothing is stored).
    """
    parse_name_pattern(labels_from_name)  # a bad pattern is the user's first mistake to hear about
    net, record = load_run(run, backbone, weights, store=store_url, recompute=recompute)
    head = head_from_record(record.head, str(run), RestNetwork(backbone))
    manifest = scan(data, labels=labels, labels_from_name=labels_from_name, whole=True)
    unknown = [c for c in manifest.classes if c not in record.classes]
    if unknown:
        raise DataError(
            f"{data} has class(es) the run does not know: {', '.join(unknown)}. The run's classes: "
            f"{', '.join(record.classes)}. Evaluate a folder whose class folders (or labels) are among these."
        )
    notes = [f"split {s} has no labels and is not evaluated (featcache predict classifies it)"
             for s in manifest.unlabelled]
    items = [it for it in manifest.items if it.label >= 0]
    if not items:
        raise DataError(f"no labelled images in {data}; evaluate needs class folders or labels", param="data")
    to_run = [record.classes.index(c) for c in manifest.classes]
    y = np.array([to_run[it.label] for it in items], dtype=np.int64)
    proba = np.zeros((len(items), len(record.classes)), dtype=np.float32)  # the heads' own dtype, as fit measures

    def on_rows(positions: np.ndarray, feats: np.ndarray) -> None:
        proba[positions] = head.predict_proba(feats)

    counts = run_rows(record, net, manifest.root, items, on_rows, write=store, pool=record.config.pool,
                      keep_shape=record.takes_maps, device=device, batch_size=batch_size, workers=workers,
                      progress=progress, desc="evaluate")
    ok = np.ones(len(items), dtype=bool)
    ok[list(counts.failed)] = False
    skipped = list(manifest.skipped) + [Skip(items[i].path, why) for i, why in sorted(counts.failed.items())]
    calibrated = getattr(head, "calibrated", True)
    metrics = {}
    for split in sorted({it.split for it in items}, key=lambda s: SPLITS.index(s) if s in SPLITS else -1):
        mask = ok & np.array([it.split == split for it in items])
        if mask.any():
            metrics[split or WHOLE] = compute_metrics(proba[mask], y[mask], list(record.classes), calibrated)
    if not metrics:
        raise DataError(f"none of the {len(items)} images in {data} could be read; first: "
                        f"{skipped[0].path}: {skipped[0].reason}")
    return Evaluation(str(run), str(data), manifest.describe(), list(record.classes), metrics, counts, skipped,
                      notes + counts.notes)
