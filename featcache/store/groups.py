"""Defensive access to the store's groups and small arrays, and the commit marker.

A store may be shared by another team, damaged or hostile: a child group whose metadata cannot
be read, or is larger than :data:`MAX_META_BYTES` (8 MiB), is named in a warning and left out,
so one damaged group never takes the others down. Small arrays (keys, labels, offsets, blobs)
are written whole with every chunk present and read back whole against a recorded SHA-256.

The commit marker: a segment or a set group is created with the attribute ``committed=false``,
its arrays and integrity record are written, then ``committed_at``, and ``committed=true`` last.
A group counts only once the marker is ``true``. This module alone reads or writes the marker
(:func:`uncommitted`, :func:`commit_stamp`, :func:`mark_committed`, :func:`is_committed`,
:func:`committed_at`).
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from ..errors import StoreError
from ..files import read_capped
from ..units import human_bytes, now_iso
from .chunks import ChunkReader

__all__ = [
    "ARRAY_CONFIG",
    "MAX_META_BYTES",
    "MARKER_ATTRS",
    "default_compressor",
    "require_group",
    "child_groups",
    "meta_size",
    "write_array",
    "read_checked",
    "digest_values",
    "group_bytes",
    "is_read_only",
    "uncommitted",
    "commit_stamp",
    "mark_committed",
    "is_committed",
    "committed_at",
]

MAX_META_BYTES = 8 << 20  # a zarr.json larger than this is refused unread (a damaged or hostile store)
_MARKER = "committed"
_COMMITTED_AT = "committed_at"
MARKER_ATTRS = (_MARKER, _COMMITTED_AT)  # what the commit protocol adds to a group's own attributes


# ------------------------------------------------------------------ the commit marker

def uncommitted(**attrs: Any) -> dict:
    """The attributes a segment or set group is created with: ``attrs`` and the marker, false."""
    return {**attrs, _MARKER: False}


def commit_stamp() -> dict:
    """The commit time, written with the integrity record before the marker."""
    return {_COMMITTED_AT: now_iso()}


def mark_committed(group: zarr.Group) -> None:
    """Write the marker: the group counts from now on. Called last, after everything it vouches for."""
    group.attrs[_MARKER] = True


def is_committed(group: zarr.Group | Mapping) -> bool:
    """Whether a group (or its attributes) carries the marker, true."""
    attrs = group.attrs if isinstance(group, zarr.Group) else group
    return attrs.get(_MARKER) is True


def committed_at(group: zarr.Group) -> Any:
    """The recorded commit time (unparsed, as stored: a damaged store may hold anything)."""
    return group.attrs.get(_COMMITTED_AT)


# ------------------------------------------------------------------ groups

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


def meta_size(parent: zarr.Group, name: str) -> int | None:
    """Bytes of the child ``name``'s ``zarr.json``; None when it is not there (yet) or the store cannot tell."""
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
    and left out, so one damaged group never takes the others down. Every child's metadata is asked
    for at once (one round trip's wait for all, not one per child: 20 sets list about as fast as one)."""
    try:  # names from the store's listing: no child's metadata is parsed to list them
        names = sorted(n for n in _list_dir(parent) if n != "zarr.json")
    except Exception as e:
        raise StoreError(f"cannot list {parent.path or 'the store root'}: {e.__class__.__name__}: {e}") from None
    out = []
    for name, got in zip(names, _children(parent, names)):
        problem = None
        if isinstance(got, int):
            problem = f"metadata is {human_bytes(got)}, over the {human_bytes(MAX_META_BYTES)} cap; skipped"
        elif isinstance(got, BaseException):
            problem = f"unreadable metadata ({got.__class__.__name__}); skipped"
        elif isinstance(got, zarr.Group):
            out.append((name, got))
        if problem and warnings is not None and not any(w.startswith(f"{what} {name}:") for w in warnings):
            warnings.append(f"{what} {name}: {problem}")
    return out


_CONCURRENT = 32  # metadata requests in flight at once


def _children(parent: zarr.Group, names: list[str]) -> list:
    """For each child name: its group (None for an array), its metadata size when over the cap (int), or the
    error that stopped its reading. One bounded read of each child's ``zarr.json`` (at most the cap and one
    byte), parsed here: no separate size request, and no second read of it by Zarr."""
    import asyncio
    import json

    from zarr.abc.store import RangeByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.group import AsyncGroup, GroupMetadata
    from zarr.core.sync import sync
    from zarr.storage import StorePath

    limit = asyncio.Semaphore(_CONCURRENT)
    prefix = f"{parent.path}/" if parent.path else ""
    store = parent.store
    prototype = default_buffer_prototype()

    def made(name: str, data: bytes | None):
        if data is None:
            return KeyError(f"{prefix}{name}/zarr.json")
        if len(data) > MAX_META_BYTES:
            return len(data)
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("node_type") != "group":
            return None if isinstance(doc, dict) and doc.get("node_type") == "array" else ValueError("not Zarr metadata")
        if not isinstance(doc.get("attributes", {}), dict):
            return ValueError("attributes are not an object")
        return zarr.Group(AsyncGroup(GroupMetadata.from_dict(doc), StorePath(store, f"{prefix}{name}")))

    folder = local_folder(parent)
    if folder is not None:  # a folder on this machine: plain reads, no event loop or thread per file
        out: list = []
        for name in names:
            try:
                try:  # a FIFO there is refused, not waited on; the read allocates what the file holds
                    data: bytes | None = read_capped(os.path.join(folder, name, "zarr.json"), MAX_META_BYTES)
                except FileNotFoundError:
                    data = None
                out.append(made(name, data))
            except (Exception, RecursionError) as e:
                out.append(e)
        return out

    async def one(name: str):
        async with limit:
            try:
                buf = await store.get(f"{prefix}{name}/zarr.json", prototype, RangeByteRequest(0, MAX_META_BYTES + 1))
                return made(name, None if buf is None else buf.to_bytes())
            except (Exception, RecursionError) as e:
                return e

    async def every() -> list:
        return list(await asyncio.gather(*(one(n) for n in names)))

    return sync(every())


def local_folder(group: zarr.Group) -> str | None:
    """The folder of ``group`` when its store is a folder on this machine (Zarr's ``LocalStore``), else None."""
    from zarr.storage import LocalStore

    store = group.store
    if not isinstance(store, LocalStore):
        return None
    return os.path.join(str(store.root), *group.path.split("/")) if group.path else str(store.root)


def prefixed_groups(parent: zarr.Group, prefix: str) -> list[tuple[str, zarr.Group]] | None:
    """The child groups of ``parent`` whose names start with ``prefix``, sorted by name, their metadata parsed;
    None when any of them cannot be read or is over the size cap (a caller then lists all, with warnings)."""
    out = []
    try:
        for name in sorted(n for n in _list_dir(parent) if n.startswith(prefix)):
            size = meta_size(parent, name)
            member = parent[name] if size is None or size <= MAX_META_BYTES else None
            if not isinstance(member, zarr.Group):
                return None
            dict(member.attrs)
            out.append((name, member))
    except (Exception, RecursionError):
        return None
    return out


def group_bytes(group: zarr.Group) -> int:
    """Bytes stored under a group (all its arrays, recursively)."""
    total = 0
    for _, member in group.members():
        total += int(member.nbytes_stored()) if isinstance(member, zarr.Array) else group_bytes(member)
    return total


def is_read_only(e: BaseException) -> bool:
    """Whether a failed write says the place cannot be written at all (permissions, a read-only mount)."""
    return isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)


