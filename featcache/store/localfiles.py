"""A store in a local folder whose files are read only when they are regular files.

Zarr's ``LocalStore`` reads a key with ``Path.read_bytes()``: a FIFO put where a ``zarr.json`` or
a chunk should be makes every command that opens it wait forever, and a link to ``/dev/zero``
reads without end. :class:`RegularFileStore` is the same store with each read opened by
:func:`~featcache.files.open_regular` (checked with ``stat``, opened without blocking, checked
again with ``fstat``): such a key is an error naming what is there, which callers report as
damage. Writing, listing and everything else is Zarr's own.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterable
from pathlib import Path

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore

from ..files import NotRegularFile, open_regular

__all__ = ["RegularFileStore"]


def _get(path: Path, prototype: BufferPrototype, byte_range: ByteRequest | None) -> Buffer | None:
    try:
        f = open_regular(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except NotRegularFile:
        if path.is_dir():  # as Zarr's own store: a folder is no key
            return None
        raise
    with f:
        if byte_range is None:
            return prototype.buffer.from_bytes(f.read())
        size = f.seek(0, io.SEEK_END)
        if isinstance(byte_range, RangeByteRequest):
            f.seek(byte_range.start)
            return prototype.buffer.from_bytes(f.read(max(0, byte_range.end - byte_range.start)))
        if isinstance(byte_range, OffsetByteRequest):
            f.seek(byte_range.offset)
        elif isinstance(byte_range, SuffixByteRequest):
            f.seek(max(0, size - byte_range.suffix))
        else:
            raise TypeError(f"unexpected byte range {byte_range!r}")
        return prototype.buffer.from_bytes(f.read())


class RegularFileStore(LocalStore):
    """``LocalStore`` reading regular files only (see the module docstring)."""

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        if prototype is None:
            prototype = default_buffer_prototype()
        if not self._is_open:
            await self._open()
        return await asyncio.to_thread(_get, self.root / key, prototype, byte_range)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return list(await asyncio.gather(*(asyncio.to_thread(_get, self.root / key, prototype, byte_range)
                                           for key, byte_range in key_ranges)))
