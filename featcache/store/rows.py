"""Feature spaces of content-addressed rows: segments, their integrity records, leases, the row
index and ``gather``. The only module that knows how rows lie on disk and how they are committed.

Layout (all arrays + JSON, nothing executable)::

    spaces/<space>/                 attrs: {"space": provenance, "created_at"}
      segments/<segment>/           one writer's rows; attrs: created_at, created_by, committed=false
        features  (N, *shape)       float16/float32, Blosc-zstd + CRC32C, sharded along rows,
                                    fill value NaN, every chunk written (none left implicit)
        sha256    (N, 32) uint8     row keys: the SHA-256 of the image bytes each row came from
        view      (N,) int32        augmented-view spaces only: the view number of each row
                                    commit: attrs rows, integrity, committed_at, then committed=true last
    leases/<lease>/                 attrs: spaces, renewed_at, created_by: a running extract's claim

The integrity record, written before the marker, says what the segment must contain:
``{"features": {"shape", "chunk_rows", "crc32": [one per chunk of decoded rows]},
"sha256": {"sha256": SHA-256 of the array's bytes}, "view": {...}}``. A segment whose shards, chunks or keys do not
match it is damaged: its rows are treated as missing (a re-run of extract recomputes them),
never as zeros.
"""

from __future__ import annotations

import errno
import getpass
import hashlib
import math
import os
import socket
import threading
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from ..units import human_bytes, now_iso, parse_time
from ..keys import row_key, space_key
from ..errors import StoreError
from .chunks import ChunkReader

__all__ = [
    "Rows",
    "Segment",
    "SegmentWriter",
    "Lease",
    "LEASE_TTL_S",
    "digest_values",
    "keys_to_arrays",
    "arrays_to_keys",
    "hashes_to_array",
    "encode_strings",
    "decode_strings",
    "write_array",
    "read_checked",
    "default_compressor",
    "created_by",
    "group_bytes",
    "require_group",
    "child_groups",
    "MAX_META_BYTES",
    "is_read_only",
]

_CHUNK_BYTES = 2 << 20  # ~2 MiB uncompressed per chunk: large enough for zstd, small for random reads
_CHUNKS_PER_SHARD = 32  # one file per ~64 MiB of rows
MAX_META_BYTES = 8 << 20  # a zarr.json larger than this is refused unread (a damaged or hostile store)
LEASE_TTL_S = 600.0  # a lease not renewed for this long belongs to a process that is gone
_LEASE_RENEW_S = 60.0


def created_by() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def digest_values(values: np.ndarray) -> str:
    """SHA-256 hex of an array's bytes in C order, little-endian: what any reader can recompute."""
    arr = np.asarray(values)
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()).hexdigest()


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


def default_compressor() -> list:
    """Blosc-zstd level 1, no shuffle (chosen from benchmarks/README.md: the smallest files at the
    fastest zstd write speed for CNN features), then a CRC32C checksum so a corrupted chunk is
    detected on read."""
    return [BloscCodec(cname="zstd", clevel=1, shuffle="noshuffle"), Crc32cCodec()]


# Every chunk is written, even one equal to the fill value, so a chunk that is absent is a
# chunk that was lost, never one that was implicit.
ARRAY_CONFIG = {"write_empty_chunks": True}


def require_group(parent: zarr.Group, name: str) -> zarr.Group:
    """``require_group`` that tolerates another writer creating the same group at the same moment."""
    try:
        return parent.require_group(name)
    except zarr.errors.ContainsGroupError:
        return parent[name]


def _meta_size(parent: zarr.Group, name: str) -> int | None:
    from zarr.core.sync import sync

    key = f"{parent.path}/{name}/zarr.json" if parent.path else f"{name}/zarr.json"
    try:
        return sync(parent.store.getsize(key))
    except Exception:  # not there (yet), or a store that cannot tell
        return None


def _list_dir(parent: zarr.Group) -> list[str]:
    from zarr.core.sync import sync

    async def names() -> list[str]:
        return [n async for n in parent.store.list_dir(parent.path)]

    return sync(names())


