"""Read and write the JSON and array files of a run directory without trusting them.

A run directory may come from a colleague, a crashed job or a hostile source: reading caps
the size, parses without recursion limits getting in the way, loads arrays without pickle
and refuses anything that is not a plain numeric array. Every failure is a
:class:`~featcache.errors.RunError` that names the file. Writing goes through a temporary
file renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RunError
from .fields import Fields

__all__ = ["MAX_JSON_BYTES", "MAX_ARRAY_BYTES", "MAX_JSON_DEPTH", "HeadRecord", "read_json", "write_json",
           "json_text", "write_table", "read_table",
           "read_arrays", "write_arrays", "write_atomic", "check_numeric"]

MAX_JSON_BYTES = 64 << 20
MAX_ARRAY_BYTES = 8 << 30  # a rest head of a large backbone is a few hundred MB
MAX_JSON_DEPTH = 64


def _regular_file(path: Path, where: str) -> int:
    """The size of ``path``, which must be a regular file (not a folder, FIFO or device)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise RunError(f"{where}: {path.name} is missing; the run directory is incomplete, re-run featcache fit") from None
    except OSError as e:
        raise RunError(f"{where}: cannot read {path.name}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise RunError(f"{where}: {path.name} is not a regular file; the run directory is damaged")
    return st.st_size


def _depth(obj: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > MAX_JSON_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def read_json(path: Path, where: str) -> Any:
    """Parse ``path`` as UTF-8 JSON of at most ``MAX_JSON_BYTES`` and ``MAX_JSON_DEPTH`` levels."""
    path = Path(path)
    size = _regular_file(path, where)
    if size > MAX_JSON_BYTES:
        raise RunError(f"{where}: {path.name} is {size} bytes, over the {MAX_JSON_BYTES} bytes a run file may have; "
                       "the run directory is damaged")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise RunError(f"{where}: cannot read {path.name}: {e.strerror or e}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RunError(f"{where}: unreadable run files: {path.name} is not UTF-8 text") from None
    except RecursionError:
        raise RunError(f"{where}: unreadable run files: {path.name} nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, or an integer too long to convert
        raise RunError(f"{where}: unreadable run files: {path.name} is not valid JSON ({e})") from None
    if _depth(doc) > MAX_JSON_DEPTH:
        raise RunError(f"{where}: unreadable run files: {path.name} nests deeper than {MAX_JSON_DEPTH} levels")
    return doc


def write_atomic(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it to ``path``: a failed
    write (a full disk, a read-only place) leaves no partial file, and the temporary one is removed."""
    _replace(Path(path), write)


def _replace(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def json_text(doc: Any, where: str) -> str:
    """``doc`` as indented JSON, refused when it is over ``MAX_JSON_BYTES``: every reader would refuse it,
    so nothing is written (``where`` names the file in the message)."""
    text = json.dumps(doc, indent=2)
    size = len(text.encode())
    if size > MAX_JSON_BYTES:
        raise RunError(f"{where} would be {size} bytes, over the {MAX_JSON_BYTES} bytes every reader accepts, so "
                       "it is not written; large tables belong in .npy arrays")
    return text


def write_json(path: Path, doc: Any, text: str | None = None) -> None:
    """Write ``doc`` (or its ``text`` from :func:`json_text`) as indented JSON, published by a rename;
    a document over the read cap is refused before anything is written."""
    text = json_text(doc, str(path)) if text is None else text
    _replace(Path(path), lambda tmp: tmp.write_text(text))


def write_table(path: Path, table: np.ndarray) -> None:
    """Write one numeric array as ``.npy`` (no pickle), published by a rename."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(table), allow_pickle=False)

    _replace(Path(path), write)


def read_table(path: Path, where: str) -> np.ndarray:
    """The square table of non-negative integers in an ``.npy`` file, its header checked against the
    file's size before anything is read, loaded without pickle."""
    path = Path(path)
    _regular_file(path, where)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            got, _, dtype = header(f)
            short = int(np.prod(got, dtype=np.int64)) * dtype.itemsize > _regular_file(path, where) - f.tell()
            if len(got) != 2 or got[0] != got[1] or dtype.kind not in "iu" or short:
                raise RunError(f"{where}: {path.name} holds a {dtype} array of shape {list(got)}"
                               f"{' (the file is shorter)' if short else ''}, not a square integer table; the run "
                               "directory is damaged, re-run featcache fit")
        table = np.load(path, allow_pickle=False)
    except RunError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise RunError(f"{where}: unreadable run files: {path.name} is not a valid .npy file ({e})") from None
    if (table < 0).any():
        raise RunError(f"{where}: {path.name} holds negative counts; the run directory is damaged, re-run featcache fit")
    return table


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as an uncompressed ``.npz``, published by a rename."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    _replace(Path(path), write)


def read_arrays(path: Path, where: str) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file: numeric (bool, int, float), finite, loaded without pickle."""
    path = Path(path)
    _regular_file(path, where)
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            declared = sum(i.file_size for i in zf.infolist())
        if declared > MAX_ARRAY_BYTES:
            raise RunError(f"{where}: {path.name} declares {declared} bytes of arrays, over {MAX_ARRAY_BYTES >> 30} GiB; "
                           "the run directory is damaged")
        with np.load(path, allow_pickle=False) as z:
            for name in z.files:
                arrays[name] = z[name]
    except RunError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise RunError(f"{where}: {path.name} holds an object array (refused: loading it would unpickle code); "
                           "the run directory is damaged or hostile") from None
        raise RunError(f"{where}: unreadable run files: {path.name} is not a valid .npz file ({e})") from None
    except Exception as e:  # zipfile, zlib and numpy raise many types for a damaged file
        raise RunError(f"{where}: unreadable run files: {path.name} is not a valid .npz file "
                       f"({e.__class__.__name__}: {e})") from None
    check_numeric(arrays, where, path.name)
    return arrays


def check_numeric(arrays: dict[str, np.ndarray], where: str, file: str) -> None:
    """Every array holds plain numbers (bool, int, float), all finite."""
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "biuf":
            raise RunError(f"{where}: {file} array {name!r} has dtype {getattr(a, 'dtype', type(a).__name__)}, "
                           "expected numbers; the run directory is damaged")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise RunError(f"{where}: {file} array {name!r} holds non-finite values (nan or inf); "
                           "the run directory is damaged, re-run featcache fit")




@dataclass(frozen=True)
class HeadRecord:
    """``head.json`` (kind, parameters, fitted facts) and ``head.npz`` (the learned arrays) of a run.

    ``read`` checks the files' structure; whether the arrays fit the kind of head is for the
    head class to say (``featcache.heads.check_head``).
    """

    kind: str
    params: dict
    fitted: dict
    arrays: dict[str, np.ndarray] = field(compare=False, repr=False)

    @classmethod
    def of(cls, head) -> HeadRecord:
        """The record of a fitted head (anything with ``name``, ``saved_params``, ``fitted_info``, ``state_arrays``)."""
        return cls(head.name, head.saved_params(), head.fitted_info(), head.state_arrays())

    def to_dict(self) -> dict:
        return {"kind": self.kind, "params": self.params, "fitted": self.fitted}

    @classmethod
    def from_dict(cls, doc: Any, arrays: dict[str, np.ndarray], where: str) -> HeadRecord:
        f = Fields(doc, where, "head.json")
        kind = f.text("kind")
        params, fitted = f.obj("params"), f.obj("fitted")
        check_numeric(arrays, where, "head.npz")
        return cls(kind, params.doc, fitted.doc, arrays)

    @classmethod
    def read(cls, folder: Path, where: str | None = None) -> HeadRecord:
        folder = Path(folder)
        where = where or str(folder)
        doc = read_json(folder / "head.json", where)
        return cls.from_dict(doc, read_arrays(folder / "head.npz", where), where)

    def write(self, folder: Path) -> None:
        folder = Path(folder)
        write_arrays(folder / "head.npz", self.arrays)
        write_json(folder / "head.json", self.to_dict())
