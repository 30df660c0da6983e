"""The walk of an image folder: its listings, and the files left out on the way (:class:`Skip`).

:class:`Finder` lists one folder at a time (hidden names and Zarr stores left out, links to
folders not followed, names that are not valid UTF-8 recorded as skipped) and keeps the list of
what it ignored, with why; :mod:`.layouts` decides from these listings what the layout is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .images import IMAGE_EXTENSIONS
from .labels import is_store_dir
from .paths import Paths

__all__ = ["Finder", "Skip", "rel_path", "base_name", "path_order"]


@dataclass(frozen=True)
class Skip:
    """A file left out, and why."""

    path: str
    reason: str

    def to_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason}


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # os gives undecodable bytes back as lone surrogates
        return False


def rel_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root``, with ``/``, as text (undecodable bytes written as escapes)."""
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class Finder:
    """The walk of one folder: listings, and what was ignored or skipped on the way.

    Files are named by their path relative to the root, as text with ``/`` (one string per file,
    no :class:`~pathlib.Path`: a folder may hold millions); folders are :class:`~pathlib.Path`."""

    def __init__(self, root: Path):
        self.root = root
        self.ignored: list[Skip] = []
        self.skipped: list[Skip] = []

    def ignore(self, path: Path | str, reason: str) -> None:
        """Record ``path`` as ignored: a folder (``Path``) or a file as :meth:`list` names it (relative text)."""
        if isinstance(path, str):
            self.ignored.append(Skip(path, reason))
        else:
            self.ignored.append(Skip(rel_path(path, self.root) + ("/" if path.is_dir() else ""), reason))

    def prefix(self, folder: Path) -> str:
        """What the relative names of the files directly in ``folder`` start with (``""`` at the root)."""
        rel = rel_path(folder, self.root)
        return "" if rel == "." else rel + "/"

    def list(self, folder: Path, record: bool = True) -> tuple[list[str], list[str], list[Path]]:
        """(images, other files, folders) directly in ``folder``; hidden names and stores left out. Files are
        named relative to the root (``train/cat/1.jpg``)."""
        images: list[str] = []
        others: list[str] = []
        dirs: list[Path] = []
        bad: list[tuple[str, Skip]] = []
        prefix = self.prefix(folder)
        try:  # each entry is let go as soon as it is sorted into a list (no DirEntry per file held)
            with os.scandir(folder) as it:
                for e in it:
                    name = e.name
                    if name[0] == ".":
                        continue
                    try:
                        is_dir = e.is_dir()
                    except OSError:  # a link loop: listed as a file, so that hashing records why it cannot be read
                        is_dir = False
                    if not (name.isascii() or _utf8(name)):
                        bad.append((name, Skip(rel_path(Path(e.path), self.root) + ("/" if is_dir else ""),
                                               "name is not valid UTF-8; rename it to include it")))
                    elif is_dir:
                        dirs.append(Path(e.path))
                    elif _image_name(name):
                        images.append(prefix + name)
                    else:
                        others.append(prefix + name)
        except OSError as e:
            raise DataError(f"cannot list {folder}: {e.strerror or e}. Check the folder's permissions.") from None
        # in name order: the files of one folder share their prefix, so their relative paths sort as their names
        images.sort()
        others.sort()
        dirs.sort(key=_name)
        if record:
            self.skipped += [skip for _, skip in sorted(bad, key=lambda b: b[0])]
        return images, others, [d for d in dirs if not is_store_dir(d)]

    def images_below(self, folder: Path) -> Paths:
        """Every image below ``folder`` (a folder's own images, then each subfolder's, in name order); other
        files are ignored, linked folders not followed. Each folder's listing is encoded into the blob as soon
        as it is sorted: the strings of one folder at a time are held, not one per file below."""
        parts: list[Paths] = []
        self._images_into(folder, parts)
        return Paths.concat(parts) if parts else Paths.of([])

    def _images_into(self, folder: Path, parts: list[Paths]) -> None:
        images, others, dirs = self.list(folder)
        for p in others:
            self.ignore(p, "not an image file (extension)")
        if images:
            parts.append(Paths.of(images))
        del images, others
        for d in dirs:
            if d.is_symlink():
                self.ignore(d, "link to a folder (not followed)")
            else:
                self._images_into(d, parts)

    def ignore_all(self, paths: Sequence[Path | str], reason: str) -> None:
        for p in paths:
            self.ignore(p, reason)


def _name(path: Path) -> str:
    return path.name


_EXTENSIONS = frozenset(IMAGE_EXTENSIONS)


def _image_name(name: str) -> bool:
    """:func:`~.images.is_image_name` for a name that does not start with a dot, without ``splitext``."""
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in _EXTENSIONS


def base_name(rel: str) -> str:
    """The file name of a relative path as :class:`Finder` names files."""
    return rel[rel.rfind("/") + 1 :]


def path_order(rel: str) -> list[str]:
    """Sort key of relative paths that orders them as :class:`~pathlib.Path` objects under one root order
    (by parts: ``a/b.png`` before ``a.png``)."""
    return rel.split("/")
