"""The store: open it, and list, get, write and remove the dataset views (sets) in it.

Sets layout (rows are in :mod:`featcache.store.rows` and :mod:`featcache.store.segments`)::

    STORE/                          root attrs: {"featcache": {"format_version": 2}}
      sets/<key>-<8 hex>/           one committed instance of a set; attrs: the SetRecord (with its size, measured
                                    once here: its SetSummary), then committed=true
        <split>/sha256 (N, 32) uint8, labels (N,) int32, paths_utf8 (M,) uint8 + paths_offsets (N + 1,) int64
        <split>/segment (N,) int32, row (N,) int64   where each row was at commit (see locator.py)
        locator/names_utf8 + names_offsets          the segments those numbers name
        skipped/, ignored/          files left out: paths_utf8 + paths_offsets, reasons_utf8 + reasons_offsets

Each writer records a set in a group of its own, so concurrent writers never collide; the
set's integrity record (a digest of each array) is written before the marker.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import zarr

from ..errors import AmbiguousSet, DataError, SetNotFound, StoreError
from ..units import human_bytes, now_iso
from . import groups as _groups
from .groups import (
    child_groups,
    commit_stamp,
    digest_values,
    group_bytes,
    is_committed,
    mark_committed,
    meta_size,
    prefixed_groups,
    require_group,
    uncommitted,
    write_array,
)
from .leases import Leases, created_by
from .localfiles import RegularFileStore
from .locator import write_locations
from .records import SetRecord, SetSummary, parse_files
from .rows import Rows
from .segments import encode_strings, hashes_to_array
from .sets import FILE_LISTS, FeatureSet

__all__ = ["FORMAT_VERSION", "Store", "open_store"]

FORMAT_VERSION = 2
_KEY = re.compile(r"[0-9a-f]{12}")  # a whole set key


class Store(Rows, Leases):
    """A featcache store at a local path or fsspec URL.

    Its jobs are mixed in, one module each: :class:`~.rows.Rows` (spaces, segments, the row index,
    ``locate``/``gather``) and :class:`~.leases.Leases` (``lease``/``leases``/``remove_lease``); this
    class adds the sets. Mixins, not members: ``store.gather``, ``store.lease`` ... are the API the
    extract, fit, gc and stream code call, and mixins keep it whole without forwarding methods."""

    def __init__(self, url: str, root: zarr.Group):
        super().__init__()
        self.url = url
        self.root = root
        self.read_only: str | None = None  # why this process cannot write the store, once a write found out

    def set_groups(self) -> list[tuple[str, str, zarr.Group]]:
        """(key, group name, group) of committed sets whose metadata can be read; a key may have several
        identical instances. Unreadable ones are named in ``warnings``."""
        try:
            sets = self.root["sets"]
        except KeyError:
            return []
        out = []
        for name, group in child_groups(sets, self.warnings, "set"):
            attrs = group.attrs
            if is_committed(attrs) and isinstance(attrs.get("key"), str):
                out.append((attrs["key"], name, group))
        return out

    def write_set(self, key: str, record: SetRecord | dict, splits: dict[str, dict[str, np.ndarray]]) -> FeatureSet:
        """Record a dataset view: arrays, then attributes with their digests, then the marker.

        ``record`` is a :class:`SetRecord` or its attributes; either is validated before the marker."""
        for k, _, group in self.set_groups():
            if k == key:
                try:
                    return FeatureSet(self, key, group)
                except StoreError:
                    continue  # a damaged instance: write a sound one beside it
        fields = record.to_attrs() if isinstance(record, SetRecord) else dict(record)
        # created with its space named in the same write, so gc leaves an unfinished set alone while its
        # space is leased (an attribute written after the group would leave a moment without it)
        parent, gname = require_group(self.root, "sets"), f"{key}-{uuid.uuid4().hex[:8]}"
        group = parent.create_group(
            gname,
            attributes=uncommitted(created_at=now_iso(), space=fields.get("space")),
        )
        integrity = {}
        lists = {}
        for name in FILE_LISTS:  # in arrays, not in the metadata: a list of any length stays readable
            files = parse_files(fields.pop(name, None) or [], name, key)
            blob, offsets = encode_strings([str(d["path"]) for d in files])
            why, why_offsets = encode_strings([str(d["reason"]) for d in files])
            sub = group.create_group(name)
            integrity[name] = {}
            for arr, values in (("paths_utf8", blob), ("paths_offsets", offsets), ("reasons_utf8", why),
                                ("reasons_offsets", why_offsets)):
                write_array(sub, arr, values)
                integrity[name][arr] = digest_values(values)
            lists[f"{name}_count"] = len(files)
        for split, arrays in splits.items():
            sub = group.create_group(split)
            blob, offsets = encode_strings([str(p) for p in arrays["paths"]])
            stored = {"sha256": hashes_to_array(arrays["sha256"]), "labels": np.asarray(arrays["labels"], dtype=np.int32),
                      "paths_utf8": blob, "paths_offsets": offsets}
            integrity[split] = {}
            for name, values in stored.items():
                write_array(sub, name, values)
                integrity[split][name] = digest_values(values)
        attrs = {**fields, **lists, "integrity": integrity, "key": key, **commit_stamp()}
        attrs.pop("summary", None)  # measured here, never taken from the caller
        attrs.pop("locator", None)  # found here too
        space = SetRecord.from_attrs(key, attrs).space
        hashes = [str(h) for arrays in splits.values() for h in arrays["sha256"]]
        found = self._where(space, hashes)
        if found is not None:  # where each row is now, so a load reads only those segments (see locator.py)
            segments, where = found
            used, number = np.unique(where[:, 0], return_inverse=True)
            cuts = np.cumsum([0] + [len(arrays["sha256"]) for arrays in splits.values()])
            attrs["locator"] = write_locations(
                group, [segments[s].key for s in used.tolist()],
                {split: (number[a:b], where[a:b, 1]) for split, a, b in zip(splits, cuts[:-1], cuts[1:])})
        attrs["summary"] = asdict(self._summary(group, space, hashes, found))
        SetRecord.from_attrs(key, attrs)  # what is written must read back
        group.attrs.update(attrs)
        size = meta_size(parent, gname) or len(json.dumps(dict(group.attrs), indent=2).encode())
        if size > _groups.MAX_META_BYTES:  # every reader would skip it: never committed
            self._discard(parent, gname)
            largest = sorted(attrs, key=lambda k: len(json.dumps(attrs[k])), reverse=True)[:3]
            raise StoreError(f"the record of set {key} would be {human_bytes(size)} of metadata, over the "
                             f"{human_bytes(_groups.MAX_META_BYTES)} every reader accepts, so nothing was committed; its "
                             f"largest attributes: {', '.join(f'{k} ({human_bytes(len(json.dumps(attrs[k])))})' for k in largest)}")
        mark_committed(group)
        fs = FeatureSet(self, key, group)
        fs.skipped(), fs.ignored()  # what was written reads back
        return fs

    def _discard(self, parent: zarr.Group, name: str) -> None:
        try:
            del parent[name]
        except Exception:  # left uncommitted: gc removes it
            pass

    def _sound_sets(self) -> dict[str, FeatureSet]:
        """The first sound instance of every committed set key; damaged instances become warnings."""
        found: dict[str, FeatureSet] = {}
        latest_first = sorted(self.set_groups(), key=lambda g: str(g[2].attrs.get("created_at", "")), reverse=True)
        for key, name, group in latest_first:
            if key in found:
                continue
            try:
                found[key] = FeatureSet(self, key, group)
            except StoreError as e:
                self._warn(f"set {name}: {e}; skipped")
        return found

    def set_keys(self) -> list[str]:
        """Keys of readable committed sets, oldest first."""
        found = self._sound_sets()
        return sorted(found, key=lambda k: (found[k].record.created_at, k))

    def sets(self) -> list[FeatureSet]:
        found = self._sound_sets()
        return sorted(found.values(), key=lambda fs: (fs.record.created_at, fs.key))

    def get_set(self, key: str | None = None, *, data: str | os.PathLike | None = None) -> FeatureSet:
        """The set whose key starts with ``key``; with no key, the default set (:meth:`default_set`). A whole key
        opens only the groups named after it (``<key>-<8 hex>``), not every set's record."""
        named = prefixed_groups(self.root["sets"], f"{key}-") if key and _KEY.fullmatch(key) and "sets" in self.root else None
        for name, group in sorted(((n, g) for n, g in named or [] if is_committed(g) and g.attrs.get("key") == key),
                                  key=lambda ng: str(ng[1].attrs.get("created_at", "")), reverse=True):
            try:  # the newest sound instance, as _sound_sets takes; none sound: the full listing says why
                return FeatureSet(self, key, group)
            except StoreError as e:
                self._warn(f"set {name}: {e}; skipped")
        found = self._sound_sets()
        keys = sorted(found, key=lambda k: (found[k].record.created_at, k))
        if key is None:
            return self.default_set(data, found)
        matches = [k for k in keys if k.startswith(key)]
        if not matches:
            for k, _, group in self.set_groups():  # a damaged set asked for by name: say why, not "no such set"
                if k.startswith(key):
                    FeatureSet(self, k, group)  # raises the StoreError naming the set and the field
            self._no_sets(keys)
            raise SetNotFound(f"no set {key!r} in {self.url}. Sets: {', '.join(keys)}. See: featcache ls", param="set")
        if len(matches) > 1:
            raise AmbiguousSet(f"{key!r} matches several sets: {', '.join(matches)}. Give more of the key.")
        return found[matches[0]]

    def default_set(self, data: str | os.PathLike | None = None, found: dict[str, FeatureSet] | None = None) -> FeatureSet:
        """The set a command uses when none is named, on a store that several people share:

        1. with ``data``, the newest set made from that folder;
        2. else the newest set made by this user (``created_by``, the user name before the ``@``);
        3. else the only set in the store; with several, an :class:`AmbiguousSet` error listing them.

        The newest candidate is never silently replaced by an older one: if it is damaged, its error is raised.
        """
        found = self._sound_sets() if found is None else found
        groups = self.set_groups()
        if data is not None:
            if not Path(data).is_dir():
                raise DataError(f"the image folder {data} does not exist (or is not a folder); name the folder the set "
                                "was made from", param="data")
            root = str(Path(data).resolve())
            rule, wanted = f"made from {root}", lambda a: a.get("data_root") == root
        else:
            me = created_by().split("@")[0]
            rule, wanted = f"made by {me}", lambda a: str(a.get("created_by", "")).split("@")[0] == me
            if not any(wanted(g.attrs) for _, _, g in groups) and len({k for k, _, _ in groups}) == 1:
                wanted = lambda a: True
        candidates = [(str(g.attrs.get("created_at", "")), k, g) for k, _, g in groups if wanted(g.attrs)]
        if candidates:
            _, k, group = max(candidates, key=lambda c: (c[0], c[1]))
            return found[k] if k in found else FeatureSet(self, k, group)  # a damaged newest set raises, naming it
        keys = sorted(found, key=lambda k: (found[k].record.created_at, k))
        self._no_sets(keys)
        listed = "; ".join(f"{k} ({found[k].record.data_root}, by {found[k].record.created_by})" for k in reversed(keys[-5:]))
        others = ("set" if len(keys) == 1 else "sets") + (" by others" if data is None else "")
        raise AmbiguousSet(f"no set {rule} in {self.url}; it holds {len(keys)} {others}, newest first: {listed}. "
                           "Choose one with --set KEY (see: featcache ls)" + (", or name its folder with --data" if data is None else ""),
                           param="set" if data is None else "--data")

    def _no_sets(self, keys: list[str]) -> None:
        if keys:
            return
        skipped = [w for w in self.warnings if w.startswith("set ")]
        if skipped:
            raise StoreError(f"no readable feature sets in {self.url}; {len(skipped)} damaged: {'; '.join(skipped[:3])}")
        raise SetNotFound(f"no feature sets in {self.url}. Run featcache extract first.")

    def unreadable_sets(self) -> list[str]:
        """Names of set groups whose metadata or record cannot be read (gc must not guess what they use)."""
        before = list(self.warnings)
        self.warnings.clear()
        self._sound_sets()
        bad = [w for w in self.warnings if w.startswith("set ")]
        self.warnings[:] = before + [w for w in self.warnings if w not in before]
        return bad

    def remove_set(self, key: str) -> FeatureSet:
        """Remove a dataset view (all its instances). Its rows stay until ``gc``."""
        fs = self.get_set(key)
        sets = self.root["sets"]
        for k, name, _ in self.set_groups():
            if k == fs.key:
                del sets[name]
        return fs

    def set_bytes(self, fs: FeatureSet) -> int:
        """Bytes on disk of the rows a set uses (the whole segments its rows are read from) plus its own arrays,
        measured now: it reads the set's hashes and looks each up in its space. ``ls`` and ``info`` show the
        :class:`SetSummary` measured the same way when the set was committed instead (``--sizes``: this)."""
        return self._summary(fs.group, fs.space, fs.hashes_all()).total_bytes

    def _where(self, space: str, hashes: list[str]) -> tuple[list, np.ndarray] | None:
        """Where the row of each of ``hashes`` is (``locate``), or None when any is missing."""
        try:
            return self.locate(space, hashes)
        except StoreError:
            return None

    def _summary(self, group: zarr.Group, space: str, hashes: list[str], found=None) -> SetSummary:
        """The size of the set in ``group``: its own arrays, and the whole segments of ``space`` that its rows
        (``hashes``, found at ``found`` when given) are read from; a row missing from the space (removed,
        damaged) counts nothing."""
        own = group_bytes(group)
        found = found or self._where(space, hashes)
        if found is not None:
            segments, where = found
        else:
            held = self.holds(space, hashes)  # rows missing: the segments of those still there
            segments, where = self.locate(space, [h for h, ok in zip(hashes, held.tolist()) if ok])
        used = np.unique(where[:, 0]).tolist()
        rows = sum(int(segments[s].features.nbytes_stored()) for s in used)
        return SetSummary(own + rows, own, rows, len(used))

    def set_size(self, fs: FeatureSet, measure: bool = False) -> int | None:
        """Bytes on disk of a set as recorded when it was committed (its :class:`SetSummary`: nothing but the
        set's attributes is read), None for a set committed before summaries; with ``measure``, measured now
        (:meth:`set_bytes`, which reads the set's hashes and its space's row index)."""
        if measure:
            return self.set_bytes(fs)
        return None if fs.record.summary is None else fs.record.summary.total_bytes


