"""A set's rows read one stored chunk at a time.

``RowReader.load`` fills one preallocated float32 matrix: chunks are decompressed on several
threads and each is upcast (and pooled or flattened) as it arrives, so no second, float16
copy of the whole split is ever held. ``Streamed`` serves splits larger than
``--max-memory``: every epoch visits the chunks in a new order, a window of them at a time,
with the rows of a window shuffled, while the next window is read in the background.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import FeatcacheError, StoreError
from .keys import row_key
from .pooling import prepare_features, prepared_shape
from .units import parse_size

if TYPE_CHECKING:
    from .store import Store
    from .store.locator import RowHint

__all__ = ["RowReader", "Streamed", "memory_budget", "as_dtype"]


def memory_budget(setting: str | int = "auto") -> int:
    """Bytes of features fit may hold in memory: ``auto`` = half of this machine's (or container's) memory."""
    if setting != "auto":
        return parse_size(setting)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:  # a container's limit, when it has one
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total // 2


def as_dtype(x: np.ndarray, dtype: str, where: str) -> np.ndarray:
    """``x`` as the ``dtype`` a reader asked for: float32 as it is; float16 as stored, or cast from a float32
    store only where every value fits (a value past 65504 would become inf: refused, naming ``where``)."""
    if dtype == "float32" or x.dtype == np.float16:
        return x
    with np.errstate(over="ignore"):
        half = x.astype(np.float16)
    if not np.isfinite(half).all() and np.isfinite(x).all():
        raise FeatcacheError(f"{where}: values up to {float(np.abs(x).max()):.4g} do not fit float16 (max 65504); "
                             "use dtype='float32'")
    return half


_GRAIN = 32768  # torch's grain size: a copy this small runs on the calling thread alone


def _upcast(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` (C-contiguous, same shape), float16 → float32 with torch's vectorised conversion
    (about 20x numpy's), in pieces below the grain size so reading threads never start torch's own.
    Where torch is not imported (a scikit-learn head), numpy converts: importing torch costs more."""
    torch = sys.modules.get("torch")
    if src.dtype == dst.dtype or torch is None:
        np.copyto(dst, src)
        return
    d, s = torch.from_numpy(dst.reshape(-1)), torch.from_numpy(np.ascontiguousarray(src).reshape(-1))
    for i in range(0, d.numel(), _GRAIN):
        d[i : i + _GRAIN].copy_(s[i : i + _GRAIN])


def _nonfinite_f16(x: np.ndarray) -> bool:
    """Whether a float16 array holds NaN or inf (exponent bits all set), without a float copy."""
    bits = x.reshape(-1).view(np.uint16)
    return bool(((bits & 0x7C00) == 0x7C00).any())


@dataclass
class _Block:
    """The rows one stored chunk contributes: segment rows ``rows`` (ascending) go to positions ``dest``."""

    segment: int
    start: int
    stop: int
    rows: np.ndarray
    dest: np.ndarray