def child_groups(parent: zarr.Group, warnings: list[str] | None = None, what: str = "group") -> list[tuple[str, zarr.Group]]:
    """The child groups of ``parent``, sorted by name; one that cannot be read is named in ``warnings``
    and left out, so one damaged group never takes the others down."""
    try:  # names from the store's listing: no child's metadata is parsed to list them
        names = sorted(n for n in _list_dir(parent) if n != "zarr.json")
    except Exception as e:
        raise StoreError(f"cannot list {parent.path or 'the store root'}: {e.__class__.__name__}: {e}") from None
    out = []
    for name in names:
        size = _meta_size(parent, name)
        if size is not None and size > MAX_META_BYTES:
            if warnings is not None and not any(w.startswith(f"{what} {name}:") for w in warnings):
                warnings.append(f"{what} {name}: metadata is {human_bytes(size)}, over the {human_bytes(MAX_META_BYTES)} cap; skipped")
            continue
        try:
            member = parent[name]
            if isinstance(member, zarr.Group):
                dict(member.attrs)  # parsed now, so a damaged one fails here
                out.append((name, member))
        except (Exception, RecursionError) as e:
            if warnings is not None and not any(w.startswith(f"{what} {name}:") for w in warnings):
                warnings.append(f"{what} {name}: unreadable metadata ({e.__class__.__name__}); skipped")
    return out


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
                write_array(self.group, name, values)
                integrity[name] = {"sha256": digest_values(values)}
        self.group.attrs.update({**attrs, "rows": self.rows, "integrity": integrity, "committed_at": now_iso()})
        self.group.attrs["committed"] = True  # the marker, written last
        return self.rows

    def nbytes_stored(self) -> int:
        return int(self.features.nbytes_stored())


@dataclass
class Segment:
    """A committed segment whose contents matched its integrity record when the index was built."""

    key: str
    features: zarr.Array
    sha256: np.ndarray
    chunk_rows: int
    crc32: list[int]
    _chunks: ChunkReader | None = field(default=None, repr=False, compare=False)

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


def write_array(group: zarr.Group, name: str, values: np.ndarray, chunk_bytes: int = 4 << 20) -> zarr.Array:
    """A small core-typed array (keys, labels, offsets, a blob), every chunk written."""
    values = np.ascontiguousarray(values)
    row = max(1, int(np.prod(values.shape[1:])) * values.dtype.itemsize)
    rows = max(1, min(len(values), chunk_bytes // row))
    arr = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=(rows,) + values.shape[1:],
                             fill_value=0, compressors=default_compressor(), config=ARRAY_CONFIG)
    if len(values):
        arr[...] = values
    return arr


def read_checked(group: zarr.Group, name: str, digest: str | None, dtype: str, trailing: tuple[int, ...] = ()) -> np.ndarray:
    """A core-typed array read whole and compared with its recorded digest; ValueError says what is wrong."""
    arr = group[name]
    if not isinstance(arr, zarr.Array) or arr.dtype != np.dtype(dtype) or tuple(arr.shape[1:]) != trailing:
        raise ValueError(f"{name!r} is not a {dtype} array of rows of shape {trailing}")
    values = arr[...]
    if digest is None or digest_values(values) != digest:
        raise ValueError(f"{name!r} differs from its integrity record")
    return values


def _check_segment(name: str, group: zarr.Group) -> tuple[Segment | None, str | None]:
    """A committed segment checked against its integrity record: (segment, None) or (None, why it is damaged)."""
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
        if rows:
            digests = read_checked(group, "sha256", digest, "uint8", (32,))
            views = read_checked(group, "view", view_digest, "int32") if view_digest is not None else None
            if len(digests) != rows or (views is not None and len(views) != rows):
                raise ValueError("row keys and rows differ in number")
            keys = np.array(arrays_to_keys(digests, views), dtype=object)
        else:
            keys = np.array([], dtype=object)
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
    return Segment(name, features, keys, chunk_rows, crcs), None


def _superseded(segments: list[Segment], groups: dict[str, zarr.Group]) -> dict[str, str]:
    """Segments that sound compacted segments replace (name → the replacing one's name).

    A ``supersedes`` claim is honoured only while every row key of the segment it names is still held by
    a segment that counts: a segment that lists others it does not hold (hostile, or written by a faulty
    tool), or two that list each other, never make rows disappear, nor let gc free them."""
    sound = {seg.key: seg for seg in segments}
    claims: dict[str, str] = {}
    for seg in segments:
        listed = groups[seg.key].attrs.get("supersedes") or []
        for name in listed if isinstance(listed, list) else []:
            if isinstance(name, str) and name != seg.key:
                claims.setdefault(name, seg.key)
    counted: set[str] = set()
    for seg in segments:
        if seg.key not in claims:
            counted.update(seg.sha256.tolist())
    for name in sorted(claims):  # a claimed segment whose rows no counted segment holds counts again
        old = sound.get(name)
        if old is not None and not counted.issuperset(old.sha256.tolist()):
            del claims[name]
            counted.update(old.sha256.tolist())
    return claims


def is_read_only(e: BaseException) -> bool:
    """Whether a failed write says the place cannot be written at all (permissions, a read-only mount)."""
    return isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)


