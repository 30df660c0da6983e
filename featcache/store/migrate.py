"""``featcache migrate``: convert a format-1 store to the current format without recomputing features.

Format 1 kept row keys and paths as zarr-python's variable-length strings and recorded no
integrity information. Migration copies every committed segment's rows into a new segment
(core types, integrity record, commit marker last), rewrites every committed set the same
way, removes the format-1 groups, and only then sets the store's format version. A crash at
any point leaves either a format-1 store (re-run migrate: finished new groups are kept, the
rest is redone) or a finished format-2 one.

One migration at a time: a lock group (``migrating/``, created with an exclusive write) is held
while anything is written; a second migrate is refused, and a lock left by a killed migrate on
this machine is taken over.

Format 1 recorded nothing to tell a lost chunk from data (a lost chunk reads as zeros), so
every array is checked before anything is written: all its chunks present, as many keys as rows,
keys that are SHA-256 hex, split names and counts that are sound. A damaged segment or set is
refused with one error naming it (nothing is changed); ``drop_damaged`` migrates the rest and
leaves those out, recorded in the report and in the store's attributes (their rows count as
missing, so extract recomputes them). No row is ever written that could not be read.

What format 1 did not record is stated, not guessed: the compute precision becomes
``unrecorded`` (verify then allows the widest tolerance) and the decode recipe says that
EXIF orientation was not applied.
"""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
from dataclasses import dataclass, field

import numpy as np
import zarr

from ..choices import SPLITS
from ..errors import StoreError
from ..units import now_iso
from .groups import MARKER_ATTRS, child_groups, is_committed, is_read_only, require_group
from .leases import created_by
from .store import FORMAT_VERSION, Store, _version_of, zarr_target

__all__ = ["MigrationReport", "migrate", "V1_DECODE", "LOCK"]

V1_DECODE = {"decoder": "PIL", "exif_transpose": False, "alpha": "white", "high_bit_depth": "scaled_to_8bit"}
LOCK = "migrating"  # the lock group at the store's root, held while a migration writes
_ROW_KEY = re.compile(r"[0-9a-f]{64}(:[0-9]{1,9})?")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SET_KEY = re.compile(r"[0-9a-f]{12}")


@dataclass
class MigrationReport:
    url: str
    spaces: int = 0
    segments: int = 0
    rows: int = 0
    sets: int = 0
    dropped: int = 0
    already: bool = False
    damaged: list[str] = field(default_factory=list)  # groups left out (drop_damaged), with the reason

    def summary(self) -> str:
        if self.already:
            return f"{self.url} is already in store format {FORMAT_VERSION}; nothing to do"
        dropped = (f"; {self.dropped} non-finite rows left out (re-extract their images with --dtype float32)"
                   if self.dropped else "")
        damaged = (f"; {len(self.damaged)} damaged group(s) left out, their rows count as missing (extract "
                   f"recomputes them): {'; '.join(self.damaged[:5])}" if self.damaged else "")
        return (f"migrated {self.url} to store format {FORMAT_VERSION}: {self.spaces} spaces, {self.segments} segments "
                f"({self.rows} rows copied, none recomputed), {self.sets} sets{dropped}{damaged}")


class _Damaged(Exception):
    pass


def _new_provenance(old: dict) -> dict:
    prov = {k: v for k, v in old.items() if k != "dtype"}
    return {**prov, "decode": V1_DECODE, "precision": "unrecorded", "dtype": old.get("dtype", "float16")}


# ---------------------------------------------------------------- checks of format-1 groups


def _complete(group: zarr.Group, name: str, ndim: int | None = None) -> zarr.Array:
    """An array of a format-1 group with every chunk present (format 1 read a lost chunk as fill values)."""
    try:
        arr = group[name]
    except (Exception, RecursionError) as e:
        raise _Damaged(f"its array {name!r} cannot be opened ({e.__class__.__name__})") from None
    if not isinstance(arr, zarr.Array) or (ndim is not None and arr.ndim != ndim):
        raise _Damaged(f"{name!r} is not an array of {ndim} dimension(s)")
    try:
        have, want = arr.nchunks_initialized, arr.nchunks
    except (Exception, RecursionError) as e:
        raise _Damaged(f"the chunks of {name!r} cannot be listed ({e.__class__.__name__})") from None
    if arr.shape[0] and have != want:
        raise _Damaged(f"{want - have} of {want} chunks of {name!r} are missing")
    return arr