# ------------------------------------------------------------------ small arrays

def digest_values(values: np.ndarray) -> str:
    """SHA-256 hex of an array's bytes in C order, little-endian: what any reader can recompute."""
    arr = np.asarray(values)
    contiguous = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    # through the buffer protocol: the bytes ``tobytes()`` gives, without copying them (object arrays have none)
    return hashlib.sha256(contiguous if arr.dtype != object else contiguous.tobytes()).hexdigest()


def write_array(group: zarr.Group, name: str, values: np.ndarray, chunk_bytes: int = 4 << 20,
                inner_bytes: int | None = None) -> zarr.Array:
    """A small core-typed array (keys, labels, offsets, a blob), every chunk written. With ``inner_bytes``, one
    shard file of inner chunks of about that size (a segment's keys): a reader decodes one inner chunk at a
    time into its array, holding that chunk's compressed bytes only, not the whole file's."""
    values = np.ascontiguousarray(values)
    row = max(1, int(np.prod(values.shape[1:])) * values.dtype.itemsize)
    trailing = values.shape[1:]
    if inner_bytes is not None:
        inner = max(1, inner_bytes // row)
        shard = inner * max(1, -(-len(values) // inner))  # one shard holds every row
        arr = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=(inner,) + trailing,
                                 shards=(shard,) + trailing, fill_value=0, compressors=default_compressor(),
                                 config=ARRAY_CONFIG)
        if len(values):
            arr[...] = values
        return arr
    rows = max(1, min(len(values), chunk_bytes // row))
    arr = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=(rows,) + trailing,
                             fill_value=0, compressors=default_compressor(), config=ARRAY_CONFIG)
    if len(values):
        arr[...] = values
    return arr


def read_checked(group: zarr.Group, name: str, digest: str | None, dtype: str, trailing: tuple[int, ...] = ()) -> np.ndarray:
    """A core-typed array read whole and compared with its recorded digest; ValueError says what is wrong."""
    arr = group[name]
    if not isinstance(arr, zarr.Array) or arr.dtype != np.dtype(dtype) or tuple(arr.shape[1:]) != trailing:
        raise ValueError(f"{name!r} is not a {dtype} array of rows of shape {trailing}")
    try:  # decoded in place into one array (no Zarr buffers): a row index reads a segment's keys this way
        values = ChunkReader(arr).read_all()
    except ValueError as e:
        raise ValueError(f"{name!r}: {e}") from None
    if digest is None or digest_values(values) != digest:
        raise ValueError(f"{name!r} differs from its integrity record")
    return values
