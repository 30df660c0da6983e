"""The scan cache's file (version 2): raw little-endian arrays, each with its CRC-32, and a JSON footer.

Layout: the magic ``FCSCAN2\\n``; the arrays of :data:`ARRAYS`, each starting on a 64-byte boundary,
one row per entry in the order of the folder's walk; the footer (JSON: format, version, root, device,
started_ns, entries, ``listing`` (SHA-256 of the list of paths) and per array its offset and CRC-32);
the footer's length as a little-endian uint64; the magic again. Anything else reads as damaged
(:class:`Damaged`), and the cache then serves nothing. See :mod:`.scancache` for what the entries mean.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator
from io import BufferedReader
from pathlib import Path

import numpy as np

__all__ = ["FORMAT", "VERSION", "SUFFIX", "ARRAYS", "IO_BLOCK", "Damaged", "ScanFile", "read_file", "write_file"]

FORMAT = "featcache-scan-cache"
VERSION = 2
SUFFIX = ".fcscan"
MAGIC = b"FCSCAN2\n"
_TAIL = struct.Struct("<Q8s")  # the footer's length, then the magic again: the last 16 bytes
_MAX_FOOTER = 1 << 20
ALIGN = 64
# name → (dtype, values per entry); every array has one row per entry
ARRAYS = {"keys": ("<u8", 2), "stats": ("<i8", 5), "digests": ("u1", 32)}
IO_BLOCK = 65536  # entries streamed from or to the file at once


class Damaged(ValueError):
    """A cache file that does not read back as one written by :func:`write_file`."""


class ScanFile:
    """An open cache file whose footer has been checked: its arrays are read from it on demand, each checked
    against its CRC-32 (whole, or as a stream of blocks whose CRC is compared when the last one is read)."""

    def __init__(self, f: BufferedReader, footer: dict):
        self.f, self.footer = f, footer
        self.entries: int = footer["entries"]

    @classmethod
    def open(cls, path: Path) -> ScanFile:
        f = open(path, "rb")  # noqa: SIM115  (kept open: the arrays are read from it later)
        try:
            return cls(f, _footer(f))
        except BaseException:
            f.close()
            raise

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> ScanFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        dtype, per = ARRAYS[name]
        arr = np.empty((self.entries, per), dtype=dtype) if out is None else out
        spec = self.footer["arrays"][name]
        self.f.seek(spec["offset"])
        view = arr.reshape(-1).view(np.uint8).data
        if self.f.readinto(view) != len(view) or zlib.crc32(view) != spec["crc32"]:
            raise Damaged(f"its {name} differ from their CRC")
        return arr

    def blocks(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        """(start, rows) of the array ``name``, a block at a time; raises :class:`Damaged` after the last block
        when the whole differs from its CRC (a caller acts on a block only once that has passed)."""
        dtype, per = ARRAYS[name]
        spec = self.footer["arrays"][name]
        crc = 0
        row = np.dtype(dtype).itemsize * per
        for lo in range(0, self.entries, IO_BLOCK):
            hi = min(lo + IO_BLOCK, self.entries)
            self.f.seek(spec["offset"] + lo * row)
            data = self.f.read((hi - lo) * row)
            if len(data) != (hi - lo) * row:
                raise Damaged(f"its {name} are cut short")
            crc = zlib.crc32(data, crc)
            yield lo, np.frombuffer(data, dtype=dtype).reshape(hi - lo, per)
        if crc != spec["crc32"]:
            raise Damaged(f"its {name} differ from their CRC")


def _footer(f: BufferedReader) -> dict:
    size = os.fstat(f.fileno()).st_size
    if size < len(MAGIC) + _TAIL.size:
        raise Damaged("it is too short")
    f.seek(0)
    if f.read(len(MAGIC)) != MAGIC:
        raise Damaged("it does not start as a scan cache of this version")
    f.seek(size - _TAIL.size)
    length, magic = _TAIL.unpack(f.read(_TAIL.size))
    if magic != MAGIC or not 0 < length <= min(_MAX_FOOTER, size - len(MAGIC) - _TAIL.size):
        raise Damaged("its footer is not whole")
    f.seek(size - _TAIL.size - length)
    try:
        footer = json.loads(f.read(length))
    except ValueError:
        raise Damaged("its footer is not JSON") from None
    if not isinstance(footer, dict) or footer.get("format") != FORMAT or footer.get("version") != VERSION:
        raise Damaged("not a scan cache of this version")
    n, started, arrays = footer.get("entries"), footer.get("started_ns"), footer.get("arrays")
    if not isinstance(n, int) or not isinstance(started, int) or isinstance(n, bool) or isinstance(started, bool) \
            or n < 0 or not isinstance(footer.get("listing"), str) or not isinstance(arrays, dict):
        raise Damaged("its footer lacks entries, started_ns, listing or arrays")
    end = size - _TAIL.size - length
    for name, (dtype, per) in ARRAYS.items():
        spec = arrays.get(name)
        if not isinstance(spec, dict) or not all(isinstance(spec.get(k), int) and not isinstance(spec.get(k), bool)
                                                 for k in ("offset", "crc32")):
            raise Damaged(f"its footer does not say where its {name} are")
        if not len(MAGIC) <= spec["offset"] <= end - n * per * np.dtype(dtype).itemsize:
            raise Damaged(f"its {name} lie outside the file")
    return footer


def read_file(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The footer and the arrays of a cache file, every CRC checked (ValueError says what is wrong)."""
    with ScanFile.open(path) as fh:
        return fh.footer, {name: fh.read(name) for name in ARRAYS}


def write_file(path: Path, footer: dict, arrays: dict) -> None:
    """Write a cache file atomically (a temporary file renamed over ``path``). ``arrays`` maps each name of
    :data:`ARRAYS` to an array of its rows, or to an iterable of blocks of rows; ``footer`` gets ``arrays``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC)
            where = {}
            for name, (dtype, per) in ARRAYS.items():
                f.write(b"\0" * (-f.tell() % ALIGN))
                where[name] = {"offset": f.tell(), "crc32": 0}
                source = arrays[name]
                rows = 0
                for block in ([source] if isinstance(source, np.ndarray) else source):
                    data = np.ascontiguousarray(block, dtype=dtype).reshape(-1, per)
                    where[name]["crc32"] = zlib.crc32(data.data, where[name]["crc32"])
                    f.write(data.data)
                    rows += len(data)
                if rows != footer["entries"]:
                    raise ValueError(f"{rows} rows of {name} for {footer['entries']} entries")
            text = json.dumps({**footer, "arrays": where}).encode()
            f.write(text)
            f.write(_TAIL.pack(len(text), MAGIC))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
