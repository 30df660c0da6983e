"""Per segment, its row keys in sorted order on disk: a lookup reads only the chunks its keys fall in.

Written by :meth:`~.segments.SegmentWriter.commit` before the commit marker (FORMAT.md "Sorted keys")::

    sorted         (N, 2) uint64   per position in key order: the key's first 8 bytes as a big-endian
                                   integer (its *head*), and the row holding that key; sorted by whole key,
                                   then row; inner chunks of 1024 positions (16 KiB), sharded, Blosc-LZ4
                                   (byte shuffle: 4 us to decode a chunk, where zstd takes 40) + CRC32C
    attrs "sorted": {"chunk_rows": 1024, "fences": the head at the start of each chunk (C = ceil(N / 1024)),
                     big-endian, in hex: 16 digits each}

The fences come with the segment's metadata, read anyway when its segments are listed: opening a
segment's sorted keys is one metadata read (the table's), not three.

A search holds the fences (8 bytes per 1024 rows) and reads, per query, the one or two chunks whose
heads can hold its head (:class:`~.chunks.ChunkReader`: one positioned read each, CRC32C checked), so N
keys among R rows cost O(N log R) and N chunk reads at most, not R keys read and sorted. What it gives
is a candidate, never an answer: the caller compares the row it names with the segment's own keys
(read whole against the integrity record) first. A damaged or rewritten structure can at worst hide a
key (a miss: the row is computed again), never give another image's row. A segment without it (written
before), or whose structure cannot be read, is searched in memory instead (:class:`ExactSearch`: its
keys sorted, as the space-wide row index does).
"""

from __future__ import annotations

import math

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from .chunks import ChunkReader
from .rowkeys import sort_keys

__all__ = ["CHUNK", "heads_of", "write_sorted", "SortedSearch", "ExactSearch", "sorted_search"]

CHUNK = 1024  # positions per inner chunk: 16 KiB, one read each
_SHARD_CHUNKS = 1024  # inner chunks per shard file (16 MiB)
_TABLE, _ATTR = "sorted", "sorted"


