"""What names and label files say: split folder names, label regexes, class lists, a labels CSV."""

from __future__ import annotations

import csv
import multiprocessing as mp
import os
import re
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from ..choices import DEFAULT_NAME_PATTERN  # one source with the command line
from ..errors import DataError
from ..runtime import die_with_parent

__all__ = [
    "CSV_NAMES",
    "split_of",
    "is_store_dir",
    "labels_by_pattern",
    "read_labels_csv",
]

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


MATCH_SECONDS = 5.0
"""How long one file name may keep ``--labels-from-name`` busy: a usable expression takes microseconds."""


def _match_all(pattern: str, names: Sequence[str], conn, at, parent: int) -> None:
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it ends this process
    regex, labels = re.compile(pattern), []
    for i, name in enumerate(names):
        at.value = i
        m = regex.search(name)
        labels.append(m.group(1) if m and m.group(1) else None)
    at.value = len(names)
    conn.send(labels)
    conn.close()


def labels_by_pattern(pattern: str, names: Sequence[str]) -> list[str | None]:
    """The label ``pattern``'s group gives each name (None where it does not match or the group is empty).

    Python's ``re`` cannot be interrupted while it matches (not even by Ctrl-C), and an expression
    with nested repeats such as ``(a+)+$`` takes exponential time on a long name. So the names are
    matched in a helper process, watched: one name busy for more than :data:`MATCH_SECONDS` is a
    :class:`DataError` naming the name and the fix, and Ctrl-C ends the helper at once."""
    if not names:
        return []
    if pattern == DEFAULT_NAME_PATTERN:  # known to be linear: no helper process
        regex = re.compile(pattern)
        return [m.group(1) if (m := regex.search(n)) and m.group(1) else None for n in names]
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    here, there = ctx.Pipe(duplex=False)
    at = ctx.Value("q", -1, lock=False)
    proc = ctx.Process(target=_match_all, args=(pattern, list(names), there, at, os.getpid()), daemon=True,
                       name="featcache-labels")
    proc.start()
    there.close()
    try:
        last, since = -2, time.monotonic()
        while not here.poll(0.1):
            if not proc.is_alive():
                raise DataError(f"matching the file names with --labels-from-name {pattern!r} failed "
                                f"(exit status {proc.exitcode}); re-run the command", param="labels_from_name")
            if at.value != last:
                last, since = at.value, time.monotonic()
            elif time.monotonic() - since > MATCH_SECONDS and 0 <= last < len(names):
                raise DataError(f"--labels-from-name {pattern!r} was still matching the file name {names[last]!r} "
                                f"after {MATCH_SECONDS:g} s: the expression backtracks catastrophically (a repeat inside "
                                "a repeat like (a+)+, or alternatives that overlap like (a|ab)*). Write it without nested "
                                f"repeats, like {DEFAULT_NAME_PATTERN!r}", param="labels_from_name")
        try:
            return here.recv()
        except EOFError:
            raise DataError(f"matching the file names with --labels-from-name {pattern!r} failed; re-run the command",
                            param="labels_from_name") from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        here.close()


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
                                param="labels")
            split_col = fields.get("split")
            rows = [(r.get(split_col) if split_col else None, r.get(label_col), r.get(path_col), reader.line_num)
                    for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read labels file {path}: {getattr(e, 'strerror', None) or e}", param="labels") from None
    base, top = Path(os.path.abspath(path.parent)), Path(os.path.abspath(root))
    out = []
    for split, label, rel, line in rows:
        rel = (rel or "").strip()
        full = Path(os.path.normpath(base / rel))
        if not rel or Path(rel).is_absolute() or not full.is_relative_to(top):
            raise DataError(f"{path} line {line}: {rel!r} is not a path relative to the CSV inside the data folder "
                            f"{root}. Put the CSV beside the images and give paths like images/0001.jpg.",
                            param="labels")
        if split and not split_of(split.strip()):
            raise DataError(f"{path} line {line}: split {split!r} is not train, val or test", param="labels")
        inside = root / os.path.relpath(full, top)  # paths below root as the rest of the walk names them
        out.append((split_of(split.strip()) if split else None, (label or "").strip() or None, inside))
    return out
