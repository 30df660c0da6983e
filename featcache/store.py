"""The Zarr v3 store: feature spaces of content-addressed rows, and dataset views over them.

Layout (all arrays + JSON, nothing executable)::

    STORE/                          root attrs: {"featcache": {"format_version": 1}}
      spaces/<space>/               attrs: the space's provenance (backbone, layer, weights, ...)
        segments/<segment>/         one writer's rows; attrs "committed" is written last
          features  (N, *shape)     float16/float32, Blosc-zstd + CRC32C, sharded along rows
          sha256    (N,)            content hash of the image bytes each row came from
      sets/<set>/                   a dataset view; attrs: classes, counts, skipped files, ...
        <split>/sha256, labels, paths

A row is keyed by the hash of its image bytes, so the same bytes are never pushed through
the same frozen network twice. Writers never touch committed data: each writes a new
segment and commits it by setting one attribute last; readers ignore uncommitted groups.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from .errors import AmbiguousSet, SetNotFound, StoreError
from .sets import FeatureSet

__all__ = [
    "FORMAT_VERSION",
    "Store",
    "FeatureSet",
    "SegmentWriter",
    "open_store",
    "space_key",
    "digest_key",
    "default_compressor",
    "now_iso",
    "created_by",
    "group_bytes",
    "human_bytes",
]

FORMAT_VERSION = 1
_CHUNK_BYTES = 2 << 20  # ~2 MiB uncompressed per chunk: large enough for zstd, small for random reads
_CHUNKS_PER_SHARD = 32  # one file per ~64 MiB of rows


def human_bytes(n: float) -> str:
    """1234567 → '1.2 MB' (decimal units)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def created_by() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def digest_key(obj: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``obj`` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:length]


def space_key(provenance: dict) -> str:
    """Short, stable key of a feature space (backbone, layer, weights digest, preprocessing, pool, dtype)."""
    return digest_key(provenance, 16)


def default_compressor() -> list:
    """Blosc-zstd level 1, no shuffle (chosen from benchmarks/README.md: the smallest files at the
    fastest zstd write speed for CNN features), then a CRC32C checksum so a corrupted chunk is
    detected on read."""
    return [BloscCodec(cname="zstd", clevel=1, shuffle="noshuffle"), Crc32cCodec()]


def _require(parent: zarr.Group, name: str) -> zarr.Group:
    """``require_group`` that tolerates another writer creating the same group at the same moment."""
    try:
        return parent.require_group(name)
    except zarr.errors.ContainsGroupError:
        return parent[name]


