"""Where a set's rows were when it was committed, so loading it reads only the segments holding them.

A set records, per split, the segment and the row of each of its images (``<split>/segment`` int32, an
index into the names in ``locator/names_utf8``, and ``<split>/row`` int64). A load then opens only those
segments, reads their keys (checked against their integrity record, as always) and the chunks holding
its rows, instead of every segment's keys of the space (the row index: O(rows of the space)).

A location is a hint, never trusted: it is used only when every segment it names is committed, sound
(its integrity record), not named in any committed segment's ``supersedes`` and holds, at the named row,
the very key the set asks for. Otherwise (rows moved by ``compact``, removed by ``gc``, damaged,
locations altered) the rows are found through the space's row index, as for a set recorded before
locations were: the answer is the same row or an error, never another image's row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import zarr

from .groups import digest_values, is_committed, read_checked, write_array
from .segments import Segment, check_segment, decode_strings, encode_strings

if TYPE_CHECKING:
    from .rows import Rows

__all__ = ["RowHint", "write_locations", "read_locations", "locate_hinted", "plain_digests", "SEGMENT_NAME"]

SEGMENT_NAME = re.compile(r"\d{8}T\d{6}-[0-9a-f]{8}")  # what Rows.new_segment names a segment
_HEX = re.compile(r"[0-9a-f]*")
_GROUP = "locator"


@dataclass(frozen=True)
class RowHint:
    """Per key of a lookup: the segment (an index into ``names``) and the row where the set found it."""

    names: tuple[str, ...]
    segment: np.ndarray  # (n,) int32
    row: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.row)

    def take(self, index) -> RowHint:
        """The hint of a subset of the keys (``keys[index]``)."""
        return RowHint(self.names, self.segment[index], self.row[index])


def _group(parent: zarr.Group, name: str) -> zarr.Group:
    member = parent[name]
    if not isinstance(member, zarr.Group):
        raise ValueError(f"{name!r} is not a group")
    return member


def write_locations(group: zarr.Group, names: list[str], splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """Write the segment names and each split's (segment, row) arrays into a set's ``group``; returns the
    ``locator`` attribute: the count of names and the digests of every array written."""
    sub = group.create_group(_GROUP)
    blob, offsets = encode_strings(names)
    digests: dict = {}
    for name, values in (("names_utf8", blob), ("names_offsets", offsets)):
        write_array(sub, name, values)
        digests[name] = digest_values(values)
    for split, (segment, row) in splits.items():
        digests[split] = {}
        for name, values in (("segment", np.asarray(segment, dtype=np.int32)), ("row", np.asarray(row, dtype=np.int64))):
            write_array(_group(group, split), name, values)
            digests[split][name] = digest_values(values)
    return {"segments": len(names), "integrity": digests}


def read_locations(group: zarr.Group, attr, split: str, count: int) -> RowHint:
    """A split's locations as written by :func:`write_locations`, each array compared with its digest;
    ValueError says what is wrong."""
    if not isinstance(attr, dict) or not isinstance(attr.get("integrity"), dict):
        raise ValueError("its 'locator' attribute is malformed")
    digests, k = attr["integrity"], attr.get("segments")
    if not isinstance(k, int) or isinstance(k, bool) or not isinstance(digests.get(split), dict):
        raise ValueError("its 'locator' attribute is malformed")
    sub = _group(group, _GROUP)
    blob = read_checked(sub, "names_utf8", digests.get("names_utf8"), "uint8")
    names = decode_strings(blob, read_checked(sub, "names_offsets", digests.get("names_offsets"), "int64"))
    if len(names) != k or not all(SEGMENT_NAME.fullmatch(n) for n in names):
        raise ValueError("its segment names are not segment names")
    part = _group(group, split)
    segment = read_checked(part, "segment", digests[split].get("segment"), "int32")
    row = read_checked(part, "row", digests[split].get("row"), "int64")
    if len(segment) != count or len(row) != count:
        raise ValueError(f"it locates {len(segment)} rows, the split holds {count}")
    if count and (segment.min() < 0 or segment.max() >= k or row.min() < 0):
        raise ValueError("its locations point outside its segments")
    return RowHint(tuple(names), segment, row)


def plain_digests(keys) -> np.ndarray | None:
    """Keys that are all plain image keys (64 lowercase hex digits, as sets store them) as (N, 32) uint8
    digests; None for any other key (an augmented view's, a malformed one)."""
    text = "".join(keys.tolist() if isinstance(keys, np.ndarray) else [str(k) for k in keys])
    if len(text) != 64 * len(keys) or not _HEX.fullmatch(text):
        return None
    return np.frombuffer(bytes.fromhex(text), dtype=np.uint8).reshape(len(keys), 32)


def locate_hinted(rows: Rows, space: str, digests: np.ndarray, hint: RowHint) -> tuple[list[Segment], np.ndarray] | None:
    """(segments, (N, 2) array of segment number and row) for keys whose SHA-256 ``digests`` ((N, 32) uint8)
    are where ``hint`` says, or None when any of them is not (then the caller uses the row index)."""
    if len(hint) != len(digests):
        return None
    used = np.unique(hint.segment)
    names = [hint.names[i] for i in used.tolist()]
    claimed = rows.claimed_segments(space)
    if claimed is None or any(n in claimed for n in names):
        return None
    segments = []
    for name in names:
        seg = rows.committed_segment(space, name)
        if seg is None or seg.views is not None:
            return None
        segments.append(seg)
    number = np.searchsorted(used, hint.segment).astype(np.int64)
    for s, seg in enumerate(segments):
        pick = np.flatnonzero(number == s)
        at = hint.row[pick]
        if len(at) and (at.max() >= seg.rows or not np.array_equal(seg.digests[at], digests[pick])):
            return None
    return segments, np.stack([number, hint.row.astype(np.int64)], axis=1).reshape(len(digests), 2)


def open_segment(parent: zarr.Group, name: str) -> Segment | None:
    """The committed, sound segment ``name`` under ``parent`` (a space's ``segments`` group), or None."""
    try:
        group = parent[name]
        if not isinstance(group, zarr.Group) or not is_committed(group):
            return None
    except (Exception, RecursionError):
        return None
    seg, _ = check_segment(name, group)
    return seg
