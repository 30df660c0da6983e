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
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..choices import SPLITS
from ..config import parse_split
from ..errors import DataError
from ..runtime import release_memory
from .columns import Item, Manifest, Paths, repeats, split_code, split_note
from .images import IMAGE_EXTENSIONS, NotRegularFile, open_regular
from .layouts import Layout, find_layout
from .scancache import ScanCache, signature
from .walk import Skip

__all__ = [
    "hash_all", "Hasher", "Item", "Manifest", "scan", "safe_join", "hash_file"]

_HASH_THREADS = 8
_HASH_BLOCK = 4096  # files handed to the threads at once (not one future per file of a large folder)
_CHUNK = 65536
_log = logging.getLogger("featcache.data")


def hash_file(path: str | os.PathLike) -> tuple[str, int]:
    """(SHA-256 hex digest, size) of a regular file's bytes; a FIFO or device raises without being read."""
    h = hashlib.sha256()
    size = 0
    with open_regular(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _hash_signed(path: str | os.PathLike) -> tuple[bytes, int, tuple[int, ...] | None] | OSError:
    """(SHA-256 digest, size, stat signature) of a file; the signature is ``None`` when the file changed
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
    return h.digest(), size, before if before == after and before[0] == size else None


def _hashed(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[bytes, int, tuple[int, ...] | None] | OSError]:
    """:func:`_hash_signed` of every path, in order, read on threads (a block of paths in flight at a time)."""
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        for lo in range(0, len(paths), _HASH_BLOCK):
            yield from pool.map(_hash_signed, paths[lo : lo + _HASH_BLOCK])


def hash_all(paths: Sequence[str | os.PathLike]) -> list[tuple[str, int] | OSError]:
    """(hex SHA-256, size) of every file, or the error that stopped its reading (read on threads)."""
    return [r if isinstance(r, OSError) else (r[0].hex(), r[1]) for r in _hashed(paths)]


Hasher = Callable[[Sequence[str]], Iterable[tuple[bytes, int, tuple[int, ...] | None] | OSError]]
"""What hashes the files the scan cache does not serve: for each path, in order, what :func:`_hash_signed`
gives for it (the signature as this machine's ``stat`` sees it). The default reads them on threads here;
``extract --engine ray`` passes one that spreads them over the cluster (:func:`featcache.ray_hash.hasher`)."""


def _hash_threads(paths: Sequence[str | os.PathLike]) -> list[tuple[bytes, int, tuple[int, ...] | None] | OSError]:
    return list(_hashed(paths))


def _hash_cached(root: Path, rels: Paths, rehash: bool,
                 hasher: Hasher | None = None) -> tuple[np.ndarray, np.ndarray, dict[int, OSError]]:
    """(digests (N, 32) uint8, sizes, errors by position) of the files ``root/rel``: served from the scan cache
    for files whose signature it holds, the others read (by ``hasher``; default: threads here), and the cache
    rewritten with what this scan saw."""
    base = os.path.join(str(root), "")
    errors: dict[int, OSError] = {}
    with ScanCache.open(root, rehash=rehash) as cache:
        hit = cache.lookup(rels, base)
        misses = np.flatnonzero(~hit).tolist()
        _log.info("hashing %d files%s", len(misses),
                  f" ({len(rels) - len(misses)} unchanged since the last scan)" if len(misses) < len(rels) else "")
        for i, r in zip(misses, (hasher or _hashed)(_Joined(base, rels, misses)) if misses else ()):
            if isinstance(r, OSError):
                errors[i] = r
            else:
                cache.learn(i, r[2], r[0], r[1])
        cache.save(rels)
    return cache.digests, cache.sizes, errors


class _Joined(Sequence[str]):
    """``base + rels[i]`` for the positions ``which``, made one at a time as they are read."""

    def __init__(self, base: str, rels: Sequence[str], which: list[int]):
        self.base, self.rels, self.which = base, rels, which

    def __len__(self) -> int:
        return len(self.which)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self.base + self.rels[i] for i in self.which[k]]
        return self.base + self.rels[self.which[k]]


def _stratified_split(labels: np.ndarray, digests: np.ndarray, fractions: tuple[float, ...], seed: int) -> np.ndarray:
    """Assign each image a split (its code); every class is split in the same proportions.

    Within a class, images are ranked by a seeded hash of their bytes' hash (the SHA-256 of
    ``"<seed>:<hex digest>"``) and cut at the fractions. The same seed gives the same split, and
    adding n images to a class moves only existing images next to a cut (at most n per cut),
    where a reshuffle could move any.
    """
    rank = np.empty((len(labels), 32), dtype=np.uint8)
    for lo in range(0, len(labels), _CHUNK):
        block = np.ascontiguousarray(digests[lo : lo + _CHUNK]).tobytes().hex()
        rank[lo : lo + _CHUNK] = np.frombuffer(b"".join(
            hashlib.sha256(f"{seed}:{block[k:k + 64]}".encode()).digest() for k in range(0, len(block), 64)),
            dtype=np.uint8).reshape(-1, 32)
    keys = rank.view("S32").reshape(len(labels))  # bytes order is the order of the hex digests
    out = np.empty(len(labels), dtype=np.int8)
    bounds = np.cumsum(fractions)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < len(fractions):
            raise DataError(
                f"cannot split class with {len(members)} image(s) into {len(fractions)} splits "
                f"({','.join(map(str, fractions))}) with every class in every split. Add images or use fewer splits."
            )
        ranked = members[np.argsort(keys[members], kind="stable")]  # ties (same bytes): in the order found
        cuts = [0] + [round(b * len(ranked)) for b in bounds[:-1]] + [len(ranked)]
        for k in range(1, len(cuts)):  # every split gets at least one image of every class
            cuts[k] = min(max(cuts[k], cuts[k - 1] + 1), len(ranked) - (len(cuts) - 1 - k))
        for code, (a, b) in enumerate(itertools.pairwise(cuts)):
            out[ranked[a:b]] = code
    return out


def _check_fractions(found: Layout, fractions: tuple[float, ...] | None) -> None:
    """--split is for a flat folder, or to carve val (and test) out of a train split that has no val."""
    splits = {s for _, s in found.sources} | {s for s, _, files in found.files if files}
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
    _log.info("%s", found.describe(split_note(found, fractions, seed)))
    root = found.root
    classes_ = list(found.classes)
    skipped = list(found.skipped)
    groups = [g for g in found.files if g[2]]
    if not groups:
        raise DataError(f"no images in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}).")

    rels = Paths.concat([files for _, _, files in groups])  # in the order found, as one blob
    sizes_of = [len(files) for _, _, files in groups]
    codes = np.repeat(np.array([split_code(g[0]) for g in groups], dtype=np.int8), sizes_of)
    labels_ = np.repeat(np.array([g[1] for g in groups], dtype=np.int32), sizes_of)
    found = replace(found, files=())  # the layout's string per file is let go: the columns hold what it said
    del groups, sizes_of
    digests, sizes, errors = _hash_cached(root, rels, rehash, hasher)

    keep = np.ones(len(rels), dtype=bool)
    reasons: dict[int, str] = {}
    for i, e in errors.items():
        reasons[i] = str(e) if isinstance(e, NotRegularFile) else f"cannot read: {e.strerror or e}"
    for i in np.flatnonzero(sizes == 0).tolist():
        if i not in errors:
            reasons[i] = "empty file (0 bytes)"
    keep[list(reasons)] = False
    # the same bytes under two labels: the first labelled copy is kept, later copies with another label are not
    labelled = np.flatnonzero(keep & (labels_ >= 0))
    labelled = labelled[repeats(digests, labelled)]  # only copies can conflict
    if len(labelled):
        keys = digests[labelled].view("S32").reshape(len(labelled))
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        owner = labelled[first[inverse.reshape(-1)]]
        for i, j in zip(labelled[labels_[owner] != labels_[labelled]].tolist(),
                        owner[labels_[owner] != labels_[labelled]].tolist()):
            reasons[i] = f"same bytes as {rels[j]} (class {classes_[labels_[j]]}): conflicting labels"
            keep[i] = False
    skipped += [Skip(rels[i], reasons[i]) for i in sorted(reasons)]

    for folder, name in found.sources:
        code = split_code(name)
        if name in found.unlabelled or not np.any(codes == code):
            continue
        counts = np.bincount(labels_[keep & (codes == code) & (labels_ >= 0)], minlength=len(classes_))
        empty = [c for i, c in enumerate(classes_) if counts[i] == 0]
        if empty:
            where = root / folder if folder else root
            if found.labels_from == "folders":
                raise DataError(f"class folder(s) with no readable images in {where}: {', '.join(empty)}. "
                                "Add images or remove the folder.")
            raise DataError(f"no readable images of class(es) {', '.join(empty)} in the {name or 'training'} split "
                            f"({where}); every labelled split needs every class. Add images, or leave the class "
                            "out with --exclude-class.")

    if fractions is not None:
        first_code = split_code("" if found.kind == "flat" else "train")
        pool = np.flatnonzero(keep & (codes == first_code))
        codes[pool] = _stratified_split(labels_[pool], digests[pool], fractions, seed)

    # sorted by split, label and path (a stable sort by path, then by label and split)
    rows = np.flatnonzero(keep)
    if _in_order(rels, rows, codes, labels_):  # the walk's order already is (the common case): nothing to sort
        order = rows
    else:
        order = _by_path(rels, rows)
        order = order[np.lexsort((labels_[order], codes[order]))]
    paths = rels.take(order)
    del rels
    if not _identity(order, len(digests)):
        # columns in the manifest's order; the common case (every file kept, the walk's order) keeps them as
        # they are, with no copy of the hashes held beside them
        codes, labels_, digests, sizes = codes[order], labels_[order], digests[order], sizes[order]
    manifest = Manifest(
        root=root,
        classes=classes_,
        paths=paths,
        split_codes=codes,
        labels=labels_,
        digests=digests,
        sizes=sizes,
        skipped=skipped,
        ignored=list(found.ignored),
        layout=found.kind,
        split_fractions=fractions,
        split_seed=seed if fractions is not None else None,
        unlabelled=[s for s in SPLITS if s in found.unlabelled],
        found=found,
    )
    del codes, labels_, digests, sizes, order, keep
    release_memory()  # the listing's strings and the scan cache are gone: their pages go back
    return manifest


def _identity(order: np.ndarray, n: int) -> bool:
    """Whether ``order`` is 0, 1, ..., n - 1."""
    return len(order) == n and (n == 0 or (order[0] == 0 and bool(np.all(order[1:] - order[:-1] == 1))))


def _in_order(paths: Paths, rows: np.ndarray, codes: np.ndarray, labels: np.ndarray) -> bool:
    """Whether ``rows`` are already sorted by split code, label and path (Python objects for a block at a time)."""
    if len(rows) < 2:
        return True
    dc = np.diff(codes[rows].astype(np.int64))
    dl = np.diff(labels[rows].astype(np.int64))
    if np.any(dc < 0) or np.any((dc == 0) & (dl < 0)):
        return False
    tied = np.flatnonzero((dc == 0) & (dl == 0))  # neighbours whose order rests on their paths
    off, blob = paths.offsets, paths.blob
    for lo in range(0, len(tied), _SORT_BLOCK):
        first = rows[tied[lo : lo + _SORT_BLOCK]]
        second = rows[tied[lo : lo + _SORT_BLOCK] + 1]
        a, b, c, d = off[first].tolist(), off[first + 1].tolist(), off[second].tolist(), off[second + 1].tolist()
        if any(blob[w:x] > blob[y:z] for w, x, y, z in zip(a, b, c, d)):
            return False
    return True


_SORT_BLOCK = 8192
_WIDEST = 512  # paths up to this many bytes are sorted as fixed-width byte strings


def _by_path(paths: Paths, rows: np.ndarray) -> np.ndarray:
    """``rows`` sorted by their paths (their UTF-8 bytes sort as the text does): as one fixed-width byte
    array (a path's bytes padded with NULs, which no path holds), not a Python object per path."""
    starts = paths.offsets[rows]
    lengths = paths.offsets[rows + 1] - starts
    width = int(lengths.max()) if len(rows) else 0
    if width > _WIDEST:  # a few very long paths would make every row as wide: sorted one object per path
        blob, off = paths.blob, paths.offsets.tolist()
        return np.array(sorted(rows.tolist(), key=lambda i: blob[off[i] : off[i + 1]]), dtype=np.int64)
    keys = np.zeros(len(rows), dtype=f"S{max(width, 1)}")
    raw = keys.view(np.uint8).reshape(len(rows), max(width, 1))
    blob_ = np.frombuffer(paths.blob, dtype=np.uint8)
    for j in range(width):  # byte j of every path that long
        has = np.flatnonzero(lengths > j)
        raw[has, j] = blob_[starts[has] + j]
    return rows[np.argsort(keys, kind="stable")]


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
