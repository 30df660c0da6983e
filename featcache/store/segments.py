"""Segments: one writer's rows of a feature space, their integrity record and the row keys.

Layout (all arrays + JSON, nothing executable)::

    spaces/<space>/segments/<segment>/   one writer's rows; attrs: created_at, created_by, committed=false
        features  (N, *shape)       float16/float32, Blosc-zstd + CRC32C, sharded along rows,
                                    fill value NaN, every chunk written (none left implicit)
        sha256    (N, 32) uint8     row keys: the SHA-256 of the image bytes each row came from
        view      (N,) int32        augmented-view spaces only: the view number of each row
        sorted    (N, 2) uint64     the keys in sorted order with their rows (see :mod:`.sortedkeys`)
                                    commit: attrs rows, integrity, sorted, committed_at, then committed=true last

The integrity record, written before the marker, says what the segment must contain:
``{"features": {"shape", "chunk_rows", "crc32": [one per chunk of decoded rows]},
"sha256": {"sha256": SHA-256 of the array's bytes}, "view": {...}}``. A segment whose shards, chunks or keys do not
match it is damaged: its rows are treated as missing (a re-run of extract recomputes them),
never as zeros.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
import zarr

from ..errors import StoreError
from ..keys import row_key
from .chunks import ChunkReader
from .groups import ARRAY_CONFIG, commit_stamp, digest_values, mark_committed, read_checked, write_array
from .rowkeys import encode_keys, key_width
from .sortedkeys import write_sorted

__all__ = [
    "Segment",
    "SegmentWriter",
    "chunk_crc",
    "check_segment",
    "superseded",
    "keys_to_arrays",
    "arrays_to_keys",
    "hashes_to_array",
    "encode_strings",
    "decode_strings",
]

_CHUNK_BYTES = 2 << 20  # ~2 MiB uncompressed per chunk: large enough for zstd, small for random reads
_CHUNKS_PER_SHARD = 32  # one file per ~64 MiB of rows
KEY_CHUNK_BYTES = 128 << 10  # the keys (sha256, view): one shard file of 128 KiB inner chunks, decoded one at a time


def keys_to_arrays(keys: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """Row keys (``<hex>`` or ``<hex>:<view>``) → the ``sha256`` (N, 32) uint8 array and the ``view`` array (or None)."""
    digests = np.frombuffer(bytes.fromhex("".join(k[:64] for k in keys)), dtype=np.uint8).reshape(len(keys), 32)
    views = [k[65:] for k in keys]
    if not any(views):
        return digests, None
    if not all(views):
        raise ValueError("a segment holds either plain rows or augmented views, not both")
    return digests, np.array([int(v) for v in views], dtype=np.int32)


def arrays_to_keys(digests: np.ndarray, views: np.ndarray | None = None) -> list[str]:
    """The inverse of :func:`keys_to_arrays`."""
    text = np.ascontiguousarray(digests, dtype=np.uint8).tobytes().hex()
    base = [text[i : i + 64] for i in range(0, len(text), 64)]
    return base if views is None else [row_key(b, v) for b, v in zip(base, views.tolist())]


def hashes_to_array(hashes) -> np.ndarray:
    """SHA-256 hex digests → (N, 32) uint8."""
    return keys_to_arrays(list(hashes))[0]


def encode_strings(values: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings → a UTF-8 ``uint8`` blob and ``int64`` offsets (N + 1; string i is blob[off[i]:off[i+1]])."""
    parts = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    return np.frombuffer(b"".join(parts), dtype=np.uint8).copy(), offsets


