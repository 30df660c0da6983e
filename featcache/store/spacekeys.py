"""Row lookups in one space that read what they touch: each segment's sorted keys (:mod:`.sortedkeys`).

A :class:`SpaceKeys` answers "which of these N keys does the space hold, and where" by searching each
segment's persisted sorted keys, the oldest segment first, reading only the chunks the keys fall in:
O(N log R) for R rows, where the space-wide :class:`~.rowindex.RowIndex` reads every segment's keys and
sorts them first (O(R log R), 40 bytes per row, once per process). A segment's own keys are read (whole,
checked against its integrity record) only when a key is found in it, to check the row found: a row is
returned only when the segment's key at that row is the key asked for. Among segments, the oldest holding
the key wins, and within one its first row. A segment without sorted keys (written before them), whose
sorted keys cannot be read, or where a key shares its first 8 bytes with many rows (the views of one image),
is searched in memory instead: its keys read and sorted, as the space-wide index does, for that segment only.

The set of every key (``len``, iteration) is the space-wide index over the same segments, built on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from .rowindex import KeySet, RowIndex
from .rowkeys import encode_keys, key_width, query_keys
from .segments import Segment
from .sortedkeys import ExactSearch, SortedSearch, heads_of, sorted_search

__all__ = ["SpaceKeys"]

_BLOCK = 1 << 13  # keys searched at once: the search's temporaries (a dozen arrays of this length) stay small


class SpaceKeys(KeySet):
    """The row keys of a space's segments (oldest first) as a read-only set of key strings, searched segment by
    segment (``find``, ``contains`` and their ``_digests`` forms for many keys at once), and where each row is."""

    def __init__(self, segments: Sequence[Segment], warn: Callable[[str], None] | None = None, space: str = ""):
        self.segments = list(segments)
        self.width = key_width(np.zeros(0) if seg.viewed else None for seg in self.segments)
        self.offsets = np.zeros(len(self.segments) + 1, dtype=np.int64)  # segment s: rows offsets[s]:offsets[s+1]
        np.cumsum([seg.rows for seg in self.segments], out=self.offsets[1:])
        self.space = space
        self._warn = warn or (lambda line: None)
        self._search: dict[int, SortedSearch | ExactSearch | None] = {}  # None: searched in memory, not built yet
        self._keys: dict[int, np.ndarray | None] = {}  # each segment's keys, once read (None: they are damaged)
        self._full: RowIndex | None = None

    def extended(self, added: Sequence[Segment]) -> SpaceKeys:
        """These keys and those of ``added``, newer segments: what was read of the segments held is kept."""
        grown = SpaceKeys(self.segments + list(added), self._warn, self.space)
        grown._search = dict(self._search)
        if grown.width == self.width:  # else the keys are read again at the new width
            grown._keys = dict(self._keys)
        else:
            grown._search = {s: v for s, v in self._search.items() if not isinstance(v, ExactSearch)}
        return grown

    # ------------------------------------------------------------------ per segment

    def _segment_keys(self, s: int) -> np.ndarray | None:
        """Segment ``s``'s row keys (``S<width>``), read and checked on first use; None when they are damaged."""
        if s not in self._keys:
            seg = self.segments[s]
            try:
                self._keys[s] = seg.row_keys(self.width)
            except (Exception, RecursionError) as e:
                self._keys[s] = None
                self._warn(f"space {self.space} segment {seg.key} is damaged (its row keys: {e}); its rows count "
                           "as missing")
        return self._keys[s]

    def _searcher(self, s: int) -> SortedSearch | ExactSearch | None:
        if s not in self._search:
            self._search[s] = sorted_search(self.segments[s].group, self.segments[s].rows)
        found = self._search[s]
        if found is None:
            keys = self._segment_keys(s)
            if keys is None:
                return None
            found = self._search[s] = ExactSearch(keys)
        return found

    def _in_segment(self, s: int, query: np.ndarray, heads: np.ndarray) -> np.ndarray:
        """Per query key, its first row in segment ``s``, or -1."""
        out = np.full(len(query), -1, dtype=np.int64)
        search = self._searcher(s)
        if isinstance(search, SortedSearch):
            try:
                got = search.candidates(heads, limit=4 * len(heads) + 64)
            except (Exception, RecursionError):  # a chunk that fails its checksum, a missing shard ...
                got = None
            if got is None:  # searched in memory from now on
                self._search[s] = None
                search = self._searcher(s)
            else:
                which, rows = got
                if not len(which):
                    return out
                keys = self._segment_keys(s)
                if keys is None:
                    return out
                inside = (rows >= 0) & (rows < len(keys))
                which, rows = which[inside], rows[inside]
                same = keys[rows] == query[which]  # the one check that makes a candidate an answer
                which, rows = which[same], rows[same]
                order = np.lexsort((rows, which))  # per query, its first row first
                which, rows = which[order], rows[order]
                first = np.ones(len(which), dtype=bool)
                first[1:] = which[1:] != which[:-1]
                out[which[first]] = rows[first]
                return out
        if not isinstance(search, ExactSearch):  # its keys are damaged
            return out
        return search.find(query)

    # ------------------------------------------------------------------ many keys at once

    def _find(self, query: np.ndarray, ok: np.ndarray) -> np.ndarray:
        out = np.full(len(query), -1, dtype=np.int64)
        for lo in range(0, len(query), _BLOCK):
            heads = heads_of(query[lo : lo + _BLOCK])
            # a block searched in the order of its heads: each binary search starts near the one before
            # (several times faster than random order over a large table), the answers put back in place
            order = np.argsort(heads, kind="stable")
            q, heads, good = query[lo : lo + _BLOCK][order], heads[order], ok[lo : lo + _BLOCK][order]
            part = np.full(len(q), -1, dtype=np.int64)
            for s, seg in enumerate(self.segments):  # the oldest first: it wins
                todo = np.flatnonzero(good & (part < 0))
                if not len(todo):
                    break
                if seg.rows:
                    every = len(todo) == len(q)  # the first segment searched: no copy of the query
                    row = self._in_segment(s, q if every else q[todo], heads if every else heads[todo])
                    hit = row >= 0
                    part[todo[hit]] = self.offsets[s] + row[hit]
            out[lo + order] = part
        return out

    def find(self, keys: Sequence[str]) -> np.ndarray:
        """Per key, its row's position in the segments' rows taken in order (``offsets`` tells the segment), or
        -1 when the space holds no such row."""
        query, ok = query_keys(keys, self.width)
        return self._find(query, ok)

    def find_digests(self, digests: np.ndarray, views: np.ndarray | None = None) -> np.ndarray:
        """:meth:`find` for keys given as bytes: an (N, 32) uint8 array of digests and, for augmented views,
        their view numbers."""
        n = len(digests)
        if views is not None and self.width != key_width([views]):  # the space holds no views
            return np.full(n, -1, dtype=np.int64)
        return self._find(encode_keys(digests, views, self.width), np.ones(n, dtype=bool))

    def contains_digests(self, digests: np.ndarray, views: np.ndarray | None = None) -> np.ndarray:
        """Which of these rows the space holds (see :meth:`find_digests`), as a bool array."""
        return self.find_digests(digests, views) >= 0

    def contains(self, keys: Sequence[str]) -> np.ndarray:
        """Which of ``keys`` the space holds, as a bool array."""
        return self.find(keys) >= 0

    def locate(self, rows: np.ndarray) -> np.ndarray:
        """Positions from :meth:`find` (all found) → (segment number, row in it) as an (N, 2) int64 array."""
        seg = np.searchsorted(self.offsets, rows, side="right") - 1
        return np.stack([seg, rows - self.offsets[seg]], axis=1).astype(np.int64).reshape(len(rows), 2)

    def reads(self) -> int:
        """Chunks of sorted keys read from storage so far, over all segments."""
        return sum(v.reads for v in self._search.values() if isinstance(v, SortedSearch))

    # ------------------------------------------------------------------ a read-only set of key strings

    def full(self) -> RowIndex:
        """The space-wide row index over the same segments (those whose keys are sound), built on first use:
        what ``len`` and iteration need (every key)."""
        if self._full is None:
            sound = [seg for s, seg in enumerate(self.segments) if self._segment_keys(s) is not None]
            self._full = RowIndex(sound)
        return self._full

    def __len__(self) -> int:
        return len(self.full())

    def __iter__(self) -> Iterator[str]:
        return iter(self.full())
