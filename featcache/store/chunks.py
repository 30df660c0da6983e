"""Whole chunks of a store's arrays, read straight from their files into the caller's buffer.

The generic way (``array[a:b]`` through Zarr) decodes into a new array per call, on Zarr's one
event loop, then featcache copies and upcasts it again: 0.12 GB/s for pooled sets on two
cores, and two or three transient copies of what is read. :class:`ChunkReader` reads the
layouts FORMAT.md specifies with no event loop: a ``sharding_indexed`` array (a segment's
``features`` and ``sorted``: index at the end, inner chunks ``bytes`` little-endian → ``blosc``
→ optional ``crc32c``), one positioned read per chunk; or a plain chunked array with the same
codecs (the small arrays: a segment's ``sha256`` keys), one file per chunk. The CRC32C of the
compressed bytes is checked (as Zarr does), then Blosc decompresses into a buffer the caller
passes, on whatever thread calls it (Blosc releases the GIL): what is held is the compressed
chunk and the caller's buffer, nothing more. Any other codec chain (an older or foreign store)
falls back to Zarr's own decoding, so every store that Zarr reads is read.

Nothing here decides what is correct: the caller still compares each decoded chunk with the
segment's integrity record.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import numpy as np
import zarr

from ..files import NotRegularFile, open_regular

__all__ = ["ChunkReader", "MissingChunk"]

_EMPTY = 2**64 - 1
_BLOSC_OVERHEAD = 16  # Blosc's header: a compressed chunk is at most its decoded size and this
_MAX_PER_SHARD = 1 << 22  # inner chunks a shard's index may list (64 MiB of index) before the direct path declines


class MissingChunk(ValueError):
    """A shard's index says it holds no such chunk."""


def _crc32c():
    try:
        import google_crc32c

        return google_crc32c.value  # of bytes: callers read the checksum apart, so nothing is copied
    except ImportError:  # the generic path checks it instead
        return None


