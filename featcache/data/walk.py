"""The walk of an image folder: its listings, and the files left out on the way (:class:`Skip`).

:class:`Finder` lists one folder at a time (hidden names and Zarr stores left out, links to
folders not followed, names that are not valid UTF-8 recorded as skipped) and keeps the list of
what it ignored, with why; :mod:`.layouts` decides from these listings what the layout is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .images import is_image_name
from .labels import is_store_dir

__all__ = ["Finder", "Skip", "rel_path"]


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
    """The walk of one folder: listings, and what was ignored or skipped on the way."""

    def __init__(self, root: Path):
        self.root = root
        self.ignored: list[Skip] = []
        self.skipped: list[Skip] = []

    def ignore(self, path: Path, reason: str) -> None:
        self.ignored.append(Skip(rel_path(path, self.root) + ("/" if path.is_dir() else ""), reason))

    def list(self, folder: Path, record: bool = True) -> tuple[list[Path], list[Path], list[Path]]:
        """(images, other files, folders) directly in ``folder``; hidden names and stores left out."""
        images, others, dirs = [], [], []
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise DataError(f"cannot list {folder}: {e.strerror or e}. Check the folder's permissions.") from None
        for e in entries:
            if e.name.startswith("."):
                continue
            path = Path(e.path)
            try:
                is_dir = e.is_dir()
            except OSError:  # a link loop: listed as a file, so that hashing records why it cannot be read
                is_dir = False
            if not _utf8(e.name):
                if record:
                    self.skipped.append(Skip(rel_path(path, self.root) + ("/" if is_dir else ""),
                                             "name is not valid UTF-8; rename it to include it"))
            elif is_dir:
                if not is_store_dir(path):
                    dirs.append(path)
            elif is_image_name(e.name):
                images.append(path)
            else:
                others.append(path)
        return images, others, dirs

    def images_below(self, folder: Path) -> list[Path]:
        """Every image below ``folder``, sorted; other files are ignored, linked folders not followed."""
        images, others, dirs = self.list(folder)
        for p in others:
            self.ignore(p, "not an image file (extension)")
        for d in dirs:
            if d.is_symlink():
                self.ignore(d, "link to a folder (not followed)")
            else:
                images.extend(self.images_below(d))
        return images

    def ignore_all(self, paths: list[Path], reason: str) -> None:
        for p in paths:
            self.ignore(p, reason)
