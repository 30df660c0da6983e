"""NumPy's ``.npy`` format read without NumPy, for the arrays of a run directory.

``featcache runs`` reads and checks every run's arrays (``head.npz``, a zip of ``NAME.npy``
members, and ``confusion_matrix.SPLIT.npy``) in a process that never imports NumPy: ``import
numpy`` alone is about twice ``import click`` (benchmarks/README.md). The format is NumPy's own
(``numpy.lib.format``): a magic string, a version, a header that is a Python literal dict of
``descr``, ``fortran_order`` and ``shape`` (parsed with ``ast.literal_eval``, as NumPy does), then
the raw data. Only plain numbers are decoded (bool, integers, floats of 2 to 8 bytes, either byte
order); anything else (objects, text, records) is reported by its dtype and never decoded, so
nothing is unpickled. A :class:`RawArray` becomes a NumPy array (:meth:`RawArray.numpy`) only where
one is needed (loading a head).
"""

from __future__ import annotations

import ast
import math
import re
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["MAGIC", "MAX_HEADER_CHARS", "NpyError", "RawArray", "parse_npy"]

MAGIC = b"\x93NUMPY"
MAX_HEADER_CHARS = 10_000  # NumPy's own limit for loading without allow_pickle
_NATIVE = "<" if sys.byteorder == "little" else ">"
_CODES = {("b", 1): "?", ("i", 1): "b", ("i", 2): "h", ("i", 4): "i", ("i", 8): "q", ("u", 1): "B", ("u", 2): "H",
          ("u", 4): "I", ("u", 8): "Q", ("f", 2): "e", ("f", 4): "f", ("f", 8): "d"}  # struct's format codes
_NAMES = {"b": "bool", "i": "int", "u": "uint", "f": "float", "c": "complex"}
_DESCR = re.compile(r"([<>|=])([a-zA-Z])(\d+)")
_HEADERS = {(1, 0): (2, "latin1"), (2, 0): (4, "latin1"), (3, 0): (4, "utf8")}  # length bytes, encoding


class NpyError(ValueError):
    """Bytes that are not a valid ``.npy`` file; the message says what is wrong."""


@dataclass(frozen=True)
class RawArray:
    """One array as stored: NumPy's dtype descriptor, its shape and its bytes (the numbers, in storage order)."""

    descr: Any  # as written: '<f4', '|b1', '|O', '<U3', or a list for a record dtype
    shape: tuple[int, ...]
    data: bytes | bytearray | memoryview = field(default=b"", repr=False)
    fortran_order: bool = False

    @property
    def _parts(self) -> tuple[str, str, int] | None:
        m = _DESCR.fullmatch(self.descr) if isinstance(self.descr, str) else None
        return (m[1], m[2], int(m[3])) if m else None

    @property
    def kind(self) -> str:
        """``b``, ``i``, ``u`` or ``f`` (NumPy's dtype kinds) for the numbers read here; ``""`` for anything else."""
        p = self._parts
        return p[1] if p and (p[1], p[2]) in _CODES else ""

    @property
    def itemsize(self) -> int:
        p = self._parts
        return p[2] if p else 0

    @property
    def dtype(self) -> str:
        """The dtype as NumPy prints it (``float32``, ``int64``, ``bool``, ``object``), else its descriptor."""
        p = self._parts
        if self.descr == "|O":
            return "object"
        if p and p[1] in _NAMES and p[0] in ("|", "=", _NATIVE):
            return "bool" if p[1] == "b" else f"{_NAMES[p[1]]}{8 * p[2]}"
        return str(self.descr)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def values(self) -> Sequence:
        """The numbers, flat, in the order they are stored (C order; column-major with ``fortran_order``)."""
        p = self._parts
        if not self.kind or p is None:
            raise NpyError(f"a {self.dtype} array holds no numbers to read")
        order, code = p[0], _CODES[p[1], p[2]]
        if order in ("|", "=", _NATIVE) and code != "e":  # memoryview cannot cast to half floats
            return memoryview(self.data).cast("B").cast(code)  # type: ignore[call-overload]
        return struct.unpack(f"{'=' if order == '|' else order}{self.size}{code}", self.data)

    def all_finite(self) -> bool:
        """No NaN or ±inf: their sum is finite (a NaN or an inf makes any sum NaN or inf); a sum that overflowed
        from finite float64 values is settled number by number."""
        if self.kind != "f":
            return True
        v = self.values()
        return math.isfinite(sum(v, 0.0)) or all(map(math.isfinite, v))

    def rows(self) -> list[list]:
        """A 2-D array as a list of rows (what NumPy's ``tolist`` gives)."""
        if self.ndim != 2:
            raise NpyError(f"rows of a {self.ndim}-D array")
        (n, m), flat = self.shape, self.values()
        if self.fortran_order:  # column j is flat[j * n:(j + 1) * n]
            return [list(flat[i::n]) for i in range(n)]
        return [list(flat[i * m:(i + 1) * m]) for i in range(n)]

    def numpy(self):
        """The NumPy array (writable: a copy when the bytes are read-only)."""
        import numpy as np

        a = np.frombuffer(self.data, dtype=np.dtype(self.descr), count=self.size)
        a = a.reshape(self.shape[::-1]).T if self.fortran_order else a.reshape(self.shape)
        return a if a.flags.writeable else a.copy(order="K")

    @classmethod
    def of(cls, a: Any) -> RawArray:
        """The stored form of a NumPy array (its bytes shared, not copied, when it is contiguous); the
        data of anything that holds no plain numbers is left out, as when it is read."""
        import numpy as np

        if not isinstance(a, np.ndarray):
            return cls(type(a).__name__, ())
        if a.dtype.hasobject or a.dtype.kind not in _NAMES:
            return cls(a.dtype.str if a.dtype.fields is None else a.dtype.descr, a.shape)
        c = np.ascontiguousarray(a)
        return cls(c.dtype.str, c.shape, c.reshape(-1).view(np.uint8).data)


def parse_npy(raw: bytes | bytearray | memoryview) -> RawArray:
    """The array in the bytes of one ``.npy`` file; its data must be exactly what the header declares.
    An array that holds no plain numbers comes back without its data (it is refused by kind, never decoded)."""
    raw = memoryview(raw).cast("B")
    if len(raw) < 10 or bytes(raw[:6]) != MAGIC:
        raise NpyError("it does not start with NumPy's magic string")
    version = (raw[6], raw[7])
    if version not in _HEADERS:
        raise NpyError(f"format version {version[0]}.{version[1]} is not one NumPy writes")
    width, encoding = _HEADERS[version]
    start = 8 + width
    length = int.from_bytes(raw[8:start], "little")
    if length > MAX_HEADER_CHARS or start + length > len(raw):
        raise NpyError(f"its header of {length} bytes is {'too long' if length > MAX_HEADER_CHARS else 'cut short'}")
    try:
        header = ast.literal_eval(bytes(raw[start:start + length]).decode(encoding))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
        raise NpyError(f"its header is not a Python literal ({e.__class__.__name__})") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise NpyError("its header is not a dict of descr, fortran_order and shape")
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise NpyError(f"its shape {shape!r} is not a tuple of sizes")
    if not isinstance(fortran, bool) or not isinstance(descr, (str, list)):
        raise NpyError("its header's fortran_order or descr is of the wrong type")
    array = RawArray(descr, shape, b"", fortran)
    if not array.kind:
        return array
    data, want = raw[start + length:], array.size * array.itemsize
    if len(data) != want:
        raise NpyError(f"it holds {len(data)} bytes of data where its header declares {want}")
    return replace(array, data=data)
