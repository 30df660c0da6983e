"""The row index of one space: row key → (segment, row) over its sound segments, the oldest segment first.

Held as arrays, not a ``dict``: the segments' row keys (see :mod:`.rowkeys`) concatenated in segment
order, oldest first, and the permutation that sorts them (a stable sort, so among equal keys the
oldest segment's row comes first, and within a segment its first row). A lookup of N keys is one
``np.searchsorted`` over that permutation: O(N log R) for R rows, after an O(R log R) build once per
process while the committed segments stay the same. Memory: the key bytes (32 per row, 37 in a
space of augmented views, shared with the segments' own ``digests``) and 8 bytes of permutation per
row, about 40 bytes per row where the ``dict`` of hex strings held about 240 (tracemalloc, 50k rows).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from collections.abc import Set as AbstractSet

import numpy as np

from .rowkeys import decode_keys, encode_keys, key_width, query_keys, sort_keys
from .segments import Segment

__all__ = ["KeySet", "RowIndex", "sort_keys"]


_BLOCK = 8192  # keys searched at once
_PREFIXED = 4096  # from this many keys on, a search first compares their first 8 bytes


def _heads(keys: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each key as a native unsigned integer: they sort as the bytes do."""
    raw = keys.view(np.uint8).reshape(len(keys), keys.dtype.itemsize)[:, :8]
    return np.ascontiguousarray(raw).view(">u8").reshape(len(keys)).astype(np.uint64)


