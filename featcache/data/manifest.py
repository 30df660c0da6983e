"""Scan a folder into a manifest: every image's path, split, label and bytes hash; stable seeded splits.

:mod:`.layouts` finds the files and labels; this module hashes them, drops unreadable and
conflicting files with a recorded reason, and carves val (and test) out of train with
``split=(0.8, 0.2)`` or three fractions: a seeded, stratified split whose seed and
membership end up in the store.

Every file is identified by the SHA-256 of its bytes, so the store never pushes the
same bytes through the same network twice, whatever the file is called. A file whose stat
signature has not changed since the last scan is not read again (:mod:`.scancache`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..choices import SPLITS
from ..config import parse_split
from ..errors import DataError
from .images import IMAGE_EXTENSIONS, NotRegularFile, open_regular
from .layouts import Layout, find_layout
from .scancache import ScanCache, signature
from .walk import Skip

__all__ = [
    "hash_all", "Hasher", "Item", "Manifest", "scan", "safe_join", "hash_file"]

_HASH_THREADS = 8
_log = logging.getLogger("featcache.data")


@dataclass(frozen=True)
class Item:
    """One image: where it is (relative to the data root), which split and class (-1: unlabelled), its bytes' hash."""

    path: str
    split: str
    label: int
    sha256: str
    size: int


