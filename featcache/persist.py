"""Read and write the JSON and array files of a run directory without trusting them.

A run directory may come from a colleague, a crashed job or a hostile source: reading caps
the size, parses without recursion limits getting in the way, reads arrays without pickle
and refuses anything that is not a plain numeric array. Every failure is a
:class:`~featcache.errors.RunError` that names the file. Writing goes through a temporary
file renamed into place, so a reader never sees half a file.

Arrays are read and checked without NumPy (``featcache.npy``), so listing runs never imports it;
:class:`Arrays` gives each as a NumPy array when it is first asked for (loading a head).
"""

from __future__ import annotations

import json
import os
import stat
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RunError
from .fields import Fields
from .npy import NpyError, RawArray, parse_npy

if TYPE_CHECKING:
    import numpy as np

__all__ = ["MAX_JSON_BYTES", "MAX_ARRAY_BYTES", "MAX_JSON_DEPTH", "Arrays", "HeadRecord", "read_json", "write_json",
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


def write_table(path: Path, rows: list[list[int]]) -> None:
    """Write a table of counts as an int64 ``.npy`` (no pickle), published by a rename."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(rows, dtype=np.int64), allow_pickle=False)

    _replace(Path(path), write)


def read_table(path: Path, where: str) -> list[list[int]]:
    """The rows of the square table of non-negative integers in an ``.npy`` file, its header checked before
    its data is read, nothing unpickled."""
    path = Path(path)
    size = _regular_file(path, where)
    try:
        with open(path, "rb") as f:
            table = parse_npy(f.read(size + 1))
    except NpyError as e:
        raise RunError(f"{where}: unreadable run files: {path.name} is not a valid .npy file ({e})") from None
    except OSError as e:
        raise RunError(f"{where}: cannot read {path.name}: {e.strerror or e}") from None
    if table.ndim != 2 or table.shape[0] != table.shape[1] or table.kind not in ("i", "u"):
        raise RunError(f"{where}: {path.name} holds a {table.dtype} array of shape {list(table.shape)}, not a square "
                       "integer table; the run directory is damaged, re-run featcache fit")
    if min(table.values(), default=0) < 0:
        raise RunError(f"{where}: {path.name} holds negative counts; the run directory is damaged, re-run featcache fit")
    return table.rows()


def write_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` as an uncompressed ``.npz``, published by a rename."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    _replace(Path(path), write)


class Arrays(Mapping):
    """A head's named arrays: each kept as stored (a :class:`~featcache.npy.RawArray`, checked without
    NumPy: :meth:`raw`) until it is first asked for as a NumPy array (``arrays[name]``). Built from
    read arrays, NumPy arrays (a fitted head's) or another ``Arrays``."""

    def __init__(self, arrays: Mapping[str, Any]):
        self._items: dict[str, Any] = dict(arrays._items if isinstance(arrays, Arrays) else arrays)

    def raw(self, name: str) -> RawArray:
        a = self._items[name]
        return a if isinstance(a, RawArray) else RawArray.of(a)

    def __getitem__(self, name: str) -> np.ndarray:
        a = self._items[name]
        if isinstance(a, RawArray):
            a = self._items[name] = a.numpy()
        return a

    def __contains__(self, name: object) -> bool:  # not Mapping's, which would make a NumPy array to answer
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def read_arrays(path: Path, where: str) -> Arrays:
    """The arrays of an ``.npz`` file, read without pickle or NumPy: each member a valid ``.npy`` whose data is
    what its header declares, none an object array. Whether they hold finite numbers is :func:`check_numeric`'s
    to say (``HeadRecord`` asks it of every head, read or fitted)."""
    path = Path(path)
    _regular_file(path, where)
    arrays: dict[str, RawArray] = {}
    member = ""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            declared = sum(i.file_size for i in infos)
            if declared > MAX_ARRAY_BYTES:
                raise RunError(f"{where}: {path.name} declares {declared} bytes of arrays, over "
                               f"{MAX_ARRAY_BYTES >> 30} GiB; the run directory is damaged")
            for info in infos:
                member = info.filename
                if not member.endswith(".npy"):
                    raise NpyError("it is not an array (.npy)")
                arrays[member.removesuffix(".npy")] = parse_npy(zf.read(info))  # the size and CRC checked
    except RunError:
        raise
    except NpyError as e:
        raise RunError(f"{where}: unreadable run files: {path.name} is not a valid .npz file "
                       f"(member {member!r}: {e})") from None
    except Exception as e:  # zipfile and zlib raise many types for a damaged file
        raise RunError(f"{where}: unreadable run files: {path.name} is not a valid .npz file "
                       f"({e.__class__.__name__}: {e})") from None
    for name, a in arrays.items():
        if a.dtype == "object":
            raise RunError(f"{where}: {path.name} holds an object array {name!r} (refused: loading it would "
                           "unpickle code); the run directory is damaged or hostile")
    return Arrays(arrays)


def check_numeric(arrays: Arrays, where: str, file: str) -> None:
    """Every array holds plain numbers (bool, int, float), all finite."""
    for name in arrays:
        a = arrays.raw(name)
        if not a.kind:
            raise RunError(f"{where}: {file} array {name!r} has dtype {a.dtype}, expected numbers (bool, integers, "
                           "floats); the run directory is damaged")
        if not a.all_finite():
            raise RunError(f"{where}: {file} array {name!r} holds non-finite values (nan or inf); "
                           "the run directory is damaged, re-run featcache fit")


@dataclass(frozen=True)
class HeadRecord:
    """``head.json`` (kind, parameters, fitted facts) and ``head.npz`` (the learned arrays) of a run.

    ``read`` checks the files' structure; whether the arrays fit the kind of head is for the
    head table to say (``featcache.heads.check_head``). ``arrays`` may be given as any mapping of
    arrays; it is kept as :class:`Arrays`.
    """

    kind: str
    params: dict
    fitted: dict
    arrays: Arrays = field(compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "arrays", Arrays(self.arrays))

    @classmethod
    def of(cls, head) -> HeadRecord:
        """The record of a fitted head (anything with ``name``, ``saved_params``, ``fitted_info``, ``state_arrays``)."""
        return cls(head.name, head.saved_params(), head.fitted_info(), head.state_arrays())

    def to_dict(self) -> dict:
        return {"kind": self.kind, "params": self.params, "fitted": self.fitted}

    @classmethod
    def from_dict(cls, doc: Any, arrays: Mapping[str, Any], where: str) -> HeadRecord:
        f = Fields(doc, where, "head.json")
        kind = f.text("kind")
        params, fitted = f.obj("params"), f.obj("fitted")
        arrays = Arrays(arrays)
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
