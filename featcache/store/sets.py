"""A dataset view in the store: classes, per-split labels, paths and hashes, rows gathered on demand.

Its attributes are parsed into a :class:`SetRecord` on open and every per-split array is
checked against the set's integrity record on read: a store shared by another team may be
damaged or hostile, and a reader must fail with a clear error rather than misbehave.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import numpy as np
import zarr

from ..errors import SetNotFound, StoreError
from ..keys import row_key, set_key
from .groups import read_checked
from .locator import RowHint, read_locations
from .records import SetRecord
from .segments import arrays_to_keys, decode_strings

if TYPE_CHECKING:
    from .store import Store

__all__ = ["FeatureSet", "FILE_LISTS"]

FILE_LISTS = ("skipped", "ignored")  # (path, reason) lists, in arrays of the set group (in attributes before)


class FeatureSet:
    """A committed dataset view: classes, per-split labels/paths, rows gathered from its space."""

    def __init__(self, store: Store, key: str, group: zarr.Group):
        self.store = store
        self.key = key
        self.group = group
        self.record = SetRecord.from_attrs(key, dict(group.attrs))
        self._attrs: dict | None = None
        self._arrays: dict[str, tuple[np.ndarray, list[str], np.ndarray]] | None = None
        self._files: dict[str, list[dict]] = {}
        self._hints: dict[str, RowHint | None] = {}
        self._check_key()

    @property
    def attrs(self) -> dict:
        """The record as JSON values, with the skipped and ignored files however they are stored."""
        if self._attrs is None:
            self._attrs = {**self.record.to_attrs(), "skipped": self.skipped(), "ignored": self.ignored()}
        return self._attrs

    def skipped(self) -> list[dict]:
        """Files of the folder that could not be used, as ``{"path", "reason"}``."""
        return self._file_list("skipped")

    def ignored(self) -> list[dict]:
        """Files of the folder outside its layout, as ``{"path", "reason"}``."""
        return self._file_list("ignored")

    def _file_list(self, name: str) -> list[dict]:
        if name not in self._files:
            count = self.record.extra.get(f"{name}_count")
            if count is None:  # written before the lists moved into arrays
                self._files[name] = list(getattr(self.record, name))
            else:
                self._files[name] = self._read_files(name, count)
        return [dict(d) for d in self._files[name]]

    def _read_files(self, name: str, count) -> list[dict]:
        digests = self.record.integrity.get(name)
        try:
            if not isinstance(count, int) or isinstance(count, bool) or not isinstance(digests, dict):
                raise ValueError(f"'{name}_count' or its integrity record is malformed")
            group = self.group[name]
            parts = [read_checked(group, arr, digests.get(arr), dtype)
                     for arr, dtype in (("paths_utf8", "uint8"), ("paths_offsets", "int64"),
                                        ("reasons_utf8", "uint8"), ("reasons_offsets", "int64"))]
            paths, reasons = decode_strings(parts[0], parts[1]), decode_strings(parts[2], parts[3])
            if len(paths) != count or len(reasons) != count:
                raise ValueError(f"it holds {len(paths)} entries, the set says {count}")
        except (Exception, RecursionError) as e:
            why = str(e) if isinstance(e, ValueError) else f"cannot read it ({e.__class__.__name__})"
            raise StoreError(f"set {self.key}, its list of {name} files: {why}; the store is damaged. Re-run "
                             "featcache extract to record the set again.") from None
        return [{"path": p, "reason": r} for p, r in zip(paths, reasons)]

    def _check_key(self) -> None:
        """The key is a digest of what the set is (its space, its view's digest, its folder, its split): a
        group whose record does not hash to the key it claims is not that set."""
        r = self.record
        if "migrated_from" in r.extra:  # format 1 keyed sets differently; the view digest is still checked
            return
        want = set_key(r.space, r.manifest_sha256, r.data_root, r.split_fractions, r.split_seed, r.views, r.view_space)
        if want != self.key:
            raise StoreError(f"set {self.key}: its record hashes to the key {want}, not {self.key}; the store is "
                             "damaged or the set was altered")

    def _view(self) -> dict[str, tuple[np.ndarray, list[str], np.ndarray]]:
        """Labels, paths and hashes of every split, read once and compared with the set's view digest
        (``manifest_sha256``: classes, and split, path, label and image hash of every row), so class names
        reordered or renamed, or labels, paths or hashes that are another view's, are refused."""
        if self._arrays is None:
            arrays = {s: (self._labels(s), self._paths(s), self._hashes(s)) for s in self.splits}
            if _view_digest(self.classes, arrays) != self.record.manifest_sha256:
                raise StoreError(f"set {self.key}: its classes, labels, paths and hashes differ from the view digest "
                                 "it records (manifest_sha256); the store is damaged or the set was altered. "
                                 "Re-run featcache extract to record the set again.")
            self._arrays = arrays
        return self._arrays

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

    def _read(self, split: str, name: str, dtype: str, trailing: tuple[int, ...] = ()) -> np.ndarray:
        """One per-split array, equal to what the set's integrity record says it holds (a lost or
        altered chunk is an error naming the set, the split and the array, never fill values)."""
        group = self._split(split)
        try:
            return read_checked(group, name, self.record.integrity[split].get(name), dtype, trailing)
        except (Exception, RecursionError) as e:
            why = str(e) if isinstance(e, ValueError) else f"cannot read it ({e.__class__.__name__})"
            raise StoreError(f"set {self.key} split {split}: {why}; the store is damaged. Re-run featcache extract "
                             "to record the set again.") from None

    def _counted(self, split: str, values, name: str):
        if len(values) != self.record.splits[split]:
            raise StoreError(f"set {self.key} split {split}: {name!r} holds {len(values)} values, the set says "
                             f"{self.record.splits[split]}; the store is damaged")
        return values

    def labels(self, split: str) -> np.ndarray:
        self._split(split)
        return self._view()[split][0].copy()

    def paths(self, split: str) -> list[str]:
        self._split(split)
        return list(self._view()[split][1])

    def hashes(self, split: str) -> np.ndarray:
        """The split's image hashes as SHA-256 hex strings."""
        self._split(split)
        return self._view()[split][2].copy()

    def _labels(self, split: str) -> np.ndarray:
        labels = self._counted(split, self._read(split, "labels", "int32").astype(np.int64), "labels")
        if split in self.record.unlabelled:
            if len(labels) and (labels != -1).any():
                raise StoreError(f"set {self.key} split {split} is unlabelled but holds labels other than -1")
            return labels
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise StoreError(f"set {self.key} split {split} has labels outside 0..{len(self.classes) - 1}")
        return labels

    def _paths(self, split: str) -> list[str]:
        blob = self._read(split, "paths_utf8", "uint8")
        offsets = self._read(split, "paths_offsets", "int64")
        try:
            paths = decode_strings(blob, offsets)
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"set {self.key} split {split}: paths are malformed ({e}); the store is damaged") from None
        return self._counted(split, paths, "paths")

    def _hashes(self, split: str) -> np.ndarray:
        digests = self._counted(split, self._read(split, "sha256", "uint8", (32,)), "sha256")
        return np.array(arrays_to_keys(digests), dtype="<U64")

    def hashes_all(self) -> list[str]:
        return [h for s in self.splits for h in self.hashes(s).tolist()]

    def locations(self, split: str) -> RowHint | None:
        """Where the split's rows were when the set was committed (see :mod:`.locator`): a hint for
        ``Store.locate``, which checks it. None for a set recorded before locations were, and for locations
        that do not match their integrity record (a warning in ``store.warnings``): then the rows are found
        through the space's row index."""
        self._split(split)
        if split not in self._hints:
            attr = self.record.extra.get("locator")
            hint = None
            if attr is not None:
                try:
                    hint = read_locations(self.group, attr, split, self.record.splits[split])
                except (Exception, RecursionError) as e:
                    why = str(e) if isinstance(e, ValueError) else f"cannot read them ({e.__class__.__name__})"
                    self.store._warn(f"set {self.key} split {split}: its row locations are damaged ({why}); its rows "
                                     "are found through the row index of its space")
            self._hints[split] = hint
        return self._hints[split]

    def features(self, split: str) -> np.ndarray:
        """The split's rows in view order, in their stored dtype."""
        return self.store.gather(self.space, self.hashes(split), self.shape, self.record.dtype, self.locations(split))

    @property
    def views(self) -> int:
        """Augmented views stored per training image (0: none)."""
        return self.record.views

    def view_keys(self) -> list[str]:
        """Row keys of the training views in the view space, image by image: view k of image i at i * views + k."""
        if not self.views:
            raise SetNotFound(f"set {self.key} has no augmented views; extract with --views K")
        return [row_key(h, k) for h in self.hashes("train").tolist() for k in range(self.views)]

    def view_features(self) -> np.ndarray:
        """Training rows as (N, views, *shape): view k of image i at [i, k]."""
        rows = self.store.gather(self.record.view_space, self.view_keys(), self.shape, self.record.dtype)
        return rows.reshape((-1, self.views) + self.shape)

    def __len__(self) -> int:
        """Images in the set, every split."""
        return sum(self.record.splits.values())

    # Where users work (featcache.store.convert): float32 rows by default, pooled on request.
    def to_numpy(self, split: str, dtype: str = "float32", pool: str = "none") -> tuple[np.ndarray, np.ndarray]:
        """(rows, int64 labels) of ``split``: float32 (``dtype="float16"``: as stored), ``pool`` avg/max over maps."""
        from .convert import to_numpy

        return to_numpy(self, split, dtype, pool)

    def to_torch(self, split: str, dtype: str = "float32", pool: str = "none"):
        """(rows, labels) as torch tensors, float32 and int64 by default."""
        from .convert import to_torch

        return to_torch(self, split, dtype, pool)

    def dataset(self, split: str, dtype: str = "float32", pool: str = "none"):
        """A map-style torch ``Dataset`` of (row, label), held in memory."""
        from .convert import dataset

        return dataset(self, split, dtype, pool)

    def iterable_dataset(self, split: str, dtype: str = "float32", pool: str = "none", shuffle: bool = True,
                         seed: int = 0, max_memory: str | int = "auto"):
        """A torch ``IterableDataset`` of (row, label) read a window of chunks at a time (sets larger than memory)."""
        from .convert import iterable_dataset

        return iterable_dataset(self, split, dtype, pool, shuffle, seed, max_memory)

    def to_pandas(self, split: str | None = None, dtype: str = "float32", pool: str = "none"):
        """A pandas DataFrame, one row per image (needs pandas)."""
        from .convert import to_pandas

        return to_pandas(self, split, dtype, pool)

    def to_hf(self, split: str | None = None, dtype: str = "float32", pool: str = "none"):
        """A Hugging Face ``datasets.Dataset`` (a ``DatasetDict`` without ``split``; needs datasets)."""
        from .convert import to_hf

        return to_hf(self, split, dtype, pool)


_ESCAPE = json.encoder.encode_basestring_ascii  # what json.dumps writes for a str
_ROWS = 8192  # rows made into text at once


def _view_digest(classes: list[str], arrays: dict[str, tuple[np.ndarray, list[str], np.ndarray]]) -> str:
    """SHA-256 of ``json.dumps({"classes": ..., "rows": [[split, path, label, sha256], ...]}, separators=(",", ":"))``,
    the text streamed a block of rows at a time: no list per row (a process that has imported torch holds
    millions of objects, which each collection of a list per row would walk again)."""
    h = hashlib.sha256()
    h.update(b'{"classes":' + json.dumps(classes, separators=(",", ":")).encode() + b',"rows":[')
    first = True
    for split, (labels, paths, hashes) in arrays.items():
        name = _ESCAPE(split)
        for lo in range(0, len(labels), _ROWS):
            text = ",".join(f"[{name},{_ESCAPE(p)},{y},{_ESCAPE(x)}]" for p, y, x in zip(
                paths[lo : lo + _ROWS], labels[lo : lo + _ROWS].tolist(), hashes[lo : lo + _ROWS].tolist()))
            if text:
                h.update((b"" if first else b",") + text.encode())
                first = False
    h.update(b"]}")
    return h.hexdigest()
