"""A dataset view in the store: classes, per-split labels, paths and hashes, rows gathered on demand.

Its attributes are parsed into a :class:`SetRecord` on open and every per-split array is
checked against the set's integrity record on read: a store shared by another team may be
damaged or hostile, and a reader must fail with a clear error rather than misbehave.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import zarr

from ..errors import SetNotFound, StoreError
from .records import SetRecord
from .rows import digest_values

if TYPE_CHECKING:
    from .store import Store

__all__ = ["FeatureSet"]

_HEX64 = re.compile(r"[0-9a-f]{64}")


class FeatureSet:
    """A committed dataset view: classes, per-split labels/paths, rows gathered from its space."""

    def __init__(self, store: "Store", key: str, group: zarr.Group):
        self.store = store
        self.key = key
        self.group = group
        self.record = SetRecord.from_attrs(key, dict(group.attrs))
        self.attrs: dict = self.record.to_attrs()

    def __repr__(self) -> str:
        return f"FeatureSet({self.key!r}, {self.record.backbone}/{self.record.layer}, splits={self.splits})"

    @property
    def classes(self) -> list[str]:
        return list(self.record.classes)

    @property
    def splits(self) -> list[str]:
        return list(self.record.splits)

    @property
    def unlabelled(self) -> list[str]:
        """Splits stored without labels (their labels are -1)."""
        return list(self.record.unlabelled)

    @property
    def labelled_splits(self) -> list[str]:
        return [s for s in self.splits if s not in self.record.unlabelled]

    @property
    def space(self) -> str:
        return self.record.space

    @property
    def shape(self) -> tuple[int, ...]:
        return self.record.shape

    def _split(self, split: str) -> zarr.Group:
        if split not in self.splits:
            raise SetNotFound(f"set {self.key} has no split {split!r}; it has: {', '.join(self.splits)}")
        try:
            return self.group[split]
        except (Exception, RecursionError) as e:
            raise StoreError(f"set {self.key} split {split}: unreadable ({e.__class__.__name__}); the store may be damaged") from None

    def _array(self, split: str, name: str, kinds: str) -> np.ndarray:
        """One per-split array, checked: present, 1-D, as long as the split, of the expected kind, and
        equal to what the set's integrity record says it holds (a lost chunk reads as fill values)."""
        try:
            values = np.asarray(self._split(split)[name][:])
        except StoreError:
            raise
        except (Exception, RecursionError) as e:
            raise StoreError(f"set {self.key} split {split}: cannot read {name!r} ({e.__class__.__name__}: {e})") from None
        n = self.record.splits[split]
        if values.ndim != 1 or len(values) != n or values.dtype.kind not in kinds:
            raise StoreError(
                f"set {self.key} split {split}: {name!r} is malformed (shape {values.shape}, dtype {values.dtype}; "
                f"expected {n} values); the store may be damaged"
            )
        if digest_values(values) != self.record.integrity[split][name]:
            raise StoreError(
                f"set {self.key} split {split}: {name!r} differs from the set's integrity record (a missing or "
                "altered chunk); the store is damaged. Re-run featcache extract to record the set again."
            )
        return values

    def labels(self, split: str) -> np.ndarray:
        """The split's class indices; -1 throughout for an unlabelled split."""
        labels = self._array(split, "labels", "iu").astype(np.int64)
        if split in self.record.unlabelled:
            if len(labels) and (labels != -1).any():
                raise StoreError(f"set {self.key} split {split} is unlabelled but holds labels other than -1")
            return labels
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
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
        return self.store.gather(self.space, self.hashes(split), self.shape, self.record.dtype)

    @property
    def views(self) -> int:
        """Augmented views stored per training image (0: none)."""
        return self.record.views

    def view_keys(self) -> list[str]:
        """Row keys of the training views in the view space, image by image: view k of image i at i * views + k."""
        if not self.views:
            raise SetNotFound(f"set {self.key} has no augmented views; extract with --views K")
        return [f"{h}:{k}" for h in self.hashes("train").tolist() for k in range(self.views)]

    def view_features(self) -> np.ndarray:
        """Training rows as (N, views, *shape): view k of image i at [i, k]."""
        rows = self.store.gather(self.record.view_space, self.view_keys(), self.shape, self.record.dtype)
        return rows.reshape((-1, self.views) + self.shape)

    def to_numpy(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return self.features(split), self.labels(split)

    def to_torch(self, split: str):
        import torch

        x, y = self.to_numpy(split)
        return torch.from_numpy(x), torch.from_numpy(y)