def _row_layout(n: int, shape: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    row_bytes = max(1, int(np.prod(shape)) * itemsize)
    chunk = int(max(1, min(4096, _CHUNK_BYTES // row_bytes, n)))  # a chunk never pads past the rows
    shard = chunk * _CHUNKS_PER_SHARD
    shard = min(shard, -(-max(n, 1) // chunk) * chunk)  # no shard larger than the rows it will hold
    return chunk, shard


class SegmentWriter:
    """Appends rows to a new segment, shard by shard; ``commit`` makes them visible.

    Rows are buffered until a whole shard is full, so each shard is written once (Zarr
    rewrites a shard on every partial write).
    """

    def __init__(self, group: zarr.Group, capacity: int, shape: tuple[int, ...], dtype: str, compressor: Any):
        self.group = group
        self.dtype = np.dtype(dtype)
        chunk, shard = _row_layout(capacity, shape, self.dtype.itemsize)
        self.shard_rows = shard
        self.features = group.create_array(
            "features",
            shape=(max(capacity, 1),) + tuple(shape),
            chunks=(chunk,) + tuple(shape),
            shards=(shard,) + tuple(shape),
            dtype=self.dtype,
            compressors=compressor,
        )
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._hashes: list[str] = []
        self.rows = 0  # rows flushed to storage

    def append(self, features: np.ndarray, hashes: list[str]) -> None:
        if len(features) != len(hashes):
            raise ValueError("features and hashes differ in length")
        if not len(hashes):
            return
        self._buffer.append(np.ascontiguousarray(features, dtype=self.dtype))
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
            self.rows += whole
        rest = block[whole:]
        self._buffer = [rest] if len(rest) else []
        self._buffered = len(rest)

    def commit(self, **attrs: Any) -> int:
        """Write the remaining rows and the hashes, then the marker. Returns rows committed."""
        self._flush(final=True)
        if self.rows != self.features.shape[0]:
            self.features.resize((self.rows,) + self.features.shape[1:])
        sha = self.group.create_array(
            "sha256", shape=(self.rows,), dtype=str, chunks=(max(self.rows, 1),), compressors=default_compressor()
        )
        if self.rows:
            sha[:] = np.array(self._hashes, dtype=str)
        self.group.attrs.update({**attrs, "rows": self.rows, "committed_at": now_iso()})
        self.group.attrs["committed"] = True  # the marker, written last
        return self.rows

    def nbytes_stored(self) -> int:
        return int(self.features.nbytes_stored())


@dataclass
class _Segment:
    key: str
    features: zarr.Array
    sha256: np.ndarray


class Store:
    """A featcache store at a local path or fsspec URL."""

    def __init__(self, url: str, root: zarr.Group):
        self.url = url
        self.root = root
        self._index_cache: dict[str, tuple] = {}

    # ------------------------------------------------------------------ spaces and rows

    def ensure_space(self, provenance: dict) -> str:
        key = space_key(provenance)
        group = _require(_require(self.root, "spaces"), key)
        if "space" not in group.attrs:
            group.attrs.update({"space": provenance, "created_at": now_iso()})
        return key

    def _committed_segments(self, space: str) -> list[_Segment]:
        return self._index(space)[0]

    def _index(self, space: str) -> tuple[list[_Segment], dict[str, tuple[int, int]]]:
        """Committed segments, and content hash → (segment number, row) over them (first wins).

        Cached per space while its committed segments stay the same: a reader gathering
        several splits lists the segments each time but reads their hashes once.
        """
        committed = [(k, g) for k, g in self.segment_groups(space) if g.attrs.get("committed") is True]
        names = tuple(k for k, _ in committed)
        cached = self._index_cache.get(space)
        if cached is not None and cached[0] == names:
            return cached[1], cached[2]
        segments = [_Segment(k, g["features"], np.asarray(g["sha256"][:])) for k, g in committed]
        index: dict[str, tuple[int, int]] = {}
        for s, seg in enumerate(segments):
            for r, h in enumerate(seg.sha256.tolist()):
                index.setdefault(h, (s, r))
        self._index_cache[space] = (names, segments, index)
        return segments, index

    def space_stats(self, space: str) -> dict[str, int]:
        """Rows, bytes on disk and uncompressed bytes over the space's committed segments."""
        rows = stored = raw = 0
        for seg in self._committed_segments(space):
            rows += seg.features.shape[0]
            stored += int(seg.features.nbytes_stored())
            raw += int(seg.features.nbytes)
        return {"rows": rows, "bytes_stored": stored, "bytes_raw": raw}

    def spaces(self) -> list[str]:
        try:
            return sorted(self.root["spaces"].group_keys())
        except KeyError:
            return []

    def segment_groups(self, space: str) -> list[tuple[str, zarr.Group]]:
        """All segments of a space, committed or not, oldest first."""
        try:
            return sorted(self.root["spaces"][space]["segments"].groups())
        except KeyError:
            return []

    def known_hashes(self, space: str) -> set[str]:
        return set(self._index(space)[1])

    def new_segment(
        self, space: str, capacity: int, shape: tuple[int, ...], dtype: str, compressor: Any = None
    ) -> SegmentWriter:
        key = f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        group = _require(self.root["spaces"][space], "segments").create_group(key)
        group.attrs.update({"created_at": now_iso(), "created_by": created_by(), "committed": False})
        return SegmentWriter(group, capacity, shape, dtype, compressor or default_compressor())

    def locate(self, space: str, keys: Iterable[str]) -> tuple[list[_Segment], np.ndarray]:
        """The committed segments of ``space`` and, per key, its (segment number, row) as an (N, 2) array."""
        segments, index = self._index(space)
        keys = list(keys)
        try:
            where = np.array([index[k] for k in keys], dtype=np.int64).reshape(len(keys), 2)
        except KeyError as e:
            raise StoreError(
                f"row for image {str(e.args[0])[:12]} is missing from space {space} (removed or never committed). "
                "Re-run featcache extract to restore it."
            ) from None
        return segments, where

    def gather(self, space: str, hashes: Iterable[str], shape: tuple[int, ...], dtype: str) -> np.ndarray:
        segments, located = self.locate(space, hashes)
        out = np.empty((len(located),) + tuple(shape), dtype=dtype)
        where: dict[int, list[tuple[int, int]]] = {}
        for i, (s, r) in enumerate(located.tolist()):
            where.setdefault(s, []).append((i, r))
        for s, pairs in where.items():
            arr = segments[s].features
            dest = np.array([i for i, _ in pairs])
            rows = np.array([r for _, r in pairs])
            try:
                whole = np.arange(arr.shape[0])
                if len(where) == 1 and np.array_equal(rows, whole) and np.array_equal(dest, whole):
                    return arr[:]  # the common case: one segment, in order; no copy
                if len(rows) * 4 >= arr.shape[0]:  # most of the segment: one sequential read
                    out[dest] = arr[:][rows]
                else:
                    order = np.argsort(rows)
                    out[dest[order]] = arr.oindex[rows[order]]
            except Exception as e:  # checksum mismatch, codec error, shape mismatch ...
                raise StoreError(
                    f"cannot read segment {segments[s].key} of space {space}: {e.__class__.__name__}: {e}. "
                    "See: featcache verify"
                ) from None
        return out

    # ------------------------------------------------------------------ dataset views

    def set_groups(self) -> list[tuple[str, str, zarr.Group]]:
        """(key, group name, group) of committed sets; a key may have several identical instances."""
        try:
            sets = self.root["sets"]
        except KeyError:
            return []
        out = []
        for name, group in sets.groups():
            attrs = group.attrs
            if attrs.get("committed") is True and isinstance(attrs.get("key"), str):
                out.append((attrs["key"], name, group))
        return out

    def write_set(self, key: str, attrs: dict, splits: dict[str, dict[str, np.ndarray]]) -> FeatureSet:
        """Record a dataset view. Each writer uses its own group, so concurrent writers never collide."""
        for k, _, group in self.set_groups():
            if k == key:
                return FeatureSet(self, key, group)
        group = _require(self.root, "sets").create_group(f"{key}-{uuid.uuid4().hex[:8]}")
        group.attrs.update({"committed": False, "created_at": now_iso()})
        for split, arrays in splits.items():
            sub = group.create_group(split)
            n = len(arrays["sha256"])
            for name, values in arrays.items():
                dtype = str if name in ("sha256", "paths") else values.dtype
                arr = sub.create_array(name, shape=(n,), dtype=dtype, chunks=(max(n, 1),), compressors=default_compressor())
                if n:
                    arr[:] = values
        group.attrs.update({**attrs, "key": key, "committed_at": now_iso()})
        group.attrs["committed"] = True
        return FeatureSet(self, key, group)

    def set_keys(self) -> list[str]:
        """Keys of committed sets, oldest first."""
        first: dict[str, str] = {}
        for key, _, group in self.set_groups():
            created = str(group.attrs.get("created_at", ""))
            first[key] = min(first.get(key, created), created)
        return [k for k, _ in sorted(first.items(), key=lambda kv: (kv[1], kv[0]))]

    def sets(self) -> list[FeatureSet]:
        return [self.get_set(k) for k in self.set_keys()]

    def get_set(self, key: str | None = None) -> FeatureSet:
        """The set whose key starts with ``key``; with no key, the most recently created one."""
        keys = self.set_keys()
        if not keys:
            raise SetNotFound(f"no feature sets in {self.url}. Run featcache extract first.")
        if key is None:
            chosen = keys[-1]
        else:
            matches = [k for k in keys if k.startswith(key)]
            if not matches:
                raise SetNotFound(f"no set {key!r} in {self.url}. Sets: {', '.join(keys)}. See: featcache ls", option="--set")
            if len(matches) > 1:
                raise AmbiguousSet(f"{key!r} matches several sets: {', '.join(matches)}. Give more of the key.")
            chosen = matches[0]
        group = next(g for k, _, g in self.set_groups() if k == chosen)
        return FeatureSet(self, chosen, group)

    def remove_set(self, key: str) -> FeatureSet:
        """Remove a dataset view (all its instances). Its rows stay until ``gc``."""
        fs = self.get_set(key)
        sets = self.root["sets"]
        for k, name, _ in self.set_groups():
            if k == fs.key:
                del sets[name]
        return fs


    def set_bytes(self, fs: FeatureSet) -> int:
        """Bytes on disk of the rows a set uses (whole segments it draws on) plus its own arrays."""
        wanted = set(fs.hashes_all())
        total = group_bytes(fs.group)
        for seg in self._committed_segments(fs.space):
            if wanted.intersection(seg.sha256.tolist()):
                total += int(seg.features.nbytes_stored())
        return total


def group_bytes(group: zarr.Group) -> int:
    """Bytes stored under a group (all its arrays, recursively)."""
    total = 0
    for _, member in group.members():
        total += int(member.nbytes_stored()) if isinstance(member, zarr.Array) else group_bytes(member)
    return total


def _version_of(root: zarr.Group) -> int | None:
    meta = root.attrs.get("featcache")
    if not isinstance(meta, dict) or not isinstance(meta.get("format_version"), int):
        return None
    return meta["format_version"]


def _keep_group_writable(url: str) -> None:
    """In a group-writable store directory (a team's shared store), new files stay group-writable."""
    if "://" in url and not url.startswith("file://"):
        return
    path = url.removeprefix("file://")
    try:
        shared = os.stat(path).st_mode & 0o020
    except OSError:
        return
    if shared:
        current = os.umask(0)
        os.umask(current & ~0o070)


def open_store(url: str, mode: str = "a") -> Store:
    """Open a featcache store: ``"a"`` to write, creating it if missing; ``"r+"`` to write an
    existing one (``rm``, ``gc``: a mistyped URL must not leave an empty store); ``"r"`` to read.

    ``url`` is a local path or any fsspec URL (``s3://bucket/path``; credentials and endpoint
    come from the usual environment variables).
    """
    url = str(url)
    if mode != "r":
        _keep_group_writable(url)
    try:
        root = zarr.open_group(url, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        if mode != "a":
            raise StoreError(
                f"no featcache store at {url}. Run featcache extract --store {url} first.", option="--store"
            ) from None
        try:  # metadata and version in one write, so a concurrent reader never sees a bare group
            root = zarr.create_group(url, zarr_format=3, attributes={"featcache": {"format_version": FORMAT_VERSION}})
            return Store(url, root)
        except zarr.errors.ContainsGroupError:  # another writer created it first
            return open_store(url, mode)
        except (OSError, ValueError) as e:  # a path that is a file, a read-only place ...
            raise StoreError(f"cannot create a featcache store at {url} ({e.__class__.__name__}: {e})", option="--store") from None
    except Exception as e:  # a path that is a file, a v2 store, garbage metadata ...
        raise StoreError(
            f"{url} is not a readable featcache store ({e.__class__.__name__}: {e})", option="--store"
        ) from None
    version = _version_of(root)
    if version is None:
        raise StoreError(f"{url} is a Zarr group but not a featcache store (no featcache format_version).", option="--store")
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{url} was written by a newer featcache (store format {version}; this one reads up to "
            f"{FORMAT_VERSION}). Upgrade featcache: pip install -U featcache"
        )
    if mode != "r":
        root = zarr.open_group(url, mode="a")
    return Store(url, root)
