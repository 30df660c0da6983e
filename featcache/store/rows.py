"""The row index of one store root: its feature spaces, their segments, and ``locate``/``gather``.

Layout (segments are in :mod:`.segments`)::

    spaces/<space>/                 attrs: {"space": provenance, "created_at"}
      segments/<segment>/           one writer's rows (see :mod:`.segments`)

A row is found by its key (``<sha256>`` or ``<sha256>:<view>``) in the sound committed segments
of its space, the oldest segment first, through the space's :class:`~.rowindex.RowIndex` (sorted key
bytes, ``np.searchsorted``: N keys in O(N log R), about 40 bytes per row). The index is cached while
the committed segments stay the same (on a local folder: while no segment's metadata file changed,
0.05 ms to check), and extended, not rebuilt, when segments were only added after the newest it holds
(an extract's own commits). A set's rows are found where the set recorded them when that still holds
(:mod:`.locator`): a load opens only the segments holding them, not the whole index. Lookups of some
keys (``known_hashes``, ``holds``, ``locate``) search each segment's persisted sorted keys instead
(:mod:`.spacekeys`): they read the chunks those keys fall in, not every key of the space; the whole
index is built where every key is needed (gc, compact, verify, iteration).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import zarr

from ..errors import StoreError
from ..keys import space_key
from ..units import now_iso
from .groups import child_groups, default_compressor, is_committed, require_group, uncommitted
from .leases import created_by
from .locator import RowHint, locate_hinted, open_segment, plain_digests
from .rowindex import RowIndex
from .rowkeys import key_width
from .segments import Segment, SegmentWriter, check_segment, superseded
from .spacekeys import SpaceKeys

__all__ = ["Rows"]


@dataclass
class _SpaceIndex:
    """The row index of one space as last read, and what tells whether it is still current."""

    names: tuple[str, ...]  # the committed segments it was built from, oldest first
    segments: list[Segment]  # the sound ones, less those a compacted segment replaces
    index: RowIndex  # row key -> (segment number, row); the oldest segment wins
    damaged: dict[str, str]  # segment name -> why it does not match its integrity record
    replaced: dict[str, str]  # segment name -> the compacted segment that replaces it
    signature: tuple | None  # the segments' metadata files' stat signature (local stores), else None
    claims: bool = False  # whether any committed segment lists others in ``supersedes``


@dataclass
class _SpaceKeysEntry:
    """The lookup of one space as last listed (see :meth:`Rows._lookup`)."""

    names: tuple[str, ...]  # the committed segments it was made from, oldest first
    keys: SpaceKeys
    signature: tuple | None  # as in _SpaceIndex
    stats: dict[str, tuple]  # segment name -> its metadata file's stat entry in ``signature`` (local stores)


class Rows:
    """Spaces, segments and the row index of one store root (a mixin of :class:`~featcache.store.Store`)."""

    url: str
    root: zarr.Group

    def __init__(self) -> None:
        self._index_cache: dict[str, _SpaceIndex] = {}
        self._keys_cache: dict[str, _SpaceKeysEntry] = {}
        self._claims_cache: dict[str, tuple[tuple, set[str]]] = {}  # space -> (signature, names claimed)
        self._segment_cache: dict[tuple[str, str], tuple[tuple, Segment]] = {}  # (space, name) -> (stat, segment)
        self.warnings: list[str] = []  # damaged groups met while reading, one line each

    def _warn(self, line: str) -> None:
        if line not in self.warnings:
            self.warnings.append(line)

    # ------------------------------------------------------------------ spaces and segments

    def ensure_space(self, provenance: dict) -> str:
        key = space_key(provenance)
        group = require_group(require_group(self.root, "spaces"), key)
        if "space" not in group.attrs:
            group.attrs.update({"space": provenance, "created_at": now_iso()})
        return key

    def spaces(self) -> list[str]:
        try:
            spaces = self.root["spaces"]
        except KeyError:
            return []
        return [k for k, _ in child_groups(spaces, self.warnings, "space")]

    def segment_groups(self, space: str) -> list[tuple[str, zarr.Group]]:
        """All readable segments of a space, committed or not, oldest first."""
        try:
            parent = self.root["spaces"][space]["segments"]
        except KeyError:
            return []
        except (Exception, RecursionError) as e:
            self._warn(f"space {space}: unreadable ({e.__class__.__name__}); skipped")
            return []
        return child_groups(parent, self.warnings, f"space {space} segment")

    def superseded_segments(self, space: str) -> dict[str, str]:
        """Committed segments that a sound compacted segment replaces: name → the replacing segment's name."""
        self._index(space)
        return dict(self._index_cache[space].replaced)

    def damaged_segments(self, space: str) -> dict[str, str]:
        """Committed segments of ``space`` that do not match their integrity record, with the reason."""
        return dict(self._index(space)[2])

    def _segments_signature(self, space: str) -> tuple | None:
        """On a store in a local folder: (name, inode, size, mtime) of every segment's metadata file, a
        listing and a few ``stat`` calls (0.05 ms, where reading the segments' attributes through
        Zarr takes 3-5 ms). A new, removed or committed segment changes it (a commit rewrites the
        segment's ``zarr.json``). ``None`` elsewhere, or when anything is unexpected."""
        from zarr.storage import LocalStore

        store = self.root.store
        if not isinstance(store, LocalStore):
            return None
        folder = os.path.join(str(store.root), self.root.path, "spaces", space, "segments")
        try:
            sig = []
            with os.scandir(folder) as entries:
                for e in entries:
                    if e.name != "zarr.json":
                        st = os.stat(os.path.join(e.path, "zarr.json"))
                        sig.append((e.name, st.st_ino, st.st_size, st.st_mtime_ns))
            return tuple(sorted(sig))
        except OSError:
            return None

    def _index(self, space: str) -> tuple[list[Segment], RowIndex, dict[str, str]]:
        """Sound committed segments, the row index over them (row key → (segment number, row), the
        oldest segment wins), and the damaged ones. Cached while the committed segments stay the same:
        on a local folder while no segment's metadata file changed, elsewhere while the names of
        the committed segments are the same."""
        sig = self._segments_signature(space)
        cached = self._index_cache.get(space)
        if sig is not None and cached is not None and cached.signature == sig:
            return cached.segments, cached.index, cached.damaged
        committed = [(k, g) for k, g in self.segment_groups(space) if is_committed(g)]
        names = tuple(k for k, _ in committed)
        if cached is not None and cached.names == names:
            cached.signature = sig
            return cached.segments, cached.index, cached.damaged
        claims = any(g.attrs.get("supersedes") for _, g in committed)
        if cached is not None and not claims and not cached.claims and names[: len(cached.names)] == cached.names:
            grown = self._grow(space, cached, committed[len(cached.names):], names, sig)
            if grown is not None:
                return grown.segments, grown.index, grown.damaged
        segments, damaged = self._checked(space, committed)
        replaced = superseded(segments, dict(committed))
        segments = [seg for seg in segments if seg.key not in replaced]
        index = RowIndex(segments)
        self._index_cache[space] = _SpaceIndex(names, segments, index, damaged, replaced, sig, claims)
        return segments, index, damaged

    def _checked(self, space: str, committed: list[tuple[str, zarr.Group]]) -> tuple[list[Segment], dict[str, str]]:
        """The sound ones of ``committed``, and why each other one is damaged (a warning each)."""
        segments: list[Segment] = []
        damaged: dict[str, str] = {}
        for name, group in committed:
            seg, why = check_segment(name, group)
            if seg is None:
                damaged[name] = str(why)
                self._warn(f"space {space} segment {name} is damaged ({why}); its rows count as missing")
            else:
                segments.append(seg)
        return segments, damaged

    def _grow(self, space: str, cached: _SpaceIndex, added: list[tuple[str, zarr.Group]], names: tuple[str, ...],
              sig: tuple | None) -> _SpaceIndex | None:
        """The cached index extended by segments committed after it was built whose names sort after every
        segment it holds (so they are the newest and lose every tie), none of them listing others in
        ``supersedes``: the segments held are not read again. None when the key width changes."""
        new, damaged = self._checked(space, added)
        segments = cached.segments + new
        if new and key_width(seg.views for seg in segments) != cached.index.width:
            return None
        index = RowIndex.extended(cached.index, segments, len(new)) if new else cached.index
        entry = _SpaceIndex(names, segments, index, {**cached.damaged, **damaged}, cached.replaced, sig, False)
        self._index_cache[space] = entry
        return entry

    def _lookup(self, space: str) -> SpaceKeys:
        """What row lookups in ``space`` search (:mod:`.spacekeys`): its sound committed segments, opened without
        reading their keys, each searched through its own sorted keys. Cached and refreshed as the row index
        is; segments already opened are not opened again. While a compacted segment and a segment it lists in
        ``supersedes`` are both committed, which of them count is the row index's decision (it reads the keys
        of both): the lookup then searches the segments the index counts."""
        sig = self._segments_signature(space)
        cached = self._keys_cache.get(space)
        if sig is not None and cached is not None and cached.signature == sig:
            return cached.keys
        committed = [(k, g) for k, g in self.segment_groups(space) if is_committed(g)]
        names = tuple(k for k, _ in committed)
        if cached is not None and cached.names == names:
            cached.signature = sig
            return cached.keys
        stats = {e[0]: e for e in sig or ()}
        claimed: set[str] = set()
        for _, group in committed:
            listed = group.attrs.get("supersedes") or []
            claimed.update(n for n in (listed if isinstance(listed, list) else [listed]) if isinstance(n, str))
        if claimed & set(names):
            keys = SpaceKeys(self._index(space)[0], self._warn, space)
        elif cached is not None and names[: len(cached.names)] == cached.names and all(
                stats.get(n) == cached.stats.get(n) for n in cached.names):
            keys = cached.keys.extended(self._opened(space, committed[len(cached.names):], {}))
        else:
            kept = {seg.key: seg for seg in cached.keys.segments
                    if stats.get(seg.key) == cached.stats.get(seg.key)} if cached is not None else {}
            keys = SpaceKeys(self._opened(space, committed, kept), self._warn, space)
        self._keys_cache[space] = _SpaceKeysEntry(names, keys, sig, stats)
        return keys

    def _opened(self, space: str, committed: list[tuple[str, zarr.Group]], kept: dict[str, Segment]) -> list[Segment]:
        """The sound ones of ``committed``, their keys not read yet (a warning for each damaged one); those in
        ``kept`` (opened before, their metadata unchanged) are not opened again."""
        segments = []
        for name, group in committed:
            if name in kept:
                segments.append(kept[name])
                continue
            seg, why = check_segment(name, group, keys=False)
            if seg is None:
                self._warn(f"space {space} segment {name} is damaged ({why}); its rows count as missing")
            else:
                segments.append(seg)
        return segments

    def forget_index(self) -> None:
        """Drop the cached row index, so the next lookup sees what other processes did meanwhile."""
        self._index_cache.clear()
        self._keys_cache.clear()
        self._claims_cache.clear()
        self._segment_cache.clear()

    def refresh_index(self) -> None:
        """Make the next lookup list the committed segments again (on any store, local or not): added ones
        extend the cached index, any other change rebuilds it. Segments already checked are not read again."""
        for entry in self._index_cache.values():
            entry.signature = None
        for keys in self._keys_cache.values():
            keys.signature = None

    # ------------------------------------------------------------------ segments named by a set's locations

    def claimed_segments(self, space: str) -> set[str] | None:
        """Names listed in the ``supersedes`` attribute of any committed segment of ``space`` (whether the
        claim holds or not), from the segments' metadata alone; None when they cannot all be read."""
        sig = self._segments_signature(space)
        cached = self._claims_cache.get(space)
        if sig is not None and cached is not None and cached[0] == sig:
            return cached[1]
        claimed: set[str] = set()
        before = len(self.warnings)
        for _, group in self.segment_groups(space):
            if is_committed(group):
                listed = group.attrs.get("supersedes") or []
                claimed.update(str(n) for n in (listed if isinstance(listed, list) else [listed]))
        if len(self.warnings) != before:  # a segment whose metadata cannot be read: it may claim anything
            return None
        if sig is not None:
            self._claims_cache[space] = (sig, claimed)
        return claimed

    def committed_segment(self, space: str, name: str) -> Segment | None:
        """The committed segment ``name`` of ``space`` checked against its integrity record, or None (absent,
        uncommitted, damaged). Cached on a local folder while its metadata file is the same."""
        from zarr.storage import LocalStore

        stat = None
        store = self.root.store
        if isinstance(store, LocalStore):
            try:
                st = os.stat(os.path.join(str(store.root), self.root.path, "spaces", space, "segments", name,
                                          "zarr.json"))
                stat = (st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError:
                return None
            hit = self._segment_cache.get((space, name))
            if hit is not None and hit[0] == stat:
                return hit[1]
        try:
            parent = self.root["spaces"][space]["segments"]
        except (Exception, RecursionError):
            return None
        seg = open_segment(parent, name)
        if seg is not None and stat is not None:
            self._segment_cache[(space, name)] = (stat, seg)
        return seg

    def space_stats(self, space: str) -> dict[str, int]:
        """Rows, bytes on disk and uncompressed bytes over the space's sound committed segments."""
        rows = stored = raw = 0
        for seg in self._lookup(space).segments:
            rows += seg.features.shape[0]
            stored += int(seg.features.nbytes_stored())
            raw += int(seg.features.nbytes)
        return {"rows": rows, "bytes_stored": stored, "bytes_raw": raw}

    def known_hashes(self, space: str) -> SpaceKeys:
        """The row keys ``space`` holds, as a read-only set (a snapshot: it does not change when others commit);
        ``.contains(keys)`` answers for many keys at once, reading only what those keys touch."""
        return self._lookup(space)

    def holds(self, space: str, keys: Sequence[str]) -> np.ndarray:
        """Which of ``keys`` ``space`` holds (in sound committed segments), as a bool array: O(N log R)."""
        return self._lookup(space).contains(keys)

    def new_segment(
        self, space: str, capacity: int, shape: tuple[int, ...], dtype: str, compressor: Any = None
    ) -> SegmentWriter:
        key = f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        group = require_group(self.root["spaces"][space], "segments").create_group(
            key, attributes=uncommitted(created_at=now_iso(), created_by=created_by()))
        return SegmentWriter(group, capacity, shape, dtype, compressor or default_compressor())

    def remove_segment(self, space: str, name: str) -> None:
        del self.root["spaces"][space]["segments"][name]

    # ------------------------------------------------------------------ rows

    def locate(self, space: str, keys: Iterable[str], hint: RowHint | None = None) -> tuple[list[Segment], np.ndarray]:
        """Segments of ``space`` and, per key, its (segment number, row) as an (N, 2) array: where ``hint``
        (a set's recorded locations of these keys) says when all of them still hold there (see
        :mod:`.locator`), else through each segment's sorted keys (:meth:`_lookup`), else through the row index
        (the sound committed segments, the oldest first; it says which are missing). With no keys: the sound
        committed segments, their keys checked."""
        keys = keys if isinstance(keys, (list, np.ndarray)) else list(keys)
        if hint is not None:
            digests = plain_digests(keys)
            found = None if digests is None else locate_hinted(self, space, digests, hint)
            if found is not None:
                return found
        if len(keys):  # through each segment's sorted keys; any key not found there, through the row index
            lookup = self._lookup(space)
            at = lookup.find(keys)
            if (at >= 0).all():
                return lookup.segments, lookup.locate(at)
        segments, index, damaged = self._index(space)
        rows = index.find(keys)
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            hint = (f" Damaged segment(s): {'; '.join(f'{k} ({v})' for k, v in damaged.items())}." if damaged else "")
            raise StoreError(
                f"row for image {str(keys[int(missing[0])])[:12]} is missing from space {space} (removed, damaged or "
                f"never committed).{hint} Re-run featcache extract to restore it; see: featcache verify"
            )
        return segments, index.locate(rows)

    def gather(self, space: str, hashes: Iterable[str], shape: tuple[int, ...], dtype: str,
               hint: RowHint | None = None) -> np.ndarray:
        """The rows of ``hashes`` in their stored dtype; refuses non-finite values and foreign shapes."""
        segments, located = self.locate(space, hashes, hint)
        out = np.empty((len(located),) + tuple(shape), dtype=dtype)
        where: dict[int, list[tuple[int, int]]] = {}
        for i, (s, r) in enumerate(located.tolist()):
            where.setdefault(s, []).append((i, r))
        for s, pairs in where.items():
            arr = segments[s].features
            if tuple(arr.shape[1:]) != tuple(shape):
                raise StoreError(f"segment {segments[s].key} of space {space} holds rows of shape {arr.shape[1:]}, "
                                 f"not {tuple(shape)}; the store may be damaged")
            dest = np.array([i for i, _ in pairs])
            rows = np.array([r for _, r in pairs])
            try:
                # whole chunks are read and checked against the integrity record, however few rows are wanted:
                # a chunk altered after its commit (its codec checksum intact) must never pass for data
                order = np.argsort(rows, kind="stable")
                out[dest[order]] = segments[s].read_rows(rows[order], space)
            except StoreError:
                raise
            except Exception as e:  # checksum mismatch, codec error, shape mismatch ...
                raise StoreError(
                    f"cannot read segment {segments[s].key} of space {space}: {e.__class__.__name__}: {e}. "
                    "See: featcache verify"
                ) from None
        bad = ~np.isfinite(out.reshape(len(out), -1)).all(axis=1) if len(out) else np.zeros(0, bool)
        if bad.any():
            raise StoreError(f"{int(bad.sum())} rows of space {space} hold non-finite values (NaN or inf); "
                             "the store may be damaged. See: featcache verify")
        return out
