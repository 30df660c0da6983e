"""One validator for untrusted JSON: the store's records and a run's files are read through it.

A JSON document from a colleague's store or a copied run directory may be damaged or hostile:
every field is read with the type and range it must have, and the first bad one is a single
error that names the document, the field, what it must be and what it holds, with the fix.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any, Literal, overload

from .errors import FeatcacheError, RunError

__all__ = ["Fields", "is_int", "is_number", "is_finite", "RUN_FIX"]

RUN_FIX = "The run directory is damaged; re-run featcache fit"

_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict = 40, 40, 4, 4
_MISSING = object()


class Fields:
    """Typed access to one untrusted JSON object; a bad field is one error naming where, the file and the field.

    ``error`` and ``fix`` say what kind of file it is: a run's files (the default) raise
    :class:`RunError` with "re-run featcache fit"; a store's records pass :class:`StoreError` and their own fix.
    """

    def __init__(self, doc: Any, where: str, file: str, prefix: str = "", error: type[FeatcacheError] = RunError,
                 fix: str = RUN_FIX):
        self.where, self.file, self.prefix, self.error, self.fix = where, file, prefix, error, fix
        if not isinstance(doc, dict):
            raise error(f"{where}: {file}{' field ' + repr(prefix) if prefix else ''} must be a JSON object; "
                        f"got {_short.repr(doc)}. {fix}")
        self.doc = doc

    def bad(self, name: str, want: str, got: Any = _MISSING) -> FeatcacheError:
        shown = "nothing (missing)" if got is _MISSING else _short.repr(got)
        return self.error(f"{self.where}: {self.file} field {self.prefix + name!r} must be {want}; got {shown}. {self.fix}")

    def get(self, name: str, check, want: str, optional: bool = False, default: Any = None) -> Any:
        """The value of ``name`` if ``check(value)``; ``default`` when ``optional`` and missing or null."""
        if name not in self.doc:
            if optional:
                return default
            raise self.bad(name, want)
        value = self.doc[name]
        if value is None and optional:
            return default
        if not check(value):
            raise self.bad(name, want, value)
        return value

    @overload
    def integer(self, name: str, lo: int = ..., hi: int = ..., optional: Literal[False] = ...) -> int: ...
    @overload
    def integer(self, name: str, lo: int = ..., hi: int = ..., optional: bool = ...) -> int | None: ...

    def integer(self, name: str, lo: int = 0, hi: int = 2**62, optional: bool = False) -> int | None:
        return self.get(name, lambda v: is_int(v) and lo <= v <= hi, f"an integer in [{lo}, {hi}]", optional)

    @overload
    def number(self, name: str, lo: float = ..., hi: float = ..., optional: Literal[False] = ...,
               nonfinite: bool = ...) -> float: ...
    @overload
    def number(self, name: str, lo: float = ..., hi: float = ..., optional: bool = ..., nonfinite: bool = ...
               ) -> float | None: ...

    def number(self, name: str, lo: float = -math.inf, hi: float = math.inf, optional: bool = False,
               nonfinite: bool = False) -> float | None:
        """A finite number in [lo, hi]; also NaN or ±inf when ``nonfinite`` (a loss that diverged)."""
        def ok(v):
            return (is_finite(v) and lo <= v <= hi) or (nonfinite and isinstance(v, float) and not math.isfinite(v))

        want = f"a finite number in [{lo}, {hi}]" + (" (or NaN/inf)" if nonfinite else "")
        return self.get(name, ok, want, optional)

    @overload
    def text(self, name: str, optional: Literal[False] = ..., choices: tuple[str, ...] | None = ...) -> str: ...
    @overload
    def text(self, name: str, optional: bool = ..., choices: tuple[str, ...] | None = ...) -> str | None: ...

    def text(self, name: str, optional: bool = False, choices: tuple[str, ...] | None = None) -> str | None:
        if choices:
            return self.get(name, lambda v: v in choices, "one of " + ", ".join(choices), optional)
        return self.get(name, lambda v: isinstance(v, str), "a string", optional)

    def flag(self, name: str, optional: bool = False, default: bool | None = None) -> bool | None:
        return self.get(name, lambda v: isinstance(v, bool), "true or false", optional, default)

    @overload
    def obj(self, name: str, optional: Literal[False] = ...) -> Fields: ...
    @overload
    def obj(self, name: str, optional: bool = ...) -> Fields | None: ...

    def obj(self, name: str, optional: bool = False) -> Fields | None:
        value = self.get(name, lambda v: isinstance(v, dict), "a JSON object", optional)
        return None if value is None else Fields(value, self.where, self.file, f"{self.prefix}{name}.", self.error,
                                                  self.fix)

    def shape(self, name: str, max_dims: int = 8) -> tuple[int, ...]:
        def ok(v):
            return isinstance(v, list) and 0 < len(v) <= max_dims and all(is_int(d) and 0 < d < 2**31 for d in v)

        return tuple(self.get(name, ok, f"a list of 1 to {max_dims} positive integers"))


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_finite(v: Any) -> bool:
    """A number that is finite as a float: not NaN or ±inf, nor an integer too large for a float."""
    try:
        return is_number(v) and math.isfinite(v)
    except OverflowError:
        return False
