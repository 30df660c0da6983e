"""Looking after a store: garbage collection and compaction, each returning a typed report.

(``status`` and ``verify`` compare a set with an image folder and recompute rows with a backbone:
they need the folder scanner and the network, so they live in :mod:`featcache.audit`, above the store.)
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ..errors import StoreError
from ..units import parse_time
from .groups import child_groups, committed_at, group_bytes, is_committed
from .store import Store, local_path

__all__ = ["GcReport", "CompactReport", "gc", "compact"]


@dataclass
class GcReport:
    """What ``gc`` removed (or, with ``dry_run``, would remove)."""

    segments_removed: int = 0
    segments_rewritten: int = 0  # segments whose referenced rows were copied to a new segment, the rest dropped
    rows_removed: int = 0
    sets_removed: int = 0  # unfinished (uncommitted) set groups
    bytes_freed: int = 0
    leases_removed: int = 0  # expired or unreadable leases
    spaces_leased: int = 0  # spaces left alone: a running extract holds a lease on them
    notes: list[str] = field(default_factory=list)  # what was left alone, and why

    def to_dict(self) -> dict:
        """The report as JSON values (what ``featcache gc --json`` prints, before its own keys)."""
        return dataclasses.asdict(self)


@dataclass
class CompactReport:
    """What ``compact`` rewrote: spaces compacted, segments rewritten into one per space, rows copied."""

    spaces: int = 0
    segments: int = 0
    rows: int = 0

    def to_dict(self) -> dict:
        """The report as JSON values (what ``featcache compact --json`` prints)."""
        return dataclasses.asdict(self)


_PARTIAL_MIN_AGE_S = 60.0  # one file's write never takes this long: a younger .partial may be mid-write


def gc(store: Store, grace_s: float = 3600.0, dry_run: bool = False) -> GcReport:
    """Remove uncommitted leftovers and rows no committed set refers to; returns what was freed.

    Anything written in the last ``grace_s`` seconds is left alone, and so is every row of a
    space that a running extract holds a lease on (it may be about to reuse rows no set
    refers to yet). Rows still referenced are copied to a new committed segment before the
    old one is removed, so readers never miss a row. If any set cannot be read, no row is
    removed: what it refers to cannot be known.
    """
    now = datetime.now(UTC)

    def old(recorded) -> bool:
        stamp = parse_time(recorded)
        return stamp is None or (now - stamp).total_seconds() > grace_s

    def leased(space: str) -> bool:  # asked again right before each removal: a lease may be new
        return space in store.leases()[0]

    report = GcReport()
    unreadable = store.unreadable_sets()
    referenced: dict[str, set[str]] = {}
    for fs in store.sets():
        try:
            referenced.setdefault(fs.space, set()).update(fs.hashes_all())
            if fs.views:
                referenced.setdefault(fs.record.view_space, set()).update(fs.view_keys())
        except StoreError as e:
            unreadable.append(f"set {fs.key}: {e}")
    if unreadable:
        report.notes.append(f"{len(unreadable)} set(s) cannot be read, so no committed rows were removed "
                               f"(first: {unreadable[0]}); repair or rm them first")
    live, stale = store.leases()
    for name in stale:
        report.leases_removed += 1
        if not dry_run:
            try:
                store.remove_lease(name)
            except (OSError, ValueError) as e:
                report.notes.append(f"lease {name} could not be removed ({_why(e)}); left alone")
    sets = store.root["sets"] if "sets" in store.root else None
    if sets is not None:
        for name, group in child_groups(sets):
            if not is_committed(group) and old(group.attrs.get("created_at")) and group.attrs.get("space") not in live:
                report.sets_removed += 1
                report.bytes_freed += group_bytes(group)
                if not dry_run:
                    try:
                        del sets[name]
                    except (OSError, ValueError) as e:
                        report.notes.append(f"unfinished set {name} could not be removed ({_why(e)}); left alone")
    for space in store.spaces():
        if space in live:
            report.spaces_leased += 1
            continue
        seen: set[str] = set()
        damaged = store.damaged_segments(space)
        sound = {seg.key: seg for seg in store.locate(space, [])[0]}
        superseded = store.superseded_segments(space)
        for name, group in store.segment_groups(space):
            if not is_committed(group):
                if old(group.attrs.get("created_at")) and not leased(space):
                    freed = group_bytes(group)
                    if dry_run or _remove(store, space, name, report):
                        report.segments_removed += 1
                        report.bytes_freed += freed
                continue
            if name in superseded and not unreadable:  # compacted into another: free it once that one is old
                newer = dict(store.segment_groups(space)).get(superseded[name])
                if newer is not None and old(committed_at(newer)) and not leased(space):
                    freed = group_bytes(group)
                    if dry_run or _remove(store, space, name, report):
                        report.segments_removed += 1
                        report.bytes_freed += freed
                continue
            if unreadable or name in damaged or name not in sound:
                continue  # a damaged segment is evidence for verify, not garbage
            hashes = np.asarray(sound[name].sha256)
            keep = [i for i, h in enumerate(hashes.tolist()) if h in referenced.get(space, ()) and h not in seen]
            seen.update(hashes[keep].tolist())
            if len(keep) == len(hashes) or not old(committed_at(group)) or leased(space):
                continue
            before = group_bytes(group)
            if keep and not dry_run:
                # the rows kept are read chunk by chunk against the integrity record: a chunk altered since
                # its commit must stay evidence for verify, never be copied into a fresh, sound-looking segment
                feats = sound[name].features
                try:
                    rows = sound[name].read_rows(np.asarray(keep, dtype=np.int64), space)
                    if not np.isfinite(rows).all():
                        raise StoreError("it holds non-finite values; see: featcache verify")
                except Exception as e:
                    report.notes.append(f"space {space} segment {name} left alone: {_why(e)}")
                    continue
                writer = store.new_segment(space, len(keep), feats.shape[1:], str(feats.dtype))
                writer.append(rows, hashes[keep].tolist())
                writer.commit(rewritten_from=name)
                report.bytes_freed += before - writer.nbytes_stored()
            elif keep:
                report.bytes_freed += before * (len(hashes) - len(keep)) // max(len(hashes), 1)
            else:
                report.bytes_freed += before
            report.rows_removed += len(hashes) - len(keep)
            if keep:
                report.segments_rewritten += 1
            else:
                report.segments_removed += 1
            if not dry_run:
                _remove(store, space, name, report)
    live = store.leases()[0]
    report.bytes_freed += _remove_partial_writes(store.url, grace_s, dry_run, live)
    return report


def _why(e: BaseException) -> str:
    return str(e) if isinstance(e, StoreError) else f"{e.__class__.__name__}: {e}"


def _remove(store: Store, space: str, name: str, report: GcReport) -> bool:
    """Remove a segment; one that cannot be removed (a symbolic link planted in the store, a file the
    user may not delete) is named in a note and left, so gc goes on with the others."""
    try:
        store.remove_segment(space, name)
        return True
    except (OSError, ValueError) as e:
        report.notes.append(f"space {space} segment {name} could not be removed ({_why(e)}); left alone")
        return False


def _remove_partial_writes(url: str, grace_s: float, dry_run: bool, leased: set[str]) -> int:
    """Temporary ``*.partial`` files a killed process left mid-write (local stores only): none younger
    than a minute (a write in progress) and none under a space a running extract holds a lease on."""
    path = local_path(url)
    if path is None:
        return 0
    freed = 0
    cutoff = time.time() - max(grace_s, _PARTIAL_MIN_AGE_S)
    root = Path(path)
    for path in root.rglob("*.partial"):
        parts = path.relative_to(root).parts
        if parts[0] == "spaces" and len(parts) > 2 and parts[1] in leased:
            continue
        try:
            info = path.stat()
            if info.st_mtime < cutoff:
                freed += info.st_size
                if not dry_run:
                    path.unlink()
        except OSError:
            pass
    return freed


def compact(store: Store, key: str | None = None) -> CompactReport:
    """Rewrite each space's committed segments (those of set ``key``, or all) into one new segment.

    The new segment lists the ones it replaces (``supersedes``, written before its commit
    marker), so a reader sees either the old segments or the new one, never neither; ``gc``
    frees the old files once the new segment is older than its grace. Rows are copied chunk by
    chunk, never recomputed; the space is leased meanwhile.
    """
    if key is not None:
        fs = store.get_set(key)
        spaces = [fs.space] + ([fs.record.view_space] if fs.views else [])
    else:
        spaces = store.spaces()
    report = CompactReport()
    for space in spaces:
        with store.lease([space]):
            store.forget_index()
            segments, index, _ = store._index(space)
            if len(segments) < 2:
                continue
            first = segments[0].features
            writer = store.new_segment(space, len(index), tuple(first.shape[1:]), str(first.dtype))
            wins = index.winners()  # per row: the one its key resolves to (the oldest segment's)
            for s, seg in enumerate(segments):
                keys = seg.sha256.tolist()
                mine = wins[index.offsets[s] : index.offsets[s + 1]]
                for start in range(0, len(keys), seg.chunk_rows):
                    try:
                        block = seg.features[start : start + seg.chunk_rows]
                    except Exception as e:  # a codec checksum that fails, a shard that cannot be decoded ...
                        raise StoreError(f"segment {seg.key} of space {space}, rows from {start}: cannot be read "
                                         f"({e.__class__.__name__}: {e}); nothing was compacted. See: featcache "
                                         "verify") from None
                    seg.check_chunk(start, block, space)
                    take = mine[start : start + len(block)]
                    writer.append(block[take], [k for k, t in zip(keys[start : start + len(block)], take) if t])
            writer.commit(supersedes=[seg.key for seg in segments])
            report.spaces += 1
            report.segments += len(segments)
            report.rows += len(index)
    return report