def decode_strings(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    """The inverse of :func:`encode_strings`; raises ValueError on offsets that do not fit the blob."""
    off = np.asarray(offsets)
    if off.ndim != 1 or len(off) < 1 or off[0] != 0 or off[-1] != len(blob) or (np.diff(off) < 0).any():
        raise ValueError("string offsets do not fit their blob")
    data = np.ascontiguousarray(blob, dtype=np.uint8).tobytes()
    return [data[a:b].decode("utf-8") for a, b in zip(off[:-1].tolist(), off[1:].tolist())]


def _row_layout(n: int, shape: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    row_bytes = max(1, int(np.prod(shape)) * itemsize)
    chunk = int(max(1, min(4096, _CHUNK_BYTES // row_bytes, n)))  # a chunk never pads past the rows
    shard = chunk * _CHUNKS_PER_SHARD
    shard = min(shard, -(-max(n, 1) // chunk) * chunk)  # no shard larger than the rows it will hold
    return chunk, shard


def chunk_crc(block: np.ndarray) -> int:
    """CRC-32 of a chunk's decoded rows (C order, stored dtype)."""
    return zlib.crc32(np.ascontiguousarray(block).view(np.uint8).reshape(-1)) & 0xFFFFFFFF


class SegmentWriter:
    """Appends rows to a new segment, shard by shard; ``commit`` makes them visible.

    Rows are buffered until a whole shard is full, so each shard is written once (Zarr
    rewrites a shard on every partial write). The CRC of every chunk is taken as it is
    written and recorded in the integrity record at commit.
    """

    def __init__(self, group: zarr.Group, capacity: int, shape: tuple[int, ...], dtype: str, compressor: Any):
        self.group = group
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)
        chunk, shard = _row_layout(capacity, shape, self.dtype.itemsize)
        self.chunk_rows, self.shard_rows = chunk, shard
        self.features = group.create_array(
            "features",
            shape=(max(capacity, 1),) + self.shape,
            chunks=(chunk,) + self.shape,
            shards=(shard,) + self.shape,
            dtype=self.dtype,
            fill_value=np.nan,
            compressors=compressor,
            config=ARRAY_CONFIG,
        )
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._hashes: list[str] = []
        self._crcs: list[int] = []
        self.rows = 0  # rows flushed to storage

    def append(self, features: np.ndarray, hashes: list[str]) -> None:
        if len(features) != len(hashes):
            raise ValueError("features and hashes differ in length")
        if not len(hashes):
            return
        block = np.ascontiguousarray(features, dtype=self.dtype)
        if not np.isfinite(block).all():  # never committed: a NaN row would pass for data
            raise ValueError("refusing to store non-finite features")
        self._buffer.append(block)
        self._buffered += len(features)
        self._hashes.extend(hashes)
        if self._buffered >= self.shard_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._buffer:
            return
        block = np.concatenate(self._buffer)
        whole = len(block) if final else (len(block) // self.shard_rows) * self.shard_rows
        if whole:
            self.features[self.rows : self.rows + whole] = block[:whole]
            for start in range(0, whole, self.chunk_rows):  # self.rows is shard-aligned, so chunks align too
                self._crcs.append(chunk_crc(block[start : start + self.chunk_rows]))
            self.rows += whole
        rest = block[whole:]
        self._buffer = [rest] if len(rest) else []
        self._buffered = len(rest)

    def commit(self, **attrs: Any) -> int:
        """Write the remaining rows, the keys and the integrity record, then the marker. Returns rows committed."""
        self._flush(final=True)
        if self.rows != self.features.shape[0]:
            self.features.resize((self.rows,) + self.features.shape[1:])
        digests, views = keys_to_arrays(self._hashes)
        integrity = {"features": {"shape": [self.rows, *self.shape], "chunk_rows": self.chunk_rows, "crc32": self._crcs}}
        for name, values in (("sha256", digests), ("view", views)):
            if values is not None:
                write_array(self.group, name, values, inner_bytes=KEY_CHUNK_BYTES)
                integrity[name] = {"sha256": digest_values(values)}
        # the keys in sorted order, so that a lookup reads only the chunks it needs (see sortedkeys.py)
        searched = write_sorted(self.group, encode_keys(digests, views, key_width([views])))
        self.group.attrs.update({**attrs, "rows": self.rows, "integrity": integrity, "sorted": searched,
                                 **commit_stamp()})
        mark_committed(self.group)  # the marker, written last
        return self.rows

    def nbytes_stored(self) -> int:
        return int(self.features.nbytes_stored())


class Segment:
    """A committed segment that matched its integrity record when it was opened. Its keys (``digests``, ``views``)
    are read on first use when it was opened without them (:func:`check_segment` with ``keys=False``), and
    compared with the integrity record then: ValueError when they differ."""

    def __init__(self, key: str, features: Any, digests: np.ndarray | None, views: np.ndarray | None, chunk_rows: int,
                 crc32: list[int], *, rows: int | None = None, viewed: bool | None = None,
                 group: zarr.Group | None = None, keys_from: tuple | None = None):
        self.key = key
        self.features = features
        self.chunk_rows = chunk_rows
        self.crc32 = crc32
        self.group = group  # where its arrays are (None for a segment made in memory)
        self._digests = digests  # (N, 32) uint8: the row keys' SHA-256 digests
        self._views = views  # (N,) int32: the view numbers, in an augmented-view segment
        self._rows = len(digests) if digests is not None else int(rows or 0)
        self.viewed = views is not None if digests is not None else bool(viewed)
        self._keys_from = keys_from  # (sha256 digest, view digest): what the keys must match when read
        self._chunks: ChunkReader | None = None

    def __repr__(self) -> str:
        return f"Segment({self.key!r}, rows={self.rows})"

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def keys_read(self) -> bool:
        """Whether its keys are in memory (read, or given)."""
        return self._digests is not None

    def _read_keys(self) -> None:
        digest, view_digest = self._keys_from or (None, None)
        if self.group is None:
            raise ValueError("its row keys are not at hand")
        digests = read_checked(self.group, "sha256", digest, "uint8", (32,))
        views = read_checked(self.group, "view", view_digest, "int32") if self.viewed else None
        if len(digests) != self._rows or (views is not None and len(views) != self._rows):
            raise ValueError("row keys and rows differ in number")
        self._digests, self._views = digests, views

    @property
    def digests(self) -> np.ndarray:
        """(N, 32) uint8: the row keys' SHA-256 digests (read and checked on first use)."""
        if self._digests is None:
            self._read_keys()
        assert self._digests is not None
        return self._digests

    @digests.setter
    def digests(self, value: np.ndarray) -> None:
        self._digests = value

    @property
    def views(self) -> np.ndarray | None:
        """(N,) int32: the view numbers, in an augmented-view segment; None in a plain one."""
        if self.viewed and self._views is None:
            self._read_keys()
        return self._views

    @property
    def sha256(self) -> np.ndarray:
        """The row keys as strings (``<hex>`` or ``<hex>:<view>``), made on each call: the index holds bytes."""
        return np.array(arrays_to_keys(self.digests, self.views), dtype=object)

    def row_keys(self, width: int) -> np.ndarray:
        """The row keys as :func:`encode_keys` of ``width``."""
        return encode_keys(self.digests, self.views, width)

    def check_chunk(self, start: int, block: np.ndarray, space: str) -> None:
        """Compare one whole decoded chunk with its recorded CRC."""
        i = start // self.chunk_rows
        if start % self.chunk_rows == 0 and i < len(self.crc32) and chunk_crc(block) != self.crc32[i]:
            raise StoreError(
                f"segment {self.key} of space {space}, chunk {i} (rows {start}-{start + len(block) - 1}): contents "
                "differ from the integrity record. See: featcache verify"
            )

    @property
    def chunks(self) -> ChunkReader:
        """Whole chunks of ``features`` decoded straight from the shard files (see ``chunks.py``)."""
        if self._chunks is None:
            self._chunks = ChunkReader(self.features)
        return self._chunks

    def read_chunk(self, chunk: int, space: str, out: np.ndarray | None = None) -> np.ndarray:
        """The rows of one chunk, decoded (into ``out`` when given) and compared with the recorded CRC."""
        try:
            rows = self.chunks.read(chunk, out)
        except Exception as e:  # checksum mismatch, codec error, missing shard ...
            raise StoreError(
                f"cannot read segment {self.key} of space {space} (chunk {chunk}): {e.__class__.__name__}: {e}. "
                "See: featcache verify"
            ) from None
        self.check_chunk(chunk * self.chunk_rows, rows, space)
        return rows

    def read_rows(self, rows: np.ndarray, space: str) -> np.ndarray:
        """The given rows (sorted ascending), read whole chunk by whole chunk, each chunk compared with its
        recorded CRC first: a row is never returned from a chunk that differs from the integrity record."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows),) + tuple(self.features.shape[1:]), dtype=self.features.dtype)
        if not len(rows):
            return out
        step = self.chunk_rows
        scratch = np.empty((step,) + tuple(self.features.shape[1:]), dtype=self.features.dtype)
        for chunk in np.unique(rows // step).tolist():
            block = self.read_chunk(chunk, space, scratch)
            lo = chunk * step
            a, b = np.searchsorted(rows, lo), np.searchsorted(rows, lo + step)  # rows are sorted
            out[a:b] = block[rows[a:b] - lo]
        return out


def check_segment(name: str, group: zarr.Group, keys: bool = True) -> tuple[Segment | None, str | None]:
    """A committed segment checked against its integrity record: (segment, None) or (None, why it is damaged).
    With ``keys=False`` its row keys are not read yet: they are read, and checked, on first use."""
    a = group.attrs
    integrity = a.get("integrity")
    rows = a.get("rows")
    try:
        feats_rec = integrity["features"]
        shape, chunk_rows, crcs = feats_rec["shape"], feats_rec["chunk_rows"], feats_rec["crc32"]
        digest = integrity["sha256"]["sha256"] if rows else integrity.get("sha256", {}).get("sha256")
        view_digest = integrity["view"]["sha256"] if "view" in integrity else None
        ok = (isinstance(rows, int) and not isinstance(rows, bool) and 0 <= rows < 2**40
              and isinstance(shape, list) and shape and shape[0] == rows
              and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape[1:])
              and isinstance(chunk_rows, int) and chunk_rows > 0 and isinstance(crcs, list)
              and len(crcs) == math.ceil(rows / chunk_rows) and all(isinstance(c, int) for c in crcs)
              and (isinstance(digest, str) or not rows))
    except (TypeError, KeyError):
        ok = False
    if not ok:
        return None, "no valid integrity record"
    try:
        features = group["features"]
        if rows and not keys:
            digests = views = None
        elif rows:
            digests = read_checked(group, "sha256", digest, "uint8", (32,))
            views = read_checked(group, "view", view_digest, "int32") if view_digest is not None else None
            if len(digests) != rows or (views is not None and len(views) != rows):
                raise ValueError("row keys and rows differ in number")
        else:
            digests, views = np.zeros((0, 32), dtype=np.uint8), None
    except ValueError as e:
        return None, f"its row keys: {e}"
    except (Exception, RecursionError) as e:
        return None, f"cannot open its arrays ({e.__class__.__name__})"
    if not isinstance(features, zarr.Array) or list(features.shape) != shape or features.chunks[0] != chunk_rows:
        return None, f"features array is {getattr(features, 'shape', '?')}, the integrity record says {shape}"
    if features.dtype not in (np.float16, np.float32):
        return None, f"features dtype {features.dtype} is not float16/float32"
    if rows:  # every shard file must be there (nchunks_initialized counts whole shards' worth of chunks)
        per_shard = (features.shards or features.chunks)[0] // chunk_rows
        want = math.ceil(rows / (per_shard * chunk_rows))
        have = features.nchunks_initialized // per_shard
        if have != want:
            return None, f"{want - have} of {want} shard files are missing"
    return Segment(name, features, digests, views, chunk_rows, crcs, rows=rows, viewed=view_digest is not None,
                   group=group, keys_from=(digest, view_digest)), None


def superseded(segments: list[Segment], groups: dict[str, zarr.Group]) -> dict[str, str]:
    """Segments that sound compacted segments replace (name → the replacing one's name).

    A ``supersedes`` claim is honoured only while every row key of the segment it names is still held by
    a segment that counts: a segment that lists others it does not hold (hostile, or written by a faulty
    tool), or two that list each other, never make rows disappear, nor let gc free them. The keys are
    compared as sorted byte arrays (no Python object per row)."""
    sound = {seg.key: seg for seg in segments}
    claims: dict[str, str] = {}
    for seg in segments:
        listed = groups[seg.key].attrs.get("supersedes") or []
        for name in listed if isinstance(listed, list) else []:
            if isinstance(name, str) and name != seg.key:
                claims.setdefault(name, seg.key)
    if not claims:
        return claims
    width = key_width(seg.views for seg in segments)
    parts = [seg.row_keys(width) for seg in segments if seg.key not in claims]
    counted = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=f"S{width}")
    for name in sorted(claims):  # a claimed segment whose rows no counted segment holds counts again
        old = sound.get(name)
        if old is None:
            continue
        keys = old.row_keys(width)
        pos = np.minimum(np.searchsorted(counted, keys), max(len(counted) - 1, 0))
        if len(keys) and not (len(counted) and (counted[pos] == keys).all()):
            del claims[name]
            counted = np.union1d(counted, keys)
    return claims