def _version_of(root: zarr.Group) -> int | None:
    meta = root.attrs.get("featcache")
    if not isinstance(meta, dict) or not isinstance(meta.get("format_version"), int):
        return None
    return meta["format_version"]


def local_path(url: str) -> str | None:
    """The filesystem path of a local store URL (a path or ``file://``); None for any other fsspec URL.

    The one place that decides from a URL whether a store is local: everything that treats a local
    store differently (group-writable folders, leftover ``.partial`` files, a run's store path) asks here."""
    url = str(url)
    if "://" in url and not url.startswith("file://"):
        return None
    return url.removeprefix("file://")


def resolved_url(url: str) -> str:
    """``url`` as a run records it: a local store as an absolute path, so the run works from any folder;
    any other fsspec URL (``s3://...``) unchanged."""
    path = local_path(url)
    return str(url) if path is None else os.path.abspath(os.path.expanduser(path))


def _keep_group_writable(url: str) -> None:
    """In a group-writable store directory (a team's shared store), new files stay group-writable."""
    path = local_path(url)
    if path is None:
        return
    try:
        shared = os.stat(path).st_mode & 0o020
    except OSError:
        return
    if shared:
        current = os.umask(0)
        os.umask(current & ~0o070)


def open_store(url: str, mode: str = "a") -> Store:
    """Open a featcache store: ``"a"`` to write, creating it if missing; ``"r+"`` to write an
    existing one (``rm``, ``gc``: a mistyped URL must not leave an empty store); ``"r"`` to read.

    ``url`` is a local path or any fsspec URL (``s3://bucket/path``; credentials and endpoint
    come from the usual environment variables).
    """
    url = str(url)
    if mode != "r":
        _keep_group_writable(url)
    try:
        root = zarr.open_group(zarr_target(url, read_only=True), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        if mode != "a":
            raise StoreError(
                f"no featcache store at {url}. Run featcache extract --store {url} first.", param="store"
            ) from None
        try:  # metadata and version in one write, so a concurrent reader never sees a bare group
            root = zarr.create_group(zarr_target(url), zarr_format=3,
                                     attributes={"featcache": {"format_version": FORMAT_VERSION}})
            return Store(url, root)
        except zarr.errors.ContainsGroupError:  # another writer created it first
            return open_store(url, mode)
        except (OSError, ValueError) as e:  # a path that is a file, a read-only place ...
            raise StoreError(f"cannot create a featcache store at {url} ({e.__class__.__name__}: {e})", param="store") from None
    except (Exception, RecursionError) as e:  # a path that is a file, a v2 store, garbage metadata ...
        raise StoreError(
            f"{url} is not a readable featcache store ({e.__class__.__name__}: {e})", param="store"
        ) from None
    version = _version_of(root)
    if version is None:
        raise StoreError(f"{url} is a Zarr group but not a featcache store (no featcache format_version).", param="store")
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{url} was written by a newer featcache (store format {version}; this one reads up to "
            f"{FORMAT_VERSION}). Upgrade featcache: pip install -U featcache"
        )
    if version < FORMAT_VERSION:
        raise StoreError(
            f"{url} is in store format {version}, which records no integrity information, so missing data could not "
            f"be told from data. Convert it (no feature is recomputed): featcache migrate --store {url}"
        )
    if mode != "r":
        root = zarr.open_group(zarr_target(url), mode="a")
    return Store(url, root)


def zarr_target(url: str, read_only: bool = False, create: bool = True):
    """What Zarr opens for ``url``: a local folder as a :class:`~.localfiles.RegularFileStore` (a FIFO or device
    in place of a file is an error, not a wait), any other URL as it is. Opening a writable local store makes
    its folder; with ``create=False`` a folder that is not there is opened read-only, so that opening it fails
    and makes nothing (as Zarr's own ``mode="r+"`` does)."""
    path = local_path(url)
    if path is None:
        return url
    return RegularFileStore(path, read_only=read_only or (not create and not os.path.isdir(path)))