def _read(arr: zarr.Array, what: str) -> np.ndarray:
    try:
        return np.asarray(arr[...])
    except (Exception, RecursionError) as e:
        raise _Damaged(f"{what} cannot be read ({e.__class__.__name__}: {e})") from None


def _texts(arr: zarr.Array, what: str) -> list[str]:
    values = _read(arr, what).tolist()
    if not all(isinstance(v, str) for v in values):
        raise _Damaged(f"{what} are not strings")
    return values


def _v1_segment(seg: zarr.Group) -> tuple[zarr.Array, list[str]]:
    """A committed format-1 segment's features array and row keys, or _Damaged saying what is wrong."""
    feats = _complete(seg, "features")
    if feats.ndim < 2 or feats.dtype not in (np.float16, np.float32):
        raise _Damaged(f"its features are {feats.dtype} of shape {feats.shape}, not float16/float32 rows")
    keys = _texts(_complete(seg, "sha256", 1), "its row keys")
    if len(keys) != feats.shape[0]:
        raise _Damaged(f"it holds {feats.shape[0]} rows but {len(keys)} row keys")
    bad = next((k for k in keys if not _ROW_KEY.fullmatch(k)), None)
    if bad is not None:
        raise _Damaged(f"row key {bad[:70]!r} is not a SHA-256 in hex")
    if len(set(keys)) != len(keys):
        raise _Damaged("it holds the same row key twice")
    return feats, keys


def _v1_set(group: zarr.Group, a: dict, moved: dict[str, str]) -> dict[str, dict]:
    """A committed format-1 set's per-split arrays, checked, or _Damaged saying what is wrong."""
    if not (isinstance(a.get("key"), str) and _SET_KEY.fullmatch(a["key"])):
        raise _Damaged("it has no set key (12 hex digits)")
    if a.get("space") not in moved:
        raise _Damaged(f"it refers to space {str(a.get('space'))[:40]!r}, which the store does not hold (or which "
                       "is damaged)")
    splits = a.get("splits")
    if not (isinstance(splits, dict) and "train" in splits and all(s in SPLITS for s in splits)):
        raise _Damaged(f"its splits are not counts per split name {', '.join(SPLITS)} (got "
                       f"{', '.join(map(repr, list(splits)[:3])) if isinstance(splits, dict) else type(splits).__name__})")
    arrays = {}
    for split, count in splits.items():
        if not (isinstance(count, int) and not isinstance(count, bool) and 0 <= count < 2**40):
            raise _Damaged(f"split {split}: its count is not a number of images")
        try:
            sub = group[split]
        except (Exception, RecursionError) as e:
            raise _Damaged(f"split {split} cannot be opened ({e.__class__.__name__})") from None
        hashes = _texts(_complete(sub, "sha256", 1), f"split {split}: the image hashes")
        labels = _read(_complete(sub, "labels", 1), f"split {split}: the labels")
        paths = _texts(_complete(sub, "paths", 1), f"split {split}: the paths")
        if not len(hashes) == len(labels) == len(paths) == count:
            raise _Damaged(f"split {split} holds {len(hashes)} hashes, {len(labels)} labels and {len(paths)} paths; "
                           f"the set says {count}")
        bad = next((h for h in hashes if not _HEX64.fullmatch(h)), None)
        if bad is not None:
            raise _Damaged(f"split {split}: image hash {bad[:70]!r} is not a SHA-256 in hex")
        if labels.dtype.kind not in "iu":
            raise _Damaged(f"split {split}: labels are {labels.dtype}, not integers")
        arrays[split] = {"sha256": hashes, "labels": labels.astype(np.int32), "paths": paths}
    return arrays


# ---------------------------------------------------------------- the lock


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


