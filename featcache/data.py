"""Find splits and classes in an image folder, build the manifest, load images as RGB.

Two layouts are understood:

* ``DIR/{train,val|valid,test}/CLASS/IMAGE`` (splits given by the folder), and
* ``DIR/CLASS/IMAGE`` with ``split=(0.8, 0.2)`` or three fractions: a seeded,
  stratified split whose seed and membership end up in the store.

Every file is identified by the SHA-256 of its bytes, so the store never pushes the
same bytes through the same network twice, whatever the file is called.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile

from .errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLIT_NAMES",
    "Item",
    "Skip",
    "Manifest",
    "scan",
    "load_rgb",
    "parse_split",
    "safe_join",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_NAMES = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_HASH_THREADS = 8

# A truncated JPEG is a bad file, not a grey-bottomed image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class Item:
    """One image: where it is (relative to the data root), which split and class, its bytes' hash."""

    path: str
    split: str
    label: int
    sha256: str
    size: int


@dataclass(frozen=True)
class Skip:
    """A file left out, and why."""

    path: str
    reason: str

    def to_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason}


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

    def split_names(self) -> list[str]:
        present = {it.split for it in self.items}
        return [s for s in SPLIT_NAMES if s in present]

    def items_in(self, split: str) -> list[Item]:
        return [it for it in self.items if it.split == split]

    def digest(self) -> str:
        """A hash of what the view is: paths, splits, labels, class names and bytes."""
        rows = [[it.split, it.path, it.label, it.sha256] for it in self.items]
        blob = json.dumps({"classes": self.classes, "rows": rows}, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def parse_split(text: str | Sequence[float] | None) -> tuple[float, ...] | None:
    """``"0.8,0.2"`` → ``(0.8, 0.2)``; two or three positive fractions summing to 1."""
    if text is None or text == "":
        return None
    try:
        parts = tuple(float(p) for p in (text.split(",") if isinstance(text, str) else text))
    except ValueError:
        raise DataError(f"split takes two or three fractions like 0.8,0.2 or 0.7,0.15,0.15; got {text!r}", option="--split") from None
    if len(parts) not in (2, 3) or any(p <= 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
        raise DataError(
            f"split takes two or three positive fractions that sum to 1 (train,val[,test]); got {text!r}",
            option="--split",
        )
    return parts


def _is_visible(name: str) -> bool:
    return not name.startswith(".")


def _list_images(folder: Path, root: Path, ignored: list[Skip]) -> list[Path]:
    """Image files below ``folder`` (recursively), sorted; other files are recorded as ignored."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if _is_visible(d))
        for name in sorted(filenames):
            if not _is_visible(name):
                continue
            path = Path(dirpath) / name
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(path)
            else:
                ignored.append(Skip(path.relative_to(root).as_posix(), "not an image file (extension)"))
    return found


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _is_visible(p.name))


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _hash_all(paths: list[Path]) -> list[tuple[str, int] | OSError]:
    def one(p: Path) -> tuple[str, int] | OSError:
        try:
            return _hash_file(p)
        except OSError as e:
            return e

    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        return list(pool.map(one, paths))


def _stratified_split(labels: np.ndarray, hashes: list[str], fractions: tuple[float, ...], seed: int) -> list[str]:
    """Assign each image a split; every class is split in the same proportions.

    Within a class, images are ranked by a seeded hash of their bytes and cut at the
    fractions. The same seed gives the same split, and adding n images to a class moves only
    existing images next to a cut (at most n per cut), where a reshuffle could move any.
    """
    names = SPLIT_NAMES[: len(fractions)]
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
        cuts = [0] + [int(round(b * len(ranked))) for b in bounds[:-1]] + [len(ranked)]
        for k in range(1, len(cuts)):  # every split gets at least one image of every class
            cuts[k] = min(max(cuts[k], cuts[k - 1] + 1), len(ranked) - (len(cuts) - 1 - k))
        for name, a, b in zip(names, cuts[:-1], cuts[1:]):
            out[ranked[a:b]] = name
    return list(out)


def scan(
    root: str | os.PathLike,
    split: str | Sequence[float] | None = None,
    seed: int = 0,
) -> Manifest:
    """Walk ``root`` and return its manifest (hashes included; nothing is decoded here)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist. Pass --data DIR (default: data/).", option="--data")
    fractions = parse_split(split)
    skipped: list[Skip] = []
    ignored: list[Skip] = []
    sub = {p.name.lower(): p for p in _class_dirs(root)}
    split_dirs = {_SPLIT_ALIASES[k]: p for k, p in sub.items() if k in _SPLIT_ALIASES}

    if "train" in split_dirs:
        if fractions is not None:
            raise DataError(
                f"{root} already has split folders ({', '.join(sorted(split_dirs))}); "
                "--split is only for a flat DIR/CLASS/IMAGE folder. Drop --split."
            )
        layout = "splits"
        per_split: dict[str, dict[str, list[Path]]] = {}
        for name in SPLIT_NAMES:
            if name not in split_dirs:
                continue
            per_split[name] = {
                c.name: _list_images(c, root, ignored) for c in _class_dirs(split_dirs[name])
            }
        classes = sorted(per_split["train"])
        for name, by_class in per_split.items():
            if sorted(by_class) != classes:
                only_train = sorted(set(classes) - set(by_class))
                only_here = sorted(set(by_class) - set(classes))
                raise DataError(
                    f"class folders differ between train and {name}: "
                    f"only in train: {only_train or '-'}; only in {name}: {only_here or '-'}. "
                    "Every split needs the same class folders."
                )
        entries = [
            (name, cls, p) for name, by_class in per_split.items() for cls in classes for p in by_class[cls]
        ]
    else:
        layout = "flat"
        by_class = {c.name: _list_images(c, root, ignored) for c in _class_dirs(root)}
        classes = sorted(by_class)
        entries = [("", cls, p) for cls in classes for p in by_class[cls]]

    if not classes:
        raise DataError(
            f"no class folders in {root}. Expected {root}/train/CLASS/IMAGE (with val/ or valid/) "
            f"or {root}/CLASS/IMAGE with --split 0.8,0.2."
        )
    if not entries:
        raise DataError(f"no images in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}).")

    hashed = _hash_all([p for _, _, p in entries])
    class_index = {c: i for i, c in enumerate(classes)}
    kept: list[tuple[str, str, Path, str, int]] = []
    first_seen: dict[str, tuple[str, str]] = {}  # bytes → (class, path) of their first copy
    for (name, cls, p), h in zip(entries, hashed):
        rel = p.relative_to(root).as_posix()
        if isinstance(h, OSError):
            skipped.append(Skip(rel, f"cannot read: {h.strerror or h}"))
        elif h[1] == 0:
            skipped.append(Skip(rel, "empty file (0 bytes)"))
        elif h[0] in first_seen and first_seen[h[0]][0] != cls:
            other_cls, other = first_seen[h[0]]
            skipped.append(Skip(rel, f"same bytes as {other} (class {other_cls}): conflicting labels"))
        else:
            first_seen.setdefault(h[0], (cls, rel))
            kept.append((name, cls, p, h[0], h[1]))

    counts: dict[tuple[str, str], int] = {}
    for name, cls, *_ in kept:
        counts[(name, cls)] = counts.get((name, cls), 0) + 1
    splits_seen = sorted({name for name, *_ in entries}, key=lambda s: SPLIT_NAMES.index(s) if s else -1)
    for name in splits_seen:
        empty = [c for c in classes if counts.get((name, c), 0) == 0]
        if empty:
            where = f"{root / name}" if name else str(root)
            raise DataError(
                f"class folder(s) with no readable images in {where}: {', '.join(empty)}. "
                "Add images or remove the folder."
            )

    if layout == "flat":
        if fractions is None:
            raise DataError(
                f"{root} has class folders but no train/ and val/ folders. "
                "Pass --split 0.8,0.2 (or train,val,test fractions) to split it."
            )
        labels = np.array([class_index[cls] for _, cls, *_ in kept])
        assigned = _stratified_split(labels, [h for _, _, _, h, _ in kept], fractions, seed)
        kept = [(s, cls, p, h, n) for s, (_, cls, p, h, n) in zip(assigned, kept)]

    items = [
        Item(p.relative_to(root).as_posix(), name, class_index[cls], h, n) for name, cls, p, h, n in kept
    ]
    items.sort(key=lambda it: (SPLIT_NAMES.index(it.split), it.label, it.path))
    return Manifest(
        root=root,
        classes=classes,
        items=items,
        skipped=skipped,
        ignored=ignored,
        layout=layout,
        split_fractions=fractions,
        split_seed=seed if fractions is not None else None,
    )


def safe_join(root: str | os.PathLike, rel: str) -> Path:
    """``root / rel`` for a stored relative path, refusing anything that would leave ``root``."""
    root = Path(root)
    parts = Path(rel).parts
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in parts or "\0" in rel:
        raise DataError(f"refusing stored path {rel!r}: not a plain relative path inside {root}")
    path = root / rel
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        raise DataError(f"refusing stored path {rel!r}: it resolves outside {root}") from None
    return path


def _to_8bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit greyscale modes become 8-bit 'L' by their actual range, not by clipping."""
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return img.convert("L")
    top = 65535.0 if arr.dtype in (np.uint16, np.int32) and arr.max() > 255 else 255.0
    return Image.fromarray(np.clip(arr.astype(np.float64) * (255.0 / top), 0, 255).astype(np.uint8), "L")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image fully and return it as RGB.

    Greyscale, 16-bit, palette, CMYK and images with transparency are converted;
    transparency is composited on white so transparent pixels do not carry garbage.
    Raises ``OSError``/``ValueError`` (from Pillow) for a file that is not a readable image.
    """
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            img = _to_8bit(img)
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode in ("RGBA", "LA", "PA"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")