def heads_of(keys: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each key (an ``S<width>`` array, or (N, >=8) uint8 rows) as uint64, big-endian:
    they sort as the key bytes do."""
    raw = keys if keys.dtype == np.uint8 else keys.view(np.uint8).reshape(len(keys), keys.dtype.itemsize)
    return np.ascontiguousarray(raw[:, :8]).view(">u8").reshape(len(keys)).astype(np.uint64)


def _key_order(keys: np.ndarray) -> np.ndarray:
    return sort_keys(keys, keys.view(np.uint8).reshape(len(keys), keys.dtype.itemsize))


def write_sorted(group: zarr.Group, keys: np.ndarray) -> dict:
    """Write the sorted keys of a segment whose row keys are ``keys`` (``S<width>``, row order) into its
    ``group``; returns the attribute to record (``{"chunk_rows": ...}``)."""
    n = len(keys)
    order = _key_order(keys)  # stable: among equal keys, the first row first
    table = np.empty((n, 2), dtype=np.uint64)
    table[:, 0] = heads_of(keys)[order]
    table[:, 1] = order
    chunks = max(1, math.ceil(n / CHUNK))
    shard = CHUNK * min(chunks, _SHARD_CHUNKS)
    arr = group.create_array(_TABLE, shape=(n, 2), dtype=np.uint64, chunks=(CHUNK, 2), shards=(shard, 2),
                             fill_value=0, config={"write_empty_chunks": True},  # every chunk written (groups.py)
                             compressors=[BloscCodec(cname="lz4", clevel=1, shuffle="shuffle"), Crc32cCodec()])
    if n:
        arr[...] = table
    return {"chunk_rows": CHUNK, "fences": table[::CHUNK, 0].astype(">u8").tobytes().hex()}


class ExactSearch:
    """One segment's keys sorted in memory (``keys``: its row keys as ``S<width>``): the first row holding
    each query key, or -1. The keys are the segment's own, checked: what it finds needs no other check."""

    def __init__(self, keys: np.ndarray):
        self.keys = keys
        self.order = _key_order(keys)

    def find(self, query: np.ndarray) -> np.ndarray:
        if not len(self.keys):
            return np.full(len(query), -1, dtype=np.int64)
        pos = np.searchsorted(self.keys, query, side="left", sorter=self.order)
        at = self.order[np.minimum(pos, len(self.keys) - 1)].astype(np.int64)
        return np.where((pos < len(self.keys)) & (self.keys[at] == query), at, -1)


class SortedSearch:
    """One segment's persisted sorted keys: ``candidates(heads)`` reads only the chunks those heads fall in."""

    def __init__(self, table: zarr.Array, fences: np.ndarray, rows: int):
        self.reader = ChunkReader(table)
        self.fences = fences
        self.rows = rows
        self._blocks: dict[int, np.ndarray] = {}  # chunks read so far (the same keys are asked again in one run)
        self._whole: tuple[np.ndarray, np.ndarray] | None = None  # (heads, rows) once every chunk is read
        self.reads = 0  # chunks read from storage (for tests and benchmarks)

    def _block(self, i: int) -> np.ndarray:
        block = self._blocks.get(i)
        if block is None:
            block = self.reader.read(i)
            self.reads += 1
            self._blocks[i] = block
        return block

    def _read_whole(self) -> tuple[np.ndarray, np.ndarray]:
        """Every chunk, decoded one at a time into a 16 KiB buffer and its two columns copied out: the heads
        (8 bytes per row) and the rows (4 bytes: a segment holds fewer than 2**32), nothing else held."""
        heads = np.empty(self.rows, dtype=np.uint64)
        rows = np.empty(self.rows, dtype=np.uint32 if self.rows < 2**32 else np.uint64)
        buf = np.empty((CHUNK, 2), dtype=np.uint64)
        for i in range(len(self.fences)):
            block = self._blocks.get(i)
            if block is None:
                block = self.reader.read(i, buf)
                self.reads += 1
            lo = i * CHUNK
            heads[lo : lo + len(block)] = block[:, 0]
            rows[lo : lo + len(block)] = block[:, 1]
        self._blocks.clear()
        return heads, rows

    def _table(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(heads, rows) of the chunks ``wanted`` (ascending), in their order; all of them, kept, when more than
        half are wanted (a search of many keys: one sorted array, 12 bytes per row, searched at once)."""
        if self._whole is None and 2 * len(wanted) > len(self.fences):
            self._whole = self._read_whole()
        if self._whole is not None:
            return self._whole
        blocks = [self._block(i) for i in wanted.tolist()]
        table = np.concatenate(blocks) if blocks else np.zeros((0, 2), np.uint64)
        return np.ascontiguousarray(table[:, 0]), table[:, 1]

    def candidates(self, heads: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Per position whose head equals one of ``heads``: (index into ``heads``, the row it names, which may
        be out of range in a damaged structure). None when there would be more than ``limit`` pairs (many
        keys sharing their first 8 bytes: the views of one image): the caller searches this segment in memory
        instead. Read errors (a chunk that fails its checksum, a missing shard) are raised."""
        if not len(heads) or not len(self.fences):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        first = np.maximum(np.searchsorted(self.fences, heads, side="left") - 1, 0)
        last = np.maximum(np.searchsorted(self.fences, heads, side="right") - 1, first)
        span = last - first + 1
        if int(span.sum()) > 2 * len(heads) + len(self.fences):  # fences not sorted, or heads shared widely
            wanted = np.arange(len(self.fences))
        else:
            mark = np.zeros(len(self.fences), dtype=bool)
            mark[np.arange(int(span.sum())) + np.repeat(first - np.cumsum(span) + span, span)] = True
            wanted = np.flatnonzero(mark)
        keys, rows = self._table(wanted)
        lo = np.searchsorted(keys, heads, side="left")
        hi = np.maximum(np.searchsorted(keys, heads, side="right"), lo)
        count = hi - lo
        total = int(count.sum())
        if total > limit:
            return None
        which = np.repeat(np.arange(len(heads)), count)
        pos = np.arange(total) + np.repeat(lo - np.cumsum(count) + count, count)
        hit = keys[pos] == heads[which]  # an unsorted (damaged) table may put anything there
        return which[hit], rows[pos[hit]].astype(np.int64)


def sorted_search(group: zarr.Group | None, rows: int) -> SortedSearch | None:
    """The persisted sorted keys of the segment in ``group`` holding ``rows`` rows, or None when it has none
    (written before) or they are not what :func:`write_sorted` writes."""
    if group is None:
        return None
    try:
        attr = group.attrs.get(_ATTR)
        if not isinstance(attr, dict) or attr.get("chunk_rows") != CHUNK or not isinstance(attr.get("fences"), str):
            return None
        fences = np.frombuffer(bytes.fromhex(attr["fences"]), dtype=">u8").astype(np.uint64)
        if len(fences) != math.ceil(rows / CHUNK):
            return None
        table = group[_TABLE]
        if (not isinstance(table, zarr.Array) or table.shape != (rows, 2) or table.dtype != np.uint64
                or tuple(table.chunks) != (CHUNK, 2)):
            return None
        return SortedSearch(table, fences, rows)
    except (Exception, RecursionError):  # a malformed attribute (not hex), an array that cannot be opened ...
        return None
