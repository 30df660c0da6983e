"""Files opened for reading only when they are regular files, and read within a cap.

A FIFO where a file was expected would block ``open`` forever, and ``/dev/zero`` would be read
without end: :func:`open_regular` checks with ``stat`` first, opens without blocking, and checks
again with ``fstat`` (the path may have been swapped in between). :func:`read_capped` reads a
small file (a store's metadata) whole, at most a cap and one byte, allocating what the file holds
rather than the cap.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

__all__ = ["NotRegularFile", "open_regular", "read_capped"]

_KINDS = {
    stat.S_IFIFO: "FIFO",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFSOCK: "socket",
    stat.S_IFDIR: "directory",
}


class NotRegularFile(OSError):
    """A FIFO, device, socket or directory (or a link to one) where a regular file was expected."""

    def __init__(self, mode: int):
        super().__init__(f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'special file')})")

    def __str__(self) -> str:
        return str(self.args[0])


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file (after following links).

    ``stat`` is checked before opening, so a FIFO never blocks and ``/dev/zero`` is never
    read; the open itself is non-blocking and re-checked with ``fstat`` in case the path
    was swapped in between.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(st.st_mode)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped(path: str | os.PathLike, cap: int) -> bytes:
    """The bytes of the regular file ``path``, or its first ``cap + 1`` when it holds more (the caller refuses
    those): the buffer is what the file's size says (plus one byte, to see growth), never ``cap`` bytes up front."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(min(size, cap) + 1)
        if size < len(data) <= cap:  # it grew since: read on, up to the cap
            data += f.read(cap + 1 - len(data))
        return data