class ChunkReader:
    """``read(i, out)`` decodes chunk ``i`` of a row-chunked array into ``out`` (a ``chunk_rows``-row buffer)."""

    def __init__(self, array: zarr.Array):
        self.array = array
        self.chunk_rows = int(array.chunks[0])
        self.rows = int(array.shape[0])
        self.row_shape = tuple(array.shape[1:])
        self.dtype = np.dtype(array.dtype)
        self.chunk_bytes = self.chunk_rows * int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self._indexes: dict[int, np.ndarray] = {}
        self._paths: dict[int, Path] = {}
        self._lock = threading.Lock()
        self._plan = self._fast_plan()

    # ------------------------------------------------------------------ layout

    def _fast_plan(self) -> dict | None:
        """What the fast path needs, or None when the array is not the layout it knows."""
        from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
        from zarr.storage import LocalStore

        def little(codec) -> bool:  # bytes stored little-endian (or single bytes): what the buffers are read as
            endian = getattr(codec, "endian", None)
            return isinstance(codec, BytesCodec) and (endian is None or getattr(endian, "value", endian) == "little")

        def blosc_chain(codecs: list) -> bool:
            return (len(codecs) in (2, 3) and little(codecs[0]) and isinstance(codecs[1], BloscCodec)
                    and (len(codecs) == 2 or isinstance(codecs[2], Crc32cCodec)))

        try:
            codecs = list(self.array.metadata.codecs)
            store = self.array.store_path.store
            if (not isinstance(store, LocalStore) or self.dtype.byteorder not in ("=", "<", "|")
                    or sys.byteorder != "little" or len(self.array.shape) < 1):
                return None
            crc = _crc32c()
            common = {"root": Path(store.root), "prefix": self.array.store_path.path, "crc": crc,
                      "encoding": self.array.metadata.chunk_key_encoding}
            if blosc_chain(codecs):  # plain chunks, one file each; whole rows only (the trailing axes unchunked)
                if tuple(self.array.chunks[1:]) != self.row_shape or (len(codecs) == 3 and crc is None):
                    return None
                return {**common, "sharded": False, "per_shard": 1, "chunk_crc": len(codecs) == 3, "index_crc": False}
            if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
                return None
            shard = codecs[0]
            inner = list(shard.codecs)
            index = list(shard.index_codecs)
            if tuple(shard.chunk_shape) != (self.chunk_rows,) + self.row_shape:
                return None
            if shard.index_location.value != "end":
                return None
            if not blosc_chain(inner):
                return None
            if not (len(index) in (1, 2) and little(index[0])
                    and (len(index) == 1 or isinstance(index[1], Crc32cCodec))):
                return None
            if (len(inner) == 3 or len(index) == 2) and crc is None:
                return None
            shard_rows = int(self.array.shards[0])
            if shard_rows % self.chunk_rows:
                return None
            if shard_rows // self.chunk_rows > _MAX_PER_SHARD:
                return None
            return {**common, "sharded": True, "per_shard": shard_rows // self.chunk_rows,
                    "chunk_crc": len(inner) == 3, "index_crc": len(index) == 2}
        except Exception:  # anything unexpected in the metadata: the generic path decides
            return None

    @property
    def fast(self) -> bool:
        return self._plan is not None

    def _shard_path(self, shard: int) -> Path:
        path = self._paths.get(shard)
        if path is None:
            p = self._plan
            ndim = 1 + len(self.row_shape)
            key = p["encoding"].encode_chunk_key((shard,) + (0,) * (ndim - 1))
            path = self._paths[shard] = p["root"] / (f"{p['prefix']}/{key}" if p["prefix"] else key)
        return path

    def _index(self, shard: int, fd: int, size: int) -> np.ndarray:
        with self._lock:
            cached = self._indexes.get(shard)
        if cached is not None:
            return cached
        p = self._plan
        n = p["per_shard"]
        length = 16 * n + (4 if p["index_crc"] else 0)
        if size < length:
            raise ValueError(f"shard {shard} is shorter than its index")
        raw = os.pread(fd, length, size - length)
        if len(raw) != length:
            raise ValueError(f"shard {shard}: short read of its index")
        if p["index_crc"] and p["crc"](raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise ValueError(f"shard {shard}: its index fails its CRC32C")
        index = np.frombuffer(raw[: 16 * n], dtype="<u8").reshape(n, 2)
        with self._lock:
            self._indexes[shard] = index
        return index

    # ------------------------------------------------------------------ reading

    def read_all(self) -> np.ndarray:
        """The whole array, each chunk decoded in place into one buffer: its rows rounded up to whole chunks
        (the last chunk is stored whole), returned as a view of the first ``rows``. Raises on any damage. A
        chunk that is not stored (no file, or not in its shard's index) reads as the fill value, as Zarr reads it
        (a writer may leave out a chunk equal to it): the caller's integrity check tells a lost chunk."""
        if self._plan is None:
            return np.asarray(self.array[...])
        chunks = -(-self.rows // self.chunk_rows)
        buf = np.empty((chunks * self.chunk_rows,) + self.row_shape, dtype=self.dtype)
        for i in range(chunks):
            part = buf[i * self.chunk_rows : (i + 1) * self.chunk_rows]
            try:
                self.read(i, part)
            except (FileNotFoundError, MissingChunk):
                part[...] = self.array.fill_value
        return buf[: self.rows]

    def valid_rows(self, chunk: int) -> int:
        return min(self.chunk_rows, self.rows - chunk * self.chunk_rows)

    def read(self, chunk: int, out: np.ndarray | None = None) -> np.ndarray:
        """The rows of chunk ``chunk`` (only those inside the array), decoded into ``out`` when given
        (C-contiguous, ``chunk_rows`` rows of the stored dtype); raises on any damage."""
        n = self.valid_rows(chunk)
        if n <= 0:
            raise IndexError(f"chunk {chunk} is past the array's {self.rows} rows")
        if out is None:
            out = np.empty((self.chunk_rows,) + self.row_shape, dtype=self.dtype)
        if self._plan is None:
            start = chunk * self.chunk_rows
            out[:n] = self.array[start : start + n]
            return out[:n]
        from numcodecs import blosc

        p = self._plan
        shard, local = divmod(chunk, p["per_shard"])
        path = self._shard_path(shard)
        try:  # a FIFO or a device put in a chunk's place is refused, never waited on or read
            f = open_regular(path)
        except NotRegularFile as e:
            raise ValueError(f"chunk {chunk}: {path.name} is {e}") from None
        with f:
            fd = f.fileno()
            st = os.fstat(fd)
            if p["sharded"]:
                index = self._index(shard, fd, st.st_size)
                offset, length = (int(v) for v in index[local])
                if offset == _EMPTY:
                    raise MissingChunk(f"chunk {chunk} is missing from its shard")
            else:  # the chunk is the whole file
                offset, length = 0, st.st_size
            # the checksum is read apart from what it covers: the data is one bytes object, never copied
            body = length - 4 if p["chunk_crc"] else length
            if body < 0:
                raise ValueError(f"chunk {chunk}: {length} bytes cannot hold its checksum")
            if body > self.chunk_bytes + _BLOSC_OVERHEAD:  # nothing larger decodes to one chunk: not read
                raise ValueError(f"chunk {chunk}: {body} bytes stored, more than a chunk of {self.chunk_bytes} "
                                 "can take")
            data = os.pread(fd, body, offset)
            stored = os.pread(fd, 4, offset + body) if p["chunk_crc"] else b""
        if len(data) != body or len(stored) != (4 if p["chunk_crc"] else 0):
            raise ValueError(f"chunk {chunk}: short read ({len(data) + len(stored)} of {length} bytes)")
        if p["chunk_crc"] and p["crc"](data) != int.from_bytes(stored, "little"):
            raise ValueError(f"chunk {chunk} fails its CRC32C checksum")
        head = bytes(data[:16])  # Blosc header: version, versionlz, flags, typesize, nbytes, blocksize, cbytes
        nbytes = int.from_bytes(head[4:8], "little") if len(head) == 16 else -1
        cbytes = int.from_bytes(head[12:16], "little") if len(head) == 16 else -1
        if nbytes != self.chunk_bytes or cbytes != len(data):
            raise ValueError(f"chunk {chunk} decodes to {nbytes} bytes, not {self.chunk_bytes}")
        blosc.decompress(data, out.reshape(-1).view(np.uint8))
        return out[:n]