class RowReader:
    """The rows of ``keys`` in ``space`` as float32, planned by stored chunk."""

    def __init__(self, store: Store, space: str, keys, shape: tuple[int, ...], pool: str = "none",
                 keep_shape: bool = False, threads: int | None = None, hint: RowHint | None = None):
        self.space = space
        self.stored_shape = tuple(shape)
        self.pool = pool
        self.keep_shape = keep_shape
        self.row_shape = prepared_shape(shape, pool, keep_shape)
        self.threads = threads or min(8, os.cpu_count() or 1)
        self.segments, located = store.locate(space, keys, hint)  # hint: where the set recorded them
        self.n = len(located)
        self.blocks = self._plan(located)
        self._local = threading.local()

    def _plan(self, located: np.ndarray) -> list[_Block]:
        blocks = []
        for s in np.unique(located[:, 0]).tolist():
            dest = np.flatnonzero(located[:, 0] == s)
            rows = located[dest, 1]
            order = np.argsort(rows, kind="stable")
            rows, dest = rows[order], dest[order]
            arr = self.segments[s].features
            chunk = arr.chunks[0]
            cuts = np.flatnonzero(np.diff(rows // chunk)) + 1
            for r, d in zip(np.split(rows, cuts), np.split(dest, cuts)):
                start = int(r[0] // chunk) * chunk
                blocks.append(_Block(s, start, min(start + chunk, arr.shape[0]), r, d))
        return blocks

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape)) * 4

    def _scratch(self, seg) -> np.ndarray:
        """This thread's buffer for one decoded chunk of ``seg`` (reused chunk after chunk)."""
        shape = (seg.chunk_rows,) + tuple(seg.features.shape[1:])
        bufs = self._local.__dict__.setdefault("bufs", {})
        key = (shape, seg.features.dtype.str)
        if key not in bufs:
            bufs[key] = np.empty(shape, dtype=seg.features.dtype)
        return bufs[key]

    def _read_into(self, block: _Block, out: np.ndarray, positions: np.ndarray) -> None:
        """Decode the block's chunk into this thread's buffer, check it, and write its rows as float32 to ``out[positions]``."""
        seg = self.segments[block.segment]
        if tuple(seg.features.shape[1:]) != self.stored_shape:
            raise StoreError(f"segment {seg.key} of space {self.space} holds rows of shape {seg.features.shape[1:]}, "
                             f"not {self.stored_shape}; the store may be damaged")
        raw = seg.read_chunk(block.start // seg.chunk_rows, self.space, self._scratch(seg))  # CRC-checked
        if len(block.rows) != len(raw):
            raw = raw[block.rows - block.start]
        finite = np.isfinite(raw).all() if raw.dtype == np.float32 else not _nonfinite_f16(raw)
        if not finite:
            bad = int((~np.isfinite(raw.reshape(len(raw), -1)).all(axis=1)).sum())
            raise StoreError(f"{bad} rows in segment {seg.key} of space {self.space} hold non-finite "
                             "values (NaN or inf); they cannot be trained on. See: featcache verify")
        if not self.keep_shape and raw.ndim == 4 and self.pool in ("avg", "max"):
            out[positions] = prepare_features(raw, self.pool)
            return
        rows = raw.reshape(len(raw), -1)
        flat = out.reshape(len(out), -1)
        cuts = np.flatnonzero(np.diff(positions) != 1) + 1  # runs of consecutive destination rows
        for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(positions)]):
            first = int(positions[a])
            _upcast(flat[first : first + b - a], rows[a:b])

    def _fill(self, out: np.ndarray, blocks: list[_Block], positions: list[np.ndarray], pool: ThreadPoolExecutor) -> None:
        def one(i: int) -> None:
            self._read_into(blocks[i], out, positions[i])

        for _ in pool.map(one, range(len(blocks))):
            pass

    def load(self) -> np.ndarray:
        """All rows, in key order, as one float32 array."""
        out = np.empty((self.n,) + self.row_shape, dtype=np.float32)
        with ThreadPoolExecutor(self.threads) as pool:
            self._fill(out, self.blocks, [b.dest for b in self.blocks], pool)
        return out

    def windows(self, window_bytes: int, rng: np.random.Generator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows, their key positions)`` a window of chunks at a time, the next window read ahead.

        With ``rng`` the chunks come in a random order and the rows of each window are shuffled.
        At most two windows are alive at once, plus one chunk per reading thread; a window
        holds at least one chunk, however small ``window_bytes`` is.
        """
        blocks = [self.blocks[i] for i in rng.permutation(len(self.blocks))] if rng is not None else list(self.blocks)
        groups: list[list[_Block]] = [[]]
        size = 0
        for b in blocks:
            if groups[-1] and size + len(b.rows) * self.row_bytes > window_bytes:
                groups.append([])
                size = 0
            groups[-1].append(b)
            size += len(b.rows) * self.row_bytes
        orders = []  # drawn here, in order, so the shuffle does not depend on thread timing
        for g in groups:
            n = sum(len(b.rows) for b in g)
            orders.append(rng.permutation(n) if rng is not None else np.arange(n))

        def read(i: int) -> tuple[np.ndarray, np.ndarray]:
            g, order = groups[i], orders[i]
            n = len(order)
            at = np.empty(n, dtype=np.int64)
            at[order] = np.arange(n)  # window slot of each row, so the rows land already shuffled
            offsets = np.cumsum([0] + [len(b.rows) for b in g])
            positions = [at[offsets[j] : offsets[j + 1]] for j in range(len(g))]
            x = np.empty((n,) + self.row_shape, dtype=np.float32)
            self._fill(x, g, positions, readers)
            dest = np.empty(n, dtype=np.int64)
            for b, p in zip(g, positions):
                dest[p] = b.dest
            return x, dest

        if not blocks:
            return
        with ThreadPoolExecutor(self.threads) as readers, ThreadPoolExecutor(1) as ahead:
            pending = ahead.submit(read, 0)
            for i in range(len(groups)):
                x, dest = pending.result()
                if i + 1 < len(groups):
                    pending = ahead.submit(read, i + 1)
                yield x, dest
                del x, dest


class Streamed:
    """A split too large for ``--max-memory``, for heads that train in batches.

    ``epoch`` yields shuffled batches: chunk order and rows within a window change every
    epoch (with ``views`` > 0, training reads one augmented view per image, drawn per epoch).
    ``ordered`` yields ``(rows, positions)`` windows of the un-augmented rows for evaluation.
    """

    def __init__(self, store: Store, space: str, hashes: list[str], labels: np.ndarray, shape: tuple[int, ...],
                 pool: str, keep_shape: bool, window_bytes: int, views: int = 0, view_space: str | None = None,
                 hint: RowHint | None = None):
        self.store, self.space, self.hashes, self.labels = store, space, list(hashes), np.asarray(labels)
        self.hint = hint
        self.stored_shape, self.pool, self.keep_shape = tuple(shape), pool, keep_shape
        self.window_bytes = int(window_bytes)
        self.views, self.view_space = views, view_space
        self.row_shape = prepared_shape(shape, pool, keep_shape)

    def __len__(self) -> int:
        return len(self.hashes)

    @property
    def shape(self) -> tuple[int, ...]:
        """As an in-memory array of the prepared rows would have."""
        return (len(self.hashes),) + self.row_shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _reader(self, rng: np.random.Generator | None) -> RowReader:
        if rng is not None and self.views:  # one augmented view per image this epoch
            picks = rng.integers(self.views, size=len(self.hashes))
            return RowReader(self.store, self.view_space, [row_key(h, k) for h, k in zip(self.hashes, picks.tolist())],
                             self.stored_shape, self.pool, self.keep_shape)
        return RowReader(self.store, self.space, self.hashes, self.stored_shape, self.pool, self.keep_shape,
                         hint=self.hint)

    def epoch(self, rng: np.random.Generator, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for x, dest in self._reader(rng).windows(self.window_bytes, rng):
            y = self.labels[dest]
            for i in range(0, len(x), batch_size):
                yield x[i : i + batch_size], y[i : i + batch_size]

    def ordered(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield from self._reader(None).windows(self.window_bytes)
