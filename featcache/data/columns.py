"""The manifest as columns: what ``extract`` plans from, at a few dozen bytes per image.

A scanned folder is held as arrays, not as one Python object per image: the SHA-256 of each
file as 32 bytes of an ``(N, 32) uint8`` array, its split as an ``int8`` code, its label as
``int32``, its size as ``int64``, and the paths (relative to the folder) as one UTF-8 blob with
``int64`` offsets (:class:`Paths`). A re-run that computes nothing plans without creating an
object per image; :attr:`Manifest.items` still gives the :class:`Item` list, built once when a
caller asks for it (status, audit, tests), and :meth:`Manifest.item` one image at a time.

:meth:`Manifest.digest` streams the same JSON text the set key has always hashed, so a set
recorded by earlier versions is found again by a re-run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..choices import SPLITS
from .paths import Paths
from .walk import Skip

if TYPE_CHECKING:
    from .layouts import Layout

__all__ = ["Item", "Manifest", "Paths", "repeats", "split_code", "split_note", "NO_SPLIT"]

NO_SPLIT = -1
"""The split code of an image of a whole folder taken as it is (its split is ``""``)."""

_CHUNK = 8192  # rows handled at once where a step needs a Python object per row
_TEXT_ROWS = 2048  # rows of the digest's JSON text made at once (about 120 bytes each, and their objects)
_ESCAPE = json.encoder.encode_basestring_ascii  # what json.dumps writes for a str


def split_code(name: str) -> int:
    """The ``int8`` code of a split name: its place in :data:`~featcache.choices.SPLITS`, -1 for ``""``."""
    return SPLITS.index(name) if name else NO_SPLIT


def _split_name(code: int) -> str:
    return SPLITS[code] if code >= 0 else ""


def repeats(digests: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Per row of ``rows`` (default: all), whether another of them starts with the same 8 digest bytes: a
    superset of the rows whose bytes have a copy among them, found with 8 bytes per row instead of 32."""
    n = len(digests) if rows is None else len(rows)
    out = np.zeros(n, dtype=bool)
    if n < 2:
        return out
    part = digests[:, :8] if rows is None else digests[rows, :8]
    head = np.ascontiguousarray(part).view(np.uint64).reshape(n)
    ordered = np.sort(head)
    if not np.any(ordered[1:] == ordered[:-1]):  # the common case: no copies, nothing more to hold
        return out
    del ordered
    order = np.argsort(head)
    same = head[order[1:]] == head[order[:-1]]
    out[order[1:][same]] = True
    out[order[:-1][same]] = True
    return out


@dataclass(frozen=True)
class Item:
    """One image: where it is (relative to the data root), which split and class (-1: unlabelled), its bytes' hash."""

    path: str
    split: str
    label: int
    sha256: str
    size: int