class _Lock:
    """The ``migrating`` group, created with an exclusive write: one migration of a store at a time."""

    def __init__(self, root: zarr.Group, url: str):
        self.root, self.url = root, url
        self.key = f"{root.path}/{LOCK}/zarr.json" if root.path else f"{LOCK}/zarr.json"
        self.token = uuid.uuid4().hex

    def _put(self) -> bytes:
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        meta = {"zarr_format": 3, "node_type": "group",
                "attributes": {"by": created_by(), "host": socket.gethostname(), "pid": os.getpid(),
                               "started_at": now_iso(), "token": self.token}}
        sync(self.root.store.set_if_not_exists(self.key, default_buffer_prototype().buffer.from_bytes(
            json.dumps(meta).encode())))
        got = sync(self.root.store.get(self.key, prototype=default_buffer_prototype()))
        return b"" if got is None else got.to_bytes()

    def _holder(self, raw: bytes) -> dict:
        try:
            attrs = json.loads(raw)["attributes"]
            return attrs if isinstance(attrs, dict) else {}
        except (ValueError, TypeError, KeyError, RecursionError):
            return {}

    def __enter__(self) -> _Lock:
        for _ in range(2):
            raw = self._put()
            holder = self._holder(raw)
            if holder.get("token") == self.token:
                return self
            if holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid")):
                self._remove()  # left by a migrate on this machine that was killed: take it over
                continue
            break
        raise StoreError(
            f"another featcache migrate (by {str(holder.get('by', '?'))[:80]}, pid {holder.get('pid', '?')}, started "
            f"{str(holder.get('started_at', '?'))[:40]}) is converting {self.url}; wait for it to finish and run "
            f"featcache migrate again. If no migrate is running (it was killed on another machine), remove "
            f"{self.url}/{LOCK} and re-run", param="store")

    def _remove(self) -> None:
        try:
            del self.root[LOCK]
        except KeyError:
            pass

    def __exit__(self, *exc) -> None:
        try:
            self._remove()
        except Exception:  # a lock that cannot be removed is taken over by the next migrate on this machine
            pass


# ---------------------------------------------------------------- migrate


def migrate(url: str, drop_damaged: bool = False) -> MigrationReport:
    """Convert the format-1 store at ``url`` in place (see the module docstring)."""
    try:
        root = zarr.open_group(zarr_target(str(url), create=False), mode="r+")
    except Exception as e:
        raise StoreError(f"no featcache store at {url} ({e.__class__.__name__})", param="store") from None
    version = _version_of(root)
    report = MigrationReport(str(url))
    if version == FORMAT_VERSION:
        report.already = True
        return report
    if version != 1:
        raise StoreError(f"{url} is not a featcache store of format 1 (found {version!r}); nothing was changed")
    try:
        with _Lock(root, str(url)):
            _migrate(root, str(url), report, drop_damaged)
    except OSError as e:
        if is_read_only(e):
            raise StoreError(f"the store at {url} is read-only: migrate must rewrite it ({e.strerror}). Ask its owner "
                             "to run featcache migrate, or copy it and migrate the copy") from None
        raise StoreError(f"writing to {url} failed ({e.__class__.__name__}: {e.strerror or e}); the format-1 store is "
                         "intact: fix the cause and re-run featcache migrate") from None
    return report


