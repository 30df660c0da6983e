"""Many strings (the relative paths of a folder's files) as one UTF-8 blob and ``int64`` offsets.

A folder of millions of files is named without a Python string per file held: the walk encodes
each folder's listing as soon as it is sorted (:meth:`Paths.of`), and the parts are joined
(:meth:`Paths.concat`); a string is made again only when one is asked for.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["Paths"]

_CHUNK = 8192  # strings made at once when iterating


class Paths(Sequence[str]):
    """Strings as one UTF-8 blob and ``int64`` offsets: string ``i`` is ``blob[offsets[i]:offsets[i + 1]]``."""

    def __init__(self, blob: bytes, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    @classmethod
    def of(cls, strings: Sequence[str]) -> Paths:
        joined = "".join(strings)
        if joined.isascii():  # the common case: a character is a byte, no encoding per string
            lengths = np.fromiter(map(len, strings), dtype=np.int64, count=len(strings))
            blob = joined.encode("ascii")
        else:
            parts = [s.encode("utf-8", "surrogateescape") for s in strings]
            lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
            blob = b"".join(parts)
        offsets = np.zeros(len(strings) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(blob, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        a, b = int(self.offsets[i]), int(self.offsets[i + 1 if i >= 0 else len(self.offsets) + i])
        return self.blob[a:b].decode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        for lo in range(0, len(self), _CHUNK):
            yield from self.chunk(lo, min(lo + _CHUNK, len(self)))

    def raw(self, i: int) -> bytes:
        """String ``i`` as its UTF-8 bytes (these sort as the strings do: code point order)."""
        return self.blob[self.offsets[i] : self.offsets[i + 1]]

    def raw_chunk(self, lo: int, hi: int) -> list[bytes]:
        """Strings ``lo`` to ``hi`` as their UTF-8 bytes."""
        off = self.offsets[lo : hi + 1].tolist()
        blob = self.blob
        return [blob[a:b] for a, b in itertools.pairwise(off)]

    def chunk(self, lo: int, hi: int) -> list[str]:
        """Strings ``lo`` to ``hi`` as a list."""
        off = self.offsets[lo : hi + 1].tolist()
        blob = self.blob
        return [blob[a:b].decode("utf-8", "surrogateescape") for a, b in itertools.pairwise(off)]

    @classmethod
    def concat(cls, parts: Sequence[Sequence[str]]) -> Paths:
        """These strings one after the other, as one :class:`Paths` (a part that is not one is encoded first)."""
        encoded = [part if isinstance(part, Paths) else cls.of(list(part)) for part in parts]
        if len(encoded) == 1:
            return encoded[0]
        offsets = np.zeros(sum(len(part) for part in encoded) + 1, dtype=np.int64)
        at = 0
        for part in encoded:
            offsets[at + 1 : at + len(part) + 1] = part.offsets[1:] + offsets[at]
            at += len(part)
        return cls(b"".join(part.blob for part in encoded), offsets)

    def take(self, index: np.ndarray) -> Paths:
        """The strings at ``index`` (positions, in that order) as new :class:`Paths`."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) == len(self) and np.array_equal(index, np.arange(len(self))):
            return self
        starts, ends = self.offsets[index], self.offsets[index + 1]
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        view = memoryview(self.blob)
        parts = []
        for lo in range(0, len(index), _CHUNK):
            a, b = starts[lo : lo + _CHUNK].tolist(), ends[lo : lo + _CHUNK].tolist()
            parts.append(b"".join([view[x:y] for x, y in zip(a, b)]))
        return Paths(b"".join(parts), offsets)
