"""What names and label files say: split folder names, label regexes, class lists, a labels CSV."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Sequence

from ..config import DEFAULT_NAME_PATTERN  # one source with the command line
from ..errors import DataError

__all__ = [
    "SPLIT_NAMES",
    "CSV_NAMES",
    "DEFAULT_NAME_PATTERN",
    "split_of",
    "is_store_dir",
    "parse_name_pattern",
    "parse_classes",
    "read_labels_csv",
]

SPLIT_NAMES = ("train", "val", "test")
CSV_NAMES = ("metadata.csv", "labels.csv")
"""The prefix before the first ``.`` or ``_``: ``cat.0.jpg`` → ``cat``, ``dog_12.png`` → ``dog``."""

_KEYWORDS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
             "test": "test", "testing": "test", "eval": "test", "evaluation": "test"}
_SPLIT_RE = re.compile(r"(train|training|validation|valid|val|dev|testing|test|evaluation|eval)"
                       r"(?:[ ._-]?(?:set|data|images|split))?[ ._-]?\d*", re.IGNORECASE)
_PATH_COLUMNS = ("path", "file_name", "filename", "file", "image")
_LABEL_COLUMNS = ("label", "class")


def split_of(name: str) -> str | None:
    """``"Training_Set"`` → ``"train"``, ``"test1"`` → ``"test"``; None for a name that is not a split's."""
    m = _SPLIT_RE.fullmatch(name)
    return _KEYWORDS[m.group(1).lower()] if m else None


def is_store_dir(path: Path) -> bool:
    """A Zarr store (``*.zarr`` or a folder holding ``zarr.json``): never scanned as data."""
    return path.name.lower().endswith(".zarr") or (path / "zarr.json").exists() or (path / ".zgroup").exists()


def parse_name_pattern(text: str | None) -> str | None:
    """Check a ``--labels-from-name`` regular expression: it must compile and have one group."""
    if text is None:
        return None
    try:
        groups = re.compile(text).groups
    except re.error as e:
        raise DataError(f"--labels-from-name takes a regular expression with one group like {DEFAULT_NAME_PATTERN!r}; "
                        f"{text!r} does not compile ({e})", option="--labels-from-name") from None
    if groups != 1:
        raise DataError(f"--labels-from-name takes a regular expression with exactly one group (the label), like "
                        f"{DEFAULT_NAME_PATTERN!r}; {text!r} has {groups}", option="--labels-from-name")
    return text


def parse_classes(value: str | Sequence[str] | None, option: str = "--classes") -> tuple[str, ...] | None:
    """``"cats,dogs"`` → ``("cats", "dogs")``; None stays None; an empty list is refused."""
    if value is None:
        return None
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value)]
    if not names or not all(names):
        raise DataError(f"{option} takes class names like cats,dogs; got {value!r}", option=option)
    return tuple(dict.fromkeys(names))


def read_labels_csv(path: Path, root: Path) -> list[tuple[str | None, str | None, Path]]:
    """(split or None, label or None, file) for each row of a labels CSV; paths are relative to the CSV."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = {(k or "").strip().lower(): k for k in reader.fieldnames or []}
            path_col = next((fields[c] for c in _PATH_COLUMNS if c in fields), None)
            label_col = next((fields[c] for c in _LABEL_COLUMNS if c in fields), None)
            if path_col is None or label_col is None:
                raise DataError(f"{path} needs a header row with a path column (path or file_name) and a label "
                                f"column (label); its first row is: {', '.join(reader.fieldnames or []) or '(empty)'}",
                                option="--labels")
            split_col = fields.get("split")
            rows = [(r.get(split_col) if split_col else None, r.get(label_col), r.get(path_col), reader.line_num)
                    for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read labels file {path}: {getattr(e, 'strerror', None) or e}", option="--labels") from None
    base, top = Path(os.path.abspath(path.parent)), Path(os.path.abspath(root))
    out = []
    for split, label, rel, line in rows:
        rel = (rel or "").strip()
        full = Path(os.path.normpath(base / rel))
        if not rel or Path(rel).is_absolute() or not full.is_relative_to(top):
            raise DataError(f"{path} line {line}: {rel!r} is not a path relative to the CSV inside the data folder "
                            f"{root}. Put the CSV beside the images and give paths like images/0001.jpg.",
                            option="--labels")
        if split and not split_of(split.strip()):
            raise DataError(f"{path} line {line}: split {split!r} is not train, val or test", option="--labels")
        inside = root / os.path.relpath(full, top)  # paths below root as the rest of the walk names them
        out.append((split_of(split.strip()) if split else None, (label or "").strip() or None, inside))
    return out