@dataclass
class Manifest:
    """Everything ``extract`` needs to know about a folder, and nothing it has to decode."""

    root: Path
    classes: list[str]
    items: list[Item]
    skipped: list[Skip] = field(default_factory=list)
    ignored: list[Skip] = field(default_factory=list)
    layout: str = "splits"
    split_fractions: tuple[float, ...] | None = None
    split_seed: int | None = None
    unlabelled: list[str] = field(default_factory=list)
    found: Layout | None = None

    def split_names(self) -> list[str]:
        present = {it.split for it in self.items}
        return [s for s in SPLITS if s in present]

    def items_in(self, split: str) -> list[Item]:
        return [it for it in self.items if it.split == split]

    def digest(self) -> str:
        """A hash of what the view is: paths, splits, labels, class names and bytes."""
        rows = [[it.split, it.path, it.label, it.sha256] for it in self.items]
        blob = json.dumps({"classes": self.classes, "rows": rows}, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def describe(self) -> str:
        """One line saying what was found, e.g. ``layout: split folders train (train), val (val); 3 classes: ...``."""
        return self.found.describe(_split_note(self.found, self.split_fractions, self.split_seed)) if self.found else ""


def hash_file(path: str | os.PathLike) -> tuple[str, int]:
    """(SHA-256 hex digest, size) of a regular file's bytes; a FIFO or device raises without being read."""
    h = hashlib.sha256()
    size = 0
    with open_regular(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _hash_signed(path: Path) -> tuple[str, int, tuple[int, ...] | None] | OSError:
    """(hex digest, size, stat signature) of a file; the signature is ``None`` when the file changed
    while it was read (then its hash is not worth remembering)."""
    h = hashlib.sha256()
    size = 0
    try:
        with open_regular(path) as f:
            before = signature(os.fstat(f.fileno()))
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
            after = signature(os.fstat(f.fileno()))
    except OSError as e:
        return e
    return h.hexdigest(), size, before if before == after and before[0] == size else None


def hash_all(paths: list[Path]) -> list[tuple[str, int] | OSError]:
    """(hex SHA-256, size) of every file, or the error that stopped its reading (read on threads)."""
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        return [r if isinstance(r, OSError) else r[:2] for r in pool.map(_hash_signed, paths)]


Hasher = Callable[[list[Path]], Iterable[tuple[str, int, tuple[int, ...] | None] | OSError]]
"""What hashes the files the scan cache does not serve: for each path, in order, what :func:`_hash_signed`
gives for it (the signature as this machine's ``stat`` sees it). The default reads them on threads here;
``extract --engine ray`` passes one that spreads them over the cluster (:func:`featcache.ray_hash.hasher`)."""


def _hash_threads(paths: list[Path]) -> list[tuple[str, int, tuple[int, ...] | None] | OSError]:
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        return list(pool.map(_hash_signed, paths))


def _hash_cached(root: Path, rels: list[str], paths: list[Path], rehash: bool,
                 hasher: Hasher | None = None) -> list[tuple[str, int] | OSError]:
    """:func:`hash_all`, served from the scan cache for files whose signature it holds, and the
    cache rewritten with what this scan saw; ``hasher`` hashes the others (default: threads here)."""
    cache = ScanCache.open(root, rehash=rehash)
    out: list = cache.lookup(rels, paths)
    misses = [i for i, r in enumerate(out) if r is None]
    _log.info("hashing %d files%s", len(misses),
              f" ({len(paths) - len(misses)} unchanged since the last scan)" if len(misses) < len(paths) else "")
    for i, r in zip(misses, (hasher or _hash_threads)([paths[i] for i in misses]) if misses else ()):
        if isinstance(r, OSError):
            out[i] = r
        else:
            out[i] = r[:2]
            if r[2] is not None:
                cache.learn(i, r[2], r[0])
    cache.save(rels)
    return out


def _stratified_split(labels: np.ndarray, hashes: list[str], fractions: tuple[float, ...], seed: int) -> list[str]:
    """Assign each image a split; every class is split in the same proportions.

    Within a class, images are ranked by a seeded hash of their bytes and cut at the
    fractions. The same seed gives the same split, and adding n images to a class moves only
    existing images next to a cut (at most n per cut), where a reshuffle could move any.
    """
    names = SPLITS[: len(fractions)]
    out = np.empty(len(labels), dtype=object)
    bounds = np.cumsum(fractions)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < len(fractions):
            raise DataError(
                f"cannot split class with {len(members)} image(s) into {len(fractions)} splits "
                f"({','.join(map(str, fractions))}) with every class in every split. Add images or use fewer splits."
            )
        ranked = sorted(members, key=lambda i: hashlib.sha256(f"{seed}:{hashes[i]}".encode()).hexdigest())
        cuts = [0] + [round(b * len(ranked)) for b in bounds[:-1]] + [len(ranked)]
        for k in range(1, len(cuts)):  # every split gets at least one image of every class
            cuts[k] = min(max(cuts[k], cuts[k - 1] + 1), len(ranked) - (len(cuts) - 1 - k))
        for name, a, b in zip(names, cuts[:-1], cuts[1:]):
            out[ranked[a:b]] = name
    return list(out)


def _split_note(found: Layout, fractions: tuple[float, ...] | None, seed: int | None) -> str:
    if fractions is None:
        return ""
    text = ",".join(f"{f:g}" for f in fractions)
    if found.kind == "flat":
        return f"split {text} (seed {seed})"
    carved = "val and test" if len(fractions) == 3 else "val"
    return f"{carved} carved out of train by --split {text} (seed {seed})"


def _check_fractions(found: Layout, fractions: tuple[float, ...] | None) -> None:
    """--split is for a flat folder, or to carve val (and test) out of a train split that has no val."""
    splits = {s for _, s in found.sources} | {s for s, _, _ in found.entries}
    where = found.root
    if fractions is None:
        if found.kind == "flat":
            what = "class folders" if found.labels_from == "folders" else "labelled images"
            raise DataError(
                f"{where} has {what} but no train/ and val/ folders. "
                "Pass --split 0.8,0.2 (or train,val,test fractions) to split it."
            )
        return
    if found.kind == "flat":
        return
    if "val" in splits:
        raise DataError(f"{where} already has train and val splits; --split carves val out of train only when there "
                        "is no val. Drop --split.", param="split")
    if len(fractions) == 3 and "test" in splits:
        raise DataError(f"{where} already has a test split; give two fractions (train,val) to carve only val out of "
                        "train, e.g. --split 0.8,0.2.", param="split")


def scan(
    root: str | os.PathLike,
    split: str | Sequence[float] | None = None,
    seed: int = 0,
    *,
    labels: str | os.PathLike | None = None,
    labels_from_name: str | None = None,
    classes: str | Sequence[str] | None = None,
    exclude_class: Sequence[str] = (),
    whole: bool = False,
    rehash: bool = False,
    hasher: Hasher | None = None,
) -> Manifest:
    """Find the layout of ``root`` and return its manifest (hashes included; nothing is decoded here).

    The layout found is logged (logger ``featcache.data``, level INFO) before hashing starts.
    ``whole``: a flat folder without ``split`` is taken as it is, one labelled set whose items'
    split is ``""`` (to evaluate on), instead of being refused. Files whose stat signature is the
    one the last scan recorded are not read again (:mod:`.scancache`); ``rehash`` reads every file.
    ``hasher`` hashes the files the cache does not serve (:data:`Hasher`; default: threads here).
    """
    fractions = parse_split(split)
    found = find_layout(root, labels=labels, labels_from_name=labels_from_name, classes=classes,
                        exclude_class=exclude_class)
    if not (whole and fractions is None and found.kind == "flat"):
        _check_fractions(found, fractions)
    _log.info("%s", found.describe(_split_note(found, fractions, seed)))
    root = found.root
    classes_ = list(found.classes)
    skipped = list(found.skipped)
    entries = list(found.entries)
    if not entries:
        raise DataError(f"no images in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}).")

    rels = _relative(root, [p for _, _, p in entries])
    hashed = _hash_cached(root, rels, [p for _, _, p in entries], rehash, hasher)
    kept: list[tuple[str, int, str, str, int]] = []
    first_seen: dict[str, tuple[int, str]] = {}  # bytes → (label, path) of their first labelled copy
    for (name, label, _), rel, h in zip(entries, rels, hashed):
        if isinstance(h, NotRegularFile):
            skipped.append(Skip(rel, str(h)))
        elif isinstance(h, OSError):
            skipped.append(Skip(rel, f"cannot read: {h.strerror or h}"))
        elif h[1] == 0:
            skipped.append(Skip(rel, "empty file (0 bytes)"))
        elif label >= 0 and h[0] in first_seen and first_seen[h[0]][0] != label:
            other_label, other = first_seen[h[0]]
            skipped.append(Skip(rel, f"same bytes as {other} (class {classes_[other_label]}): conflicting labels"))
        else:
            if label >= 0:
                first_seen.setdefault(h[0], (label, rel))
            kept.append((name, label, rel, h[0], h[1]))

    counts: dict[tuple[str, int], int] = {}
    for name, label, *_ in kept:
        counts[(name, label)] = counts.get((name, label), 0) + 1
    for folder, name in found.sources:
        if name in found.unlabelled or not any(s == name for s, _, _ in entries):
            continue
        empty = [c for i, c in enumerate(classes_) if counts.get((name, i), 0) == 0]
        if empty:
            where = root / folder if folder else root
            if found.labels_from == "folders":
                raise DataError(f"class folder(s) with no readable images in {where}: {', '.join(empty)}. "
                                "Add images or remove the folder.")
            raise DataError(f"no readable images of class(es) {', '.join(empty)} in the {name or 'training'} split "
                            f"({where}); every labelled split needs every class. Add images, or leave the class "
                            "out with --exclude-class.")

    if fractions is not None:
        first = "" if found.kind == "flat" else "train"
        pool = [k for k in kept if k[0] == first]
        assigned = _stratified_split(np.array([k[1] for k in pool]), [k[3] for k in pool], fractions, seed)
        carved = iter(assigned)
        kept = [(next(carved), *k[1:]) if k[0] == first else k for k in kept]

    items = [Item(rel, name, label, h, n) for name, label, rel, h, n in kept]
    items.sort(key=lambda it: (SPLITS.index(it.split) if it.split in SPLITS else -1, it.label, it.path))
    return Manifest(
        root=root,
        classes=classes_,
        items=items,
        skipped=skipped,
        ignored=list(found.ignored),
        layout=found.kind,
        split_fractions=fractions,
        split_seed=seed if fractions is not None else None,
        unlabelled=[s for s in SPLITS if s in found.unlabelled],
        found=found,
    )


def _relative(root: Path, paths: list[Path]) -> list[str]:
    """Each path relative to ``root`` with ``/`` separators (``Path.relative_to`` by string prefix: 20x faster)."""
    prefix = str(root).rstrip(os.sep) + os.sep
    out = []
    for p in paths:
        s = str(p)
        out.append(s[len(prefix):].replace(os.sep, "/") if s.startswith(prefix) else p.relative_to(root).as_posix())
    return out


def safe_join(root: str | os.PathLike, rel: str) -> Path:
    """``root / rel`` for a stored relative path, refusing anything that would climb out of ``root``.

    The path itself must be plain: relative, no ``..``, no NUL. Links that the folder ``root``
    holds are followed, as ``extract`` follows them when it scans (a folder of links into an
    image pool is the user's own data): ``root`` is always a folder the user named, so what its
    links point to is theirs. Readers compare the bytes with the stored SHA-256 before using them.
    """
    root = Path(root)
    if not isinstance(rel, str) or not rel or "\0" in rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise DataError(f"refusing stored path {rel!r}: not a plain relative path inside {root}")
    return root / rel
