"""A dataset view in the store: classes, per-split labels, paths and hashes, rows gathered on demand.

Its attributes are validated on open: a store shared by another team may be damaged or
hostile, and a reader must fail with a clear error rather than misbehave.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import zarr

from .errors import SetNotFound, StoreError

if TYPE_CHECKING:
    from .store import Store

__all__ = ["FeatureSet"]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_CLASSES = 1_000_000
_MAX_DIMS = 8


def _validated(key: str, a: dict) -> dict:
    """Check the attributes readers rely on; another team's store may be broken or hostile."""

    def bad(name: str, want: str):
        return StoreError(f"set {key} has a malformed attribute {name!r} (expected {want}); the store may be damaged")

    classes = a.get("classes")
    if not (isinstance(classes, list) and 0 < len(classes) <= _MAX_CLASSES and all(isinstance(c, str) for c in classes)):
        raise bad("classes", "a non-empty list of strings")
    splits = a.get("splits")
    if not (isinstance(splits, dict) and "train" in splits and set(splits) <= {"train", "val", "test"}
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in splits.values())):
        raise bad("splits", "counts per split name train/val/test")
    unlabelled = a.get("unlabelled", [])  # absent in sets written before unlabelled splits existed
    if not (isinstance(unlabelled, list) and all(s in splits and s != "train" for s in unlabelled)):
        raise bad("unlabelled", "a list of the set's split names other than train")
    if not isinstance(a.get("space"), str) or not re.fullmatch(r"[0-9a-f]{16}", a["space"]):
        raise bad("space", "a 16-digit hex key")
    prov = a.get("space_provenance")
    shape = prov.get("shape") if isinstance(prov, dict) else None
    if not (isinstance(shape, list) and 0 < len(shape) <= _MAX_DIMS
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 2**31 for d in shape)):
        raise bad("space_provenance.shape", "a list of positive integers")
    if a.get("dtype") not in ("float16", "float32"):
        raise bad("dtype", "float16 or float32")
    for name in ("backbone", "layer", "pool", "created_at", "data_root"):
        if not isinstance(a.get(name), str):
            raise bad(name, "a string")
    return a


class FeatureSet:
    """A committed dataset view: classes, per-split labels/paths, rows gathered from its space."""

    def __init__(self, store: "Store", key: str, group: zarr.Group):
        self.store = store
        self.key = key
        self.group = group
        self.attrs: dict = _validated(key, dict(group.attrs))

    def __repr__(self) -> str:
        return f"FeatureSet({self.key!r}, {self.attrs.get('backbone')}/{self.attrs.get('layer')}, splits={self.splits})"

    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])

    @property
    def splits(self) -> list[str]:
        return list(self.attrs["splits"])

    @property
    def unlabelled(self) -> list[str]:
        """Splits stored without labels (their labels are all -1), e.g. Kaggle's ``test1/``."""
        return list(self.attrs.get("unlabelled", []))

    @property
    def labelled_splits(self) -> list[str]:
        return [s for s in self.splits if s not in self.unlabelled]

    @property
    def space(self) -> str:
        return self.attrs["space"]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.attrs["space_provenance"]["shape"])

    def _split(self, split: str) -> zarr.Group:
        if split not in self.splits:
            raise SetNotFound(f"set {self.key} has no split {split!r}; it has: {', '.join(self.splits)}")
        return self.group[split]

    def _array(self, split: str, name: str, kinds: str) -> np.ndarray:
        """One per-split array, checked: present, 1-D, as long as the split, of the expected kind."""
        try:
            values = np.asarray(self._split(split)[name][:])
        except (KeyError, ValueError, TypeError, OSError) as e:
            raise StoreError(f"set {self.key} split {split}: cannot read {name!r} ({e.__class__.__name__}: {e})") from None
        if values.ndim != 1 or len(values) != self.attrs["splits"][split] or values.dtype.kind not in kinds:
            raise StoreError(
                f"set {self.key} split {split}: {name!r} is malformed (shape {values.shape}, dtype {values.dtype}; "
                f"expected {self.attrs['splits'][split]} values); the store may be damaged"
            )
        return values

    def labels(self, split: str) -> np.ndarray:
        """The split's class indices; -1 throughout for an unlabelled split."""
        labels = self._array(split, "labels", "iu").astype(np.int64)
        if split in self.unlabelled:
            if len(labels) and (labels != -1).any():
                raise StoreError(f"set {self.key} split {split} is unlabelled but holds labels other than -1")
        elif len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise StoreError(f"set {self.key} split {split} has labels outside 0..{len(self.classes) - 1}")
        return labels

    def paths(self, split: str) -> list[str]:
        return [str(p) for p in self._array(split, "paths", "UTO")]

    def hashes(self, split: str) -> np.ndarray:
        hashes = self._array(split, "sha256", "UTO")
        if not all(isinstance(h, str) and _HEX64.fullmatch(h) for h in hashes.tolist()):
            raise StoreError(f"set {self.key} split {split}: 'sha256' holds values that are not SHA-256 hex digests")
        return hashes

    def hashes_all(self) -> list[str]:
        return [h for s in self.splits for h in self.hashes(s).tolist()]

    def features(self, split: str) -> np.ndarray:
        """The split's rows in view order, in their stored dtype."""
        return self.store.gather(self.space, self.hashes(split), self.shape, self.attrs["dtype"])

    @property
    def views(self) -> int:
        """Augmented views stored per training image (0: none)."""
        return int(self.attrs.get("views") or 0)

    def view_keys(self) -> list[str]:
        """Row keys of the training views in the view space, image by image: view k of image i at i * views + k."""
        if not self.views:
            raise SetNotFound(f"set {self.key} has no augmented views; extract with --views K")
        return [f"{h}:{k}" for h in self.hashes("train").tolist() for k in range(self.views)]

    def view_features(self) -> np.ndarray:
        """Training rows as (N, views, *shape): view k of image i at [i, k]."""
        rows = self.store.gather(self.attrs["view_space"], self.view_keys(), self.shape, self.attrs["dtype"])
        return rows.reshape((-1, self.views) + self.shape)

    def to_numpy(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return self.features(split), self.labels(split)

    def to_torch(self, split: str):
        import torch

        x, y = self.to_numpy(split)
        return torch.from_numpy(x), torch.from_numpy(y)