@dataclass(eq=False)
class Manifest:
    """Everything ``extract`` needs to know about a folder, and nothing it has to decode: one row per image,
    in columns (see the module docstring), sorted by split, label and path."""

    root: Path
    classes: list[str]
    paths: Paths
    split_codes: np.ndarray  # int8: place in SPLITS, -1 for a whole folder ("")
    labels: np.ndarray  # int32, -1: unlabelled
    digests: np.ndarray  # (N, 32) uint8: SHA-256 of the bytes
    sizes: np.ndarray  # int64
    skipped: list[Skip] = field(default_factory=list)
    ignored: list[Skip] = field(default_factory=list)
    layout: str = "splits"
    split_fractions: tuple[float, ...] | None = None
    split_seed: int | None = None
    unlabelled: list[str] = field(default_factory=list)
    found: Layout | None = None

    @classmethod
    def from_items(cls, root: Path, classes: list[str], items: Sequence[Item], **kwargs) -> Manifest:
        """A manifest of these items, in their order (for callers that hold :class:`Item` objects)."""
        n = len(items)
        digests = np.frombuffer(bytes.fromhex("".join(it.sha256 for it in items)), dtype=np.uint8).reshape(n, 32)
        return cls(Path(root), list(classes), Paths.of([it.path for it in items]),
                   np.array([split_code(it.split) for it in items], dtype=np.int8).reshape(n),
                   np.array([it.label for it in items], dtype=np.int32).reshape(n), digests.copy(),
                   np.array([it.size for it in items], dtype=np.int64).reshape(n), **kwargs)

    def __len__(self) -> int:
        return len(self.labels)

    # ------------------------------------------------------------------ one image, or all as objects

    def hex(self, i: int) -> str:
        return self.digests[i].tobytes().hex()

    def item(self, i: int) -> Item:
        """Row ``i`` as an :class:`Item`."""
        return Item(self.paths[i], _split_name(int(self.split_codes[i])), int(self.labels[i]), self.hex(i),
                    int(self.sizes[i]))

    def items_at(self, index: Sequence[int] | np.ndarray) -> list[Item]:
        return [self.item(int(i)) for i in index]

    @cached_property
    def items(self) -> list[Item]:
        """Every row as an :class:`Item`, built on first use (the planning of an extract never asks)."""
        return self.items_at(range(len(self)))

    def split_names(self) -> list[str]:
        present = set(np.unique(self.split_codes).tolist())
        return [s for k, s in enumerate(SPLITS) if k in present]

    def in_split(self, split: str) -> np.ndarray:
        """Which rows are in ``split``, as a bool array."""
        return self.split_codes == split_code(split)

    def items_in(self, split: str) -> list[Item]:
        return self.items_at(np.flatnonzero(self.in_split(split)))

    # ------------------------------------------------------------------ many rows at once

    def keys(self) -> np.ndarray:
        """The digests as an (N,) ``S32`` array (compared and sorted bytewise, one item per row)."""
        return np.ascontiguousarray(self.digests).view("S32").reshape(len(self))

    def first_of_each(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The rows (among ``rows``, default all) that hold the first copy of their bytes, in row order."""
        repeated = repeats(self.digests, rows)
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        if not repeated.any():
            return rows
        among = np.flatnonzero(repeated)  # only rows whose first 8 bytes repeat are compared whole
        _, first = np.unique(self.keys()[rows[among]], return_index=True)
        later = np.ones(len(among), dtype=bool)
        later[first] = False
        keep = np.ones(len(rows), dtype=bool)
        keep[among[later]] = False
        return rows[keep]

    def distinct(self) -> int:
        """How many different contents the rows hold."""
        if not repeats(self.digests).any():
            return len(self)
        return len(self.first_of_each())

    def select(self, rows: np.ndarray) -> Manifest:
        """The manifest of ``rows`` (bool mask or positions), everything else as it is."""
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, dtype=np.int64)
        return Manifest(self.root, self.classes, self.paths.take(rows), self.split_codes[rows], self.labels[rows],
                        self.digests[rows], self.sizes[rows], self.skipped, self.ignored, self.layout,
                        self.split_fractions, self.split_seed, self.unlabelled, self.found)

    def hexes(self, rows: np.ndarray) -> list[str]:
        text = np.ascontiguousarray(self.digests[rows]).tobytes().hex()
        return [text[i : i + 64] for i in range(0, len(text), 64)]

    def digest(self) -> str:
        """A hash of what the view is: paths, splits, labels, class names and bytes.

        The SHA-256 of ``json.dumps({"classes": ..., "rows": [[split, path, label, sha256], ...]},
        separators=(",", ":"))``, the text streamed a block of rows at a time."""
        h = hashlib.sha256()
        h.update(b'{"classes":' + json.dumps(self.classes, separators=(",", ":")).encode() + b',"rows":[')
        names = [json.dumps(_split_name(k)) for k in range(-1, len(SPLITS))]
        for lo in range(0, len(self), _TEXT_ROWS):
            hi = min(lo + _TEXT_ROWS, len(self))
            rows = ",".join(f"[{names[c + 1]},{_ESCAPE(p)},{label},\"{x}\"]" for c, p, label, x in zip(
                self.split_codes[lo:hi].tolist(), self.paths.chunk(lo, hi), self.labels[lo:hi].tolist(),
                self.hexes(np.arange(lo, hi))))
            h.update((b"," if lo else b"") + rows.encode())
        h.update(b"]}")
        return h.hexdigest()

    def describe(self) -> str:
        """One line saying what was found, e.g. ``layout: split folders train (train), val (val); 3 classes: ...``."""
        return self.found.describe(split_note(self.found, self.split_fractions, self.split_seed)) if self.found else ""


def split_note(found: Layout, fractions: tuple[float, ...] | None, seed: int | None) -> str:
    if fractions is None:
        return ""
    text = ",".join(f"{f:g}" for f in fractions)
    if found.kind == "flat":
        return f"split {text} (seed {seed})"
    carved = "val and test" if len(fractions) == 3 else "val"
    return f"{carved} carved out of train by --split {text} (seed {seed})"
