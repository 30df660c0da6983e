"""What featcache persists about a set, as a frozen record that parses and validates itself.

A store may be shared by another team, damaged or hostile: every field is checked on read
(type, range, size), and a failure is one ``StoreError`` naming the set and the field.
Nothing in a record ever selects code to run: a backbone name is only a label here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..choices import DTYPES, MAX_CLASSES, POOLS, RECORDED_PRECISIONS, SPLITS
from ..errors import StoreError
from ..fields import Fields
from .groups import MARKER_ATTRS

__all__ = ["SetRecord", "SetSummary", "parse_files"]

SET_ARRAYS = ("sha256", "labels", "paths_utf8", "paths_offsets")  # per split
_MAX_DIMS = 8
_MAX_TEXT = 4096
_MAX_LIST = 1_000_000
_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class _Attrs(Fields):
    """A set's attributes read through :class:`~featcache.fields.Fields`; a bad one is the StoreError
    ``set K has a malformed attribute 'F' (expected W); the store may be damaged``."""

    def __init__(self, doc: dict, key: str, prefix: str = ""):
        super().__init__(doc, f"set {key}", "attributes", prefix, error=StoreError, fix="the store may be damaged")
        self.key = key

    def bad(self, name: str, want: str, got: Any = None) -> StoreError:
        return self.error(f"{self.where} has a malformed attribute {self.prefix + name!r} (expected {want}); {self.fix}")

    def obj(self, name: str, optional: bool = False) -> _Attrs | None:
        value = self.get(name, lambda v: isinstance(v, dict), "an object", optional)
        return None if value is None else _Attrs(value, self.key, f"{self.prefix}{name}.")


class _Bad(Exception):
    """A check written here (what :class:`Fields` has no reader for); reported through :meth:`_Attrs.bad`."""

    def __init__(self, name: str, want: str):
        super().__init__(name, want)
        self.name, self.want = name, want


def _str(v: Any, name: str, pattern: re.Pattern | None = None, limit: int = _MAX_TEXT) -> str:
    if not (isinstance(v, str) and len(v) <= limit and (pattern is None or pattern.fullmatch(v))):
        raise _Bad(name, f"a string{' matching ' + pattern.pattern if pattern else ''} of at most {limit} characters")
    return v


def _opt_str(v: Any, name: str) -> str | None:
    return None if v is None else _str(v, name)


def _json(v: Any, name: str, limit: int = 1 << 20) -> Any:
    """A JSON value of bounded size (already parsed, so its depth was bounded by the parser)."""
    try:
        size = len(json.dumps(v))
    except (TypeError, ValueError, RecursionError):
        raise _Bad(name, "plain JSON") from None
    if size > limit:
        raise _Bad(name, f"at most {limit} bytes of JSON")
    return v


def _dict(v: Any, name: str, limit: int = 1 << 20) -> dict:
    if not isinstance(v, dict):
        raise _Bad(name, "an object")
    return _json(v, name, limit)


def _files(v: Any, name: str) -> tuple[dict, ...]:
    """A list of ``{"path": str, "reason": str}`` (skipped or ignored files)."""
    if not (isinstance(v, list) and len(v) <= _MAX_LIST):
        raise _Bad(name, f"a list of at most {_MAX_LIST} {{path, reason}} objects")
    for d in v:
        if not (isinstance(d, dict) and isinstance(d.get("path"), str) and isinstance(d.get("reason"), str)
                and len(d["path"]) <= _MAX_TEXT and len(d["reason"]) <= _MAX_TEXT):
            raise _Bad(name, "a list of {path, reason} objects")
    return tuple({"path": d["path"], "reason": d["reason"]} for d in v)


def parse_files(v: Any, name: str, key: str) -> list[dict]:
    """A list of ``{"path", "reason"}`` objects (a set's skipped or ignored files), or one StoreError."""
    try:
        return list(_files(v, name))
    except _Bad as e:
        raise StoreError(f"set {key}: {e.name!r} is not {e.want}") from None


def _fractions(v: Any, name: str) -> tuple[float, ...] | None:
    if v is None:
        return None
    if not (isinstance(v, list) and len(v) in (2, 3) and all(isinstance(f, (int, float)) and not isinstance(f, bool)
                                                           and math.isfinite(f) and 0 < f < 1 for f in v)):
        raise _Bad(name, "null or two or three fractions in (0, 1)")
    return tuple(float(f) for f in v)


_MAX_BYTES = 2**62


@dataclass(frozen=True)
class SetSummary:
    """What ``ls`` and ``info`` show of a set's size, measured once when the set is committed, so listing a
    store reads set records only: neither the sets' arrays nor their spaces' rows (measuring it again costs
    O(rows of the set's space): 16 sets of 100k rows, 16.9 s and 704 MB). Its counts and feature shape are
    the record's ``splits`` and ``space_provenance.shape``. Sets committed before it have none.

    ``total_bytes`` = ``own_bytes`` (the set's arrays) + ``rows_bytes`` (the whole segments its rows were
    read from at commit time, ``segments`` of them)."""

    total_bytes: int
    own_bytes: int
    rows_bytes: int
    segments: int

    @classmethod
    def parse(cls, f: Fields) -> SetSummary:
        own, rows = f.integer("own_bytes", 0, _MAX_BYTES), f.integer("rows_bytes", 0, _MAX_BYTES)
        segments = f.integer("segments", 0, 2**31)
        total = f.integer("total_bytes", 0, _MAX_BYTES)
        if total != own + rows:
            raise f.bad("total_bytes", f"own_bytes + rows_bytes ({own + rows})", total)
        if (segments == 0) != (rows == 0):
            raise f.bad("segments", "0 exactly when rows_bytes is 0", segments)
        return cls(total, own, rows, segments)


@dataclass(frozen=True)
class SetRecord:
    """A committed set's attributes, validated."""

    key: str
    space: str
    space_provenance: dict
    backbone: str
    layer: str
    pool: str
    dtype: str
    precision: str
    weights_id: str
    weights_sha256: str
    preprocessing: dict
    classes: tuple[str, ...]
    splits: dict[str, int]
    unlabelled: tuple[str, ...]
    data_root: str
    layout: str
    split_fractions: tuple[float, ...] | None
    split_seed: int | None
    manifest_sha256: str
    views: int
    view_space: str | None
    augment: dict | None
    skipped: tuple[dict, ...]
    ignored: tuple[dict, ...]
    config: dict
    versions: dict
    created_at: str
    created_by: str
    integrity: dict
    summary: SetSummary | None = None  # written by Store.write_set; None in sets committed before summaries
    extra: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.space_provenance["shape"])

    def to_attrs(self) -> dict:
        """The attributes as written (JSON types)."""
        d = asdict(self)
        extra = d.pop("extra")
        d["classes"] = list(self.classes)
        d["unlabelled"] = list(self.unlabelled)
        d["split_fractions"] = list(self.split_fractions) if self.split_fractions else None
        d["skipped"], d["ignored"] = list(self.skipped), list(self.ignored)
        d["weights"] = {"id": d.pop("weights_id"), "sha256": d.pop("weights_sha256")}
        if d["summary"] is None:
            del d["summary"]
        return {**extra, **d}

    @classmethod
    def from_attrs(cls, key: str, a: Mapping) -> SetRecord:
        """Parse and check every field; a failure is one StoreError naming the set and the field."""
        if not isinstance(a, Mapping):
            raise _Attrs({}, key).bad("attributes", "an object")
        f = _Attrs(dict(a), key)
        try:
            return cls._parse(key, f)
        except _Bad as e:
            raise f.bad(e.name, e.want) from None

    @classmethod
    def _parse(cls, key: str, f: _Attrs) -> SetRecord:
        a = f.doc
        _str(a.get("key"), "key", re.compile(r"[0-9a-f]{12}"))
        space = _str(a.get("space"), "space", _HEX16)
        prov = _dict(a.get("space_provenance"), "space_provenance")
        p = f.obj("space_provenance")
        if math.prod(p.shape("shape", _MAX_DIMS)) > 2**31:
            raise p.bad("shape", "at most 2^31 values per row")
        dtype = a.get("dtype")
        if dtype not in DTYPES or prov.get("dtype") != dtype:
            raise _Bad("dtype", f"{' or '.join(DTYPES)}, as in space_provenance")
        precision = a.get("precision")
        if precision not in RECORDED_PRECISIONS or prov.get("precision") != precision:
            raise _Bad("precision", f"one of {', '.join(RECORDED_PRECISIONS)}, as in space_provenance")
        pool = f.text("pool", choices=POOLS)
        weights = a.get("weights")
        if not isinstance(weights, dict):
            raise _Bad("weights", "an object {id, sha256}")
        weights_id = _str(weights.get("id"), "weights.id")
        weights_sha = _str(weights.get("sha256"), "weights.sha256", _HEX64)
        classes = a.get("classes")
        if not (isinstance(classes, list) and 0 < len(classes) <= MAX_CLASSES
                and all(isinstance(c, str) and 0 < len(c) <= 1024 for c in classes) and len(set(classes)) == len(classes)):
            raise _Bad("classes", f"a list of 1 to {MAX_CLASSES} distinct non-empty names")
        splits = a.get("splits")
        if not (isinstance(splits, dict) and "train" in splits and set(splits) <= set(SPLITS)):
            raise _Bad("splits", "counts per split name train/val/test")
        counts = f.obj("splits")
        splits = {s: counts.integer(s, 0, 2**40) for s in SPLITS if s in splits}
        unlabelled = a.get("unlabelled", [])
        if not (isinstance(unlabelled, list) and all(isinstance(u, str) for u in unlabelled)
                and set(unlabelled) <= set(splits) - {"train"}):
            raise _Bad("unlabelled", "a list of split names other than train")
        if len(classes) > splits["train"]:
            raise _Bad("classes", f"no more classes than training images ({splits['train']})")
        views = f.integer("views", 0, 10_000) if a.get("views") else 0
        view_space = a.get("view_space")
        if views and not (isinstance(view_space, str) and _HEX16.fullmatch(view_space)):
            raise _Bad("view_space", "a 16-digit hex key when views > 0")
        augment = a.get("augment")
        if augment is not None:
            _dict(augment, "augment")
        integrity = _dict(a.get("integrity"), "integrity")
        for s in splits:
            arrays = integrity.get(s)
            if not (isinstance(arrays, dict) and all(isinstance(arrays.get(n), str) and _HEX64.fullmatch(arrays[n])
                                                     for n in SET_ARRAYS)):
                raise _Bad(f"integrity.{s}", f"digests of the split's arrays {', '.join(SET_ARRAYS)}")
        summary = f.obj("summary", optional=True)
        known = {f.name for f in cls.__dataclass_fields__.values()} | {"weights", *MARKER_ATTRS}
        return cls(
            key=key,
            space=space,
            space_provenance=prov,
            backbone=_str(a.get("backbone"), "backbone"),
            layer=_str(a.get("layer"), "layer"),
            pool=pool,
            dtype=dtype,
            precision=precision,
            weights_id=weights_id,
            weights_sha256=weights_sha,
            preprocessing=_dict(a.get("preprocessing"), "preprocessing"),
            classes=tuple(classes),
            splits=splits,
            unlabelled=tuple(unlabelled),
            data_root=_str(a.get("data_root"), "data_root"),
            layout=_str(a.get("layout", ""), "layout", limit=1024),
            split_fractions=_fractions(a.get("split_fractions"), "split_fractions"),
            split_seed=f.integer("split_seed", 0, 2**32 - 1, optional=True),
            manifest_sha256=_str(a.get("manifest_sha256"), "manifest_sha256", _HEX64),
            views=views,
            view_space=view_space if views else None,
            augment=augment,
            skipped=_files(a.get("skipped", []), "skipped"),
            ignored=_files(a.get("ignored", []), "ignored"),
            config=_dict(a.get("config", {}), "config", 1 << 16),
            versions=dict(_dict(a.get("versions", {}), "versions", 1 << 14)),
            created_at=_str(a.get("created_at"), "created_at", limit=64),
            created_by=_str(a.get("created_by", "unknown"), "created_by", limit=512),
            integrity=integrity,
            summary=None if summary is None else SetSummary.parse(summary),
            extra={k: _json(v, k, 1 << 16) for k, v in a.items() if k not in known},
        )