class _NoLease:
    """What a reader of a store it cannot write holds instead of a lease: it writes nothing for gc to spare."""

    held = False

    def release(self) -> None:
        pass

    def __enter__(self) -> "_NoLease":
        return self

    def __exit__(self, *exc) -> None:
        pass


class Lease:
    """A running extract's claim on spaces: gc leaves them alone while it is renewed."""

    held = True

    def __init__(self, parent: zarr.Group, name: str):
        self.parent, self.name = parent, name
        self.group = parent[name]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, daemon=True)
        self._thread.start()

    def _keep(self) -> None:
        while not self._stop.wait(_LEASE_RENEW_S):
            try:
                self.renew()
            except Exception:  # a renewal that fails leaves the lease to expire; the final re-check still runs
                pass

    def renew(self) -> None:
        self.group.attrs["renewed_at"] = now_iso()

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            del self.parent[self.name]
        except Exception:  # gone already, or a store we cannot write: it expires by itself
            pass

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Rows:
    """Spaces, segments, leases and the row index of one store root."""

    url: str
    root: zarr.Group

    def __init__(self) -> None:
        self._index_cache: dict[str, tuple] = {}
        self.warnings: list[str] = []  # damaged groups met while reading, one line each
        self.read_only: str | None = None  # why this process cannot write the store, once a write found out

    def _warn(self, line: str) -> None:
        if line not in self.warnings:
            self.warnings.append(line)

    # ------------------------------------------------------------------ spaces and segments

    def ensure_space(self, provenance: dict) -> str:
        key = space_key(provenance)
        group = require_group(require_group(self.root, "spaces"), key)
        if "space" not in group.attrs:
            group.attrs.update({"space": provenance, "created_at": now_iso()})
        return key

    def spaces(self) -> list[str]:
        try:
            spaces = self.root["spaces"]
        except KeyError:
            return []
        return [k for k, _ in child_groups(spaces, self.warnings, "space")]

    def segment_groups(self, space: str) -> list[tuple[str, zarr.Group]]:
        """All readable segments of a space, committed or not, oldest first."""
        try:
            parent = self.root["spaces"][space]["segments"]
        except KeyError:
            return []
        except (Exception, RecursionError) as e:
            self._warn(f"space {space}: unreadable ({e.__class__.__name__}); skipped")
            return []
        return child_groups(parent, self.warnings, f"space {space} segment")

    def superseded_segments(self, space: str) -> dict[str, str]:
        """Committed segments that a sound compacted segment replaces: name → the replacing segment's name."""
        self._index(space)
        return dict(self._index_cache[space][4])

    def damaged_segments(self, space: str) -> dict[str, str]:
        """Committed segments of ``space`` that do not match their integrity record, with the reason."""
        return dict(self._index(space)[2])

    def _segments_signature(self, space: str) -> tuple | None:
        """On a store in a local folder: (name, inode, size, mtime) of every segment's metadata file, a
        listing and a few ``stat`` calls (0.05 ms, where reading the segments' attributes through
        Zarr takes 3-5 ms). A new, removed or committed segment changes it (a commit rewrites the
        segment's ``zarr.json``). ``None`` elsewhere, or when anything is unexpected."""
        from zarr.storage import LocalStore

        store = self.root.store
        if not isinstance(store, LocalStore):
            return None
        folder = os.path.join(str(store.root), self.root.path, "spaces", space, "segments")
        try:
            sig = []
            with os.scandir(folder) as entries:
                for e in entries:
                    if e.name != "zarr.json":
                        st = os.stat(os.path.join(e.path, "zarr.json"))
                        sig.append((e.name, st.st_ino, st.st_size, st.st_mtime_ns))
            return tuple(sorted(sig))
        except OSError:
            return None

    def _index(self, space: str) -> tuple[list[Segment], dict[str, tuple[int, int]], dict[str, str]]:
        """Sound committed segments, content hash → (segment number, row) over them (the oldest
        segment wins), and the damaged ones. Cached while the committed segments stay the same:
        on a local folder while no segment's metadata file changed, elsewhere while the names of
        the committed segments are the same."""
        sig = self._segments_signature(space)
        cached = self._index_cache.get(space)
        if sig is not None and cached is not None and cached[5] == sig:
            return cached[1:4]
        committed = [(k, g) for k, g in self.segment_groups(space) if g.attrs.get("committed") is True]
        names = tuple(k for k, _ in committed)
        if cached is not None and cached[0] == names:
            self._index_cache[space] = cached[:5] + (sig,)
            return cached[1:4]
        segments: list[Segment] = []
        damaged: dict[str, str] = {}
        for name, group in committed:
            seg, why = _check_segment(name, group)
            if seg is None:
                damaged[name] = why
                self._warn(f"space {space} segment {name} is damaged ({why}); its rows count as missing")
            else:
                segments.append(seg)
        superseded = _superseded(segments, dict(committed))
        segments = [seg for seg in segments if seg.key not in superseded]
        index: dict[str, tuple[int, int]] = {}
        for s, seg in enumerate(segments):
            for r, h in enumerate(seg.sha256.tolist()):
                index.setdefault(h, (s, r))
        self._index_cache[space] = (names, segments, index, damaged, superseded, sig)
        return segments, index, damaged

    def forget_index(self) -> None:
        """Drop the cached row index, so the next lookup sees what other processes did meanwhile."""
        self._index_cache.clear()

    def space_stats(self, space: str) -> dict[str, int]:
        """Rows, bytes on disk and uncompressed bytes over the space's sound committed segments."""
        rows = stored = raw = 0
        for seg in self._index(space)[0]:
            rows += seg.features.shape[0]
            stored += int(seg.features.nbytes_stored())
            raw += int(seg.features.nbytes)
        return {"rows": rows, "bytes_stored": stored, "bytes_raw": raw}

    def known_hashes(self, space: str) -> set[str]:
        return set(self._index(space)[1])

    def new_segment(
        self, space: str, capacity: int, shape: tuple[int, ...], dtype: str, compressor: Any = None
    ) -> SegmentWriter:
        key = f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        group = require_group(self.root["spaces"][space], "segments").create_group(
            key, attributes={"created_at": now_iso(), "created_by": created_by(), "committed": False})
        return SegmentWriter(group, capacity, shape, dtype, compressor or default_compressor())

    def remove_segment(self, space: str, name: str) -> None:
        del self.root["spaces"][space]["segments"][name]

    # ------------------------------------------------------------------ rows

    def locate(self, space: str, keys: Iterable[str]) -> tuple[list[Segment], np.ndarray]:
        """The sound committed segments of ``space`` and, per key, its (segment number, row) as an (N, 2) array."""
        segments, index, damaged = self._index(space)
        keys = list(keys)
        try:
            where = np.array([index[k] for k in keys], dtype=np.int64).reshape(len(keys), 2)
        except KeyError as e:
            hint = (f" Damaged segment(s): {'; '.join(f'{k} ({v})' for k, v in damaged.items())}." if damaged else "")
            raise StoreError(
                f"row for image {str(e.args[0])[:12]} is missing from space {space} (removed, damaged or never "
                f"committed).{hint} Re-run featcache extract to restore it; see: featcache verify"
            ) from None
        return segments, where

    def gather(self, space: str, hashes: Iterable[str], shape: tuple[int, ...], dtype: str) -> np.ndarray:
        """The rows of ``hashes`` in their stored dtype; refuses non-finite values and foreign shapes."""
        segments, located = self.locate(space, hashes)
        out = np.empty((len(located),) + tuple(shape), dtype=dtype)
        where: dict[int, list[tuple[int, int]]] = {}
        for i, (s, r) in enumerate(located.tolist()):
            where.setdefault(s, []).append((i, r))
        for s, pairs in where.items():
            arr = segments[s].features
            if tuple(arr.shape[1:]) != tuple(shape):
                raise StoreError(f"segment {segments[s].key} of space {space} holds rows of shape {arr.shape[1:]}, "
                                 f"not {tuple(shape)}; the store may be damaged")
            dest = np.array([i for i, _ in pairs])
            rows = np.array([r for _, r in pairs])
            try:
                # whole chunks are read and checked against the integrity record, however few rows are wanted:
                # a chunk altered after its commit (its codec checksum intact) must never pass for data
                order = np.argsort(rows, kind="stable")
                out[dest[order]] = segments[s].read_rows(rows[order], space)
            except StoreError:
                raise
            except Exception as e:  # checksum mismatch, codec error, shape mismatch ...
                raise StoreError(
                    f"cannot read segment {segments[s].key} of space {space}: {e.__class__.__name__}: {e}. "
                    "See: featcache verify"
                ) from None
        bad = ~np.isfinite(out.reshape(len(out), -1)).all(axis=1) if len(out) else np.zeros(0, bool)
        if bad.any():
            raise StoreError(f"{int(bad.sum())} rows of space {space} hold non-finite values (NaN or inf); "
                             "the store may be damaged. See: featcache verify")
        return out

    # ------------------------------------------------------------------ leases

    def lease(self, spaces: Iterable[str]) -> Lease | _NoLease:
        """Claim ``spaces`` for a running extract; ``gc`` removes no row of a claimed space.

        On a store this process cannot write (read access only, a read-only mount) there is no claim to
        make: ``read_only`` says why, and the caller may go on as long as it writes nothing."""
        try:
            parent, name = require_group(self.root, "leases"), uuid.uuid4().hex
            parent.create_group(name, attributes={"spaces": sorted(set(spaces)), "renewed_at": now_iso(),
                                                  "created_by": created_by(), "pid": os.getpid(), "ttl_s": LEASE_TTL_S})
        except OSError as e:
            if not is_read_only(e):
                raise
            self.read_only = f"{e.strerror or e.__class__.__name__}: {getattr(e, 'filename', None) or self.url}"
            return _NoLease()
        return Lease(parent, name)

    def leases(self) -> tuple[set[str], list[str]]:
        """Spaces claimed by live leases, and the names of expired or unreadable leases."""
        try:
            parent = self.root["leases"]
        except KeyError:
            return set(), []
        now = datetime.now(timezone.utc)
        live: set[str] = set()
        stale: list[str] = []
        for name, group in child_groups(parent, None, "lease"):
            spaces = group.attrs.get("spaces")
            stamp = parse_time(group.attrs.get("renewed_at"))
            if stamp is None or not isinstance(spaces, list):
                stale.append(name)
                continue
            age = (now - stamp).total_seconds()
            if -LEASE_TTL_S < age < LEASE_TTL_S:
                live.update(s for s in spaces if isinstance(s, str))
            else:
                stale.append(name)
        return live, stale

    def remove_lease(self, name: str) -> None:
        del self.root["leases"][name]


def group_bytes(group: zarr.Group) -> int:
    """Bytes stored under a group (all its arrays, recursively)."""
    total = 0
    for _, member in group.members():
        total += int(member.nbytes_stored()) if isinstance(member, zarr.Array) else group_bytes(member)
    return total