class KeySet(AbstractSet[str]):
    """The read-only set protocol of a space's row keys, for a class that finds many keys at once (``find``:
    positions or -1) and tells where a position is (``locate``: segment number and row)."""

    def find(self, keys: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def locate(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self.find([key])[0] >= 0)

    def __getitem__(self, key: str) -> tuple[int, int]:
        """(segment number, row) of ``key``; KeyError when the space holds no such row."""
        row = self.find([key])
        if row[0] < 0:
            raise KeyError(key)
        s, r = self.locate(row)[0].tolist()
        return s, r

    @classmethod
    def _from_iterable(cls, it):  # set operations (``a - b``, ``a & b``) give plain sets
        return set(it)


class RowIndex(KeySet):
    """The distinct row keys of a space's segments, as a read-only set of key strings (``in``, ``len``,
    iteration; ``contains`` and ``find`` for many keys at once), and where each one's row is."""

    def __init__(self, segments: Sequence[Segment]):
        self.width = key_width(seg.views for seg in segments)
        self.offsets = np.zeros(len(segments) + 1, dtype=np.int64)  # segment s holds rows offsets[s]:offsets[s+1]
        np.cumsum([seg.rows for seg in segments], out=self.offsets[1:])
        self.keys = np.empty(int(self.offsets[-1]), dtype=f"S{self.width}")
        raw = self.keys.view(np.uint8).reshape(len(self.keys), self.width)
        # segment by segment, its keys are copied in and its digests become a view of them, so that its own
        # array is let go at once: the keys are held once, not twice, while the index is built
        for s, seg in enumerate(segments):
            self.keys[self.offsets[s] : self.offsets[s + 1]] = seg.row_keys(self.width)
            seg.digests = raw[self.offsets[s] : self.offsets[s + 1], :32]
        self.order = sort_keys(self.keys, raw)  # equal keys: the oldest segment's first row first
        self._first: np.ndarray | None = None
        self._distinct: int | None = None

    @classmethod
    def extended(cls, base: RowIndex, segments: Sequence[Segment], added: int) -> RowIndex:
        """``base`` with the last ``added`` of ``segments`` (the segments ``base`` was built from, then those)
        appended: newer segments, so on equal keys the rows ``base`` holds still come first. Their keys are
        sorted alone and merged in (O(R) copies, O(n log n + n log R) comparisons), not the whole space again."""
        index = cls.__new__(cls)
        old = segments[: len(segments) - added]
        index.width = base.width
        index.offsets = np.zeros(len(segments) + 1, dtype=np.int64)
        np.cumsum([seg.rows for seg in segments], out=index.offsets[1:])
        new_keys = np.concatenate([seg.row_keys(base.width) for seg in segments[len(old):]])
        index.keys = np.concatenate([base.keys, new_keys])
        raw = index.keys.view(np.uint8).reshape(len(index.keys), base.width)
        for s, seg in enumerate(segments):  # digests become views of the new keys, as in __init__
            seg.digests = raw[index.offsets[s] : index.offsets[s + 1], :32]
        mine = sort_keys(new_keys, new_keys.view(np.uint8).reshape(len(new_keys), base.width))
        at = np.searchsorted(base.keys, new_keys[mine], side="right", sorter=base.order)  # after equal old keys
        index.order = np.insert(base.order, at, mine + len(base.keys))
        index._first = None
        index._distinct = None
        return index

    # ------------------------------------------------------------------ many keys at once

    def find(self, keys: Sequence[str]) -> np.ndarray:
        """Per key, its row's position in the concatenated rows (``offsets`` tells the segment), or -1 when
        the space holds no such row."""
        query, ok = query_keys(keys, self.width)
        return self._find(query, ok)

    def find_digests(self, digests: np.ndarray, views: np.ndarray | None = None) -> np.ndarray:
        """:meth:`find` for keys given as bytes: an (N, 32) uint8 array of digests and, for augmented views,
        their view numbers (no key string per row)."""
        n = len(digests)
        if views is not None and self.width != key_width([views]):  # the space holds no views
            return np.full(n, -1, dtype=np.int64)
        return self._find(encode_keys(digests, views, self.width), np.ones(n, dtype=bool))

    def contains_digests(self, digests: np.ndarray, views: np.ndarray | None = None) -> np.ndarray:
        """Which of these rows the space holds (see :meth:`find_digests`), as a bool array."""
        return self.find_digests(digests, views) >= 0

    def _find(self, query: np.ndarray, ok: np.ndarray) -> np.ndarray:
        out = np.full(len(query), -1, dtype=np.int64)
        if not len(self.keys):
            return out
        # many keys: searched first by their first 8 bytes as native integers (a sorted copy of those, 8 bytes
        # per row, made for this call and let go), which is several times faster than comparing 32-byte
        # strings through the sort permutation; the few whose 8 bytes another stored key shares are searched whole
        heads = _heads(self.keys)[self.order] if len(query) >= _PREFIXED else None
        for lo in range(0, len(query), _BLOCK):  # a block at a time: the search's temporaries stay small
            q = query[lo : lo + _BLOCK]
            good = ok[lo : lo + _BLOCK]
            if heads is not None:
                pos = np.minimum(np.searchsorted(heads, _heads(q), side="left"), len(heads) - 1)
                at = self.order[pos]
                same = heads[pos] == _heads(q)
                hit = good & same & (self.keys[at] == q)
                out[lo : lo + _BLOCK][hit] = at[hit]
                whole = np.flatnonzero(good & same & ~hit)  # another key with the same 8 bytes came first
                q, good, base = q[whole], good[whole], lo + whole
            else:
                base = lo + np.arange(len(q))
            if len(q):
                pos = np.searchsorted(self.keys, q, side="left", sorter=self.order)
                at = self.order[np.minimum(pos, len(self.keys) - 1)]
                hit = good & (pos < len(self.keys)) & (self.keys[at] == q)
                out[base[hit]] = at[hit]
        return out

    def contains(self, keys: Sequence[str]) -> np.ndarray:
        """Which of ``keys`` the space holds, as a bool array."""
        return self.find(keys) >= 0

    def locate(self, rows: np.ndarray) -> np.ndarray:
        """Positions from :meth:`find` (all found) → (segment number, row in it) as an (N, 2) int64 array."""
        seg = np.searchsorted(self.offsets, rows, side="right") - 1
        return np.stack([seg, rows - self.offsets[seg]], axis=1).astype(np.int64).reshape(len(rows), 2)

    def winners(self) -> np.ndarray:
        """Per row of the concatenated rows, whether it is the one its key resolves to."""
        if self._first is None:
            ordered = self.keys[self.order]
            first = np.ones(len(ordered), dtype=bool)
            first[1:] = ordered[1:] != ordered[:-1]
            del ordered
            self._first = np.zeros(len(self.keys), dtype=bool)
            self._first[self.order[first]] = True
        return self._first

    # ------------------------------------------------------------------ a read-only set of key strings

    def __len__(self) -> int:
        if self._distinct is None:
            self._distinct = int(self.winners().sum())
        return self._distinct

    def __iter__(self) -> Iterator[str]:
        """The distinct keys, in the order their rows were stored (segment by segment), a block at a time."""
        where = np.flatnonzero(self.winners())
        for start in range(0, len(where), 65536):
            yield from decode_keys(self.keys[where[start : start + 65536]])