def _migrate(root: zarr.Group, url: str, report: MigrationReport, drop_damaged: bool) -> None:
    version = _version_of(root)
    if version == FORMAT_VERSION:  # another migrate finished while this one waited
        report.already = True
        return
    store = Store(url, root)
    spaces = root["spaces"] if "spaces" in root else None
    sets = root["sets"] if "sets" in root else None
    damaged: list[str] = []

    # 1. check everything before anything is written
    segments: dict[str, list[tuple[str, zarr.Array, list[str]]]] = {}
    provenances: dict[str, dict] = {}
    for old_key, group in (child_groups(spaces, damaged, "space") if spaces is not None else []):
        prov = group.attrs.get("space")
        if group.attrs.get("migrated_from"):
            continue
        if not isinstance(prov, dict):
            damaged.append(f"space {old_key}: it records no provenance")
            continue
        provenances[old_key], segments[old_key] = prov, []
        where = f"space {old_key} segment"
        for name, seg in child_groups(group["segments"], damaged, where) if "segments" in group else []:
            if not is_committed(seg):
                continue
            try:
                segments[old_key].append((name, *_v1_segment(seg)))
            except _Damaged as e:
                damaged.append(f"{where} {name}: {e}")
    moved = {old: _new_key(prov) for old, prov in provenances.items()}
    v1_sets: list[tuple[str, dict, dict]] = []
    for name, group in (child_groups(sets, damaged, "set") if sets is not None else []):
        a = dict(group.attrs)
        if not is_committed(a) or "integrity" in a:
            continue
        try:
            v1_sets.append((name, a, _v1_set(group, a, moved)))
        except _Damaged as e:
            damaged.append(f"set {name}: {e}")
    _refuse_or_record(damaged, report, url, drop_damaged)

    # 2. copy rows, then sets; finished new groups of an interrupted run are kept
    for old_key, prov in provenances.items():
        new_key = store.ensure_space(_new_provenance(prov))
        require_group(spaces, new_key).attrs["migrated_from"] = old_key
        done = {g.attrs.get("migrated_from") for _, g in store.segment_groups(new_key)
                if is_committed(g)}
        for name, feats, keys in segments[old_key]:
            if name in done:
                continue
            try:
                _copy_segment(store, new_key, name, feats, keys, report)
            except _Damaged as e:
                _refuse_or_record([f"space {old_key} segment {name}: {e}"], report, url, drop_damaged)
                continue
            report.segments += 1
            report.rows += len(keys)
        report.spaces += 1
    written = {g.attrs.get("migrated_from") for _, _, g in store.set_groups()}
    for name, a, arrays in v1_sets:
        old_prov = a.get("space_provenance") if isinstance(a.get("space_provenance"), dict) else {}
        attrs = {**a, "space": moved[a["space"]], "space_provenance": _new_provenance(old_prov),
                 "precision": "unrecorded", "unlabelled": [], "migrated_from": name}
        if a.get("views") and a.get("view_space") in moved:
            attrs["view_space"] = moved[a["view_space"]]
        for key in (*MARKER_ATTRS, "integrity"):
            attrs.pop(key, None)
        if name not in written:
            try:
                store.write_set(str(a["key"]), attrs, arrays)
            except StoreError as e:  # its record does not validate
                _refuse_or_record([f"set {name}: {e}"], report, url, drop_damaged)
                continue
        report.sets += 1

    # 3. every new group is committed: remove the format-1 ones, then say the store is format 2
    for name, group in (child_groups(sets) if sets is not None else []):
        if "integrity" not in group.attrs:
            del sets[name]
    for old_key in [k for k, _ in (child_groups(spaces) if spaces is not None else [])]:
        if old_key not in moved.values() and not spaces[old_key].attrs.get("migrated_from"):
            del spaces[old_key]
    meta = {"format_version": FORMAT_VERSION, "migrated_at": now_iso()}
    if report.damaged:
        meta["migration_left_out"] = report.damaged[:1000]
    root.attrs["featcache"] = meta


def _new_key(prov: dict) -> str:
    from ..keys import space_key

    return space_key(_new_provenance(prov))


def _refuse_or_record(damaged: list[str], report: MigrationReport, url: str, drop_damaged: bool) -> None:
    if not damaged:
        return
    if not drop_damaged:
        more = f" (and {len(damaged) - 3} more)" if len(damaged) > 3 else ""
        raise StoreError(f"the format-1 store {url} is damaged: {'; '.join(damaged[:3])}{more}. Nothing of the format-1 "
                         "store was changed. To migrate the rest and leave these out (their rows then count as missing "
                         f"and extract recomputes them): featcache migrate --store {url} --drop-damaged")
    report.damaged.extend(damaged)


def _copy_segment(store: Store, new_key: str, name: str, feats: zarr.Array, keys: list[str],
                  report: MigrationReport) -> None:
    """The rows of one checked format-1 segment into a new committed segment; a chunk that cannot be read
    leaves the new segment uncommitted (gc removes it) and raises _Damaged."""
    writer = store.new_segment(new_key, len(keys), tuple(feats.shape[1:]), str(feats.dtype))
    step = feats.chunks[0]
    dropped = 0
    for start in range(0, len(keys), step):
        try:
            block = np.asarray(feats[start: start + step])
        except (Exception, RecursionError) as e:
            raise _Damaged(f"rows {start}-{start + step - 1} cannot be read ({e.__class__.__name__})") from None
        finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
        dropped += int((~finite).sum())  # format 1 could store float16 overflow as inf
        writer.append(block[finite], [k for k, ok in zip(keys[start: start + step], finite) if ok])
    writer.commit(migrated_from=name)
    report.dropped += dropped
