"""A scan cache: a re-run does not re-read files whose stat signature has not changed.

What it remembers, per image folder: each file's path (relative to the folder), its stat
signature (size, ``mtime_ns``, ``ctime_ns``, inode, device) and the SHA-256 of its bytes,
as git's index does. A file is served from the cache only when all five still match, and
only when the entry was safely old when it was written (git's racy-entry rule, stricter):
an entry whose ``mtime`` or ``ctime`` is not at least :data:`RACY_NS` older than the moment
the scan that wrote it *started* is re-hashed next time, because a write in the same clock
tick as the hash could leave every field as it was. ``ctime`` cannot be set back by a user
(``os.utime``, ``touch -d``, ``cp -p`` and ``rsync -t`` restore ``mtime`` only), so a
same-size rewrite whose ``mtime`` was put back is still seen; a rename, a copy over the file
or a deleted-and-recreated file changes the inode or ``ctime``. ``rehash=True``
(``extract --rehash``) ignores the cache and hashes every file again. The reader still
hashes the bytes it decodes (:mod:`featcache.pipeline`), so a file that changes after the
scan is caught whatever the cache said.

Where it lives: ``$FEATCACHE_SCAN_CACHE`` if set (``off`` turns the cache off), else
``$XDG_CACHE_HOME/featcache/scans`` (``~/.cache/featcache/scans``), one file per folder,
named by a hash of the folder's resolved path and device. Not beside the data: image
folders are often read-only or shared, and a cache file a colleague can write is a list of
hashes you would trust without reading. Not in the store: a store is shared across
machines (``s3://``), while inodes, devices and paths are facts of one machine's mounts. A
user's own cache folder holds only what that user's runs measured on that machine.

Format: one ``.npz`` (``allow_pickle=False``) of plain arrays: sorted 8-byte path keys,
the paths as one UTF-8 blob with offsets, the signatures as int64, the hashes as 32-byte
binary, and a JSON header (format, folder, device, start time of the scan). It is written
to a temporary file and renamed over the old one, so concurrent runs leave one whole
file (the last writer's, whose entries are validated like any other). A file that does
not read back as exactly that is ignored with a note: never a wrong hash, at worst a
re-hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
import time
from pathlib import Path

import numpy as np

from .columns import Paths

__all__ = ["RACY_NS", "ScanCache", "cache_dir", "signature", "user_cache"]

RACY_NS = 2_000_000_000
"""An entry is trusted only if its file's mtime and ctime are this much older than the start of
the scan that hashed it: covers coarse timestamps (FAT's 2 s, a kernel's clock tick) and a
small clock skew between this machine and a file server."""

FORMAT = "featcache-scan-cache"
VERSION = 1
_log = logging.getLogger("featcache.data")
_FIELDS = ("keys", "offsets", "paths", "stats", "digests", "header")
_BLOCK = 1024  # files a lookup step holds Python objects for at once


def user_cache(variable: str, leaf: str) -> Path | None:
    """A folder of the user's cache: ``$variable`` if set (``off`` turns it off: ``None``), else
    ``$XDG_CACHE_HOME/featcache/leaf`` (``~/.cache/featcache/leaf``)."""
    env = os.environ.get(variable)
    if env is not None and env.strip().lower() in ("off", "0", "none", "false"):
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "featcache" / leaf


def cache_dir() -> Path | None:
    """The folder of scan caches, or ``None`` when ``FEATCACHE_SCAN_CACHE=off``."""
    return user_cache("FEATCACHE_SCAN_CACHE", "scans")


def signature(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """(size, mtime_ns, ctime_ns, inode, device): what must not change for a cached hash to hold."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


def _path_keys(rels: Paths) -> np.ndarray:
    blake = hashlib.blake2b
    return np.fromiter((int.from_bytes(blake(r, digest_size=8).digest(), "little")
                        for lo in range(0, len(rels), _BLOCK) for r in rels.raw_chunk(lo, min(lo + _BLOCK, len(rels)))),
                       dtype=np.uint64, count=len(rels))


class ScanCache:
    """The cached hashes of one folder's files; :meth:`lookup` serves them, :meth:`save` writes the new ones.

    ``ScanCache.open(root)`` reads what the last scan of ``root`` wrote (nothing with
    ``rehash=True``, or when the cache is off, unreadable or for another folder).
    """

    def __init__(self, root: Path, file: Path | None, arrays: dict[str, np.ndarray] | None, ref_ns: int,
                 device: int):
        self.root, self.file, self.device = root, file, device
        self._ref_ns = ref_ns
        self._a = arrays
        self.started_ns = time.time_ns()  # before any file is looked at: the reference of what this scan writes

    @classmethod
    def open(cls, root: str | os.PathLike, *, rehash: bool = False) -> ScanCache:
        root = Path(root).resolve()
        device = os.stat(root).st_dev
        folder = cache_dir()
        if folder is None:
            return cls(root, None, None, 0, device)
        name = hashlib.sha256(f"{root}\0{device}".encode("utf-8", "surrogateescape")).hexdigest()[:32]
        file = folder / f"{name}.npz"
        arrays, ref_ns = (None, 0) if rehash else _read(file, root, device)
        return cls(root, file, arrays, ref_ns, device)

    def lookup(self, rels: Paths, base: str) -> np.ndarray:
        """Which files (``base + rels[i]``) the cache holds a trusted entry for whose signature matches the
        file's ``stat`` now, as a bool array; their hashes and sizes are then in :attr:`digests` and
        :attr:`sizes`. Hash the others, then :meth:`learn` the results."""
        n = len(rels)
        self._keys = _path_keys(rels)
        self.digests = np.zeros((n, 32), dtype=np.uint8)
        self.sizes = np.full(n, -1, dtype=np.int64)
        self._known = np.zeros(n, dtype=bool)
        self._served = np.full(n, -1, dtype=np.int64)  # the entry of the cache file a file was served from
        self._learned: np.ndarray | None = None  # the stat signatures of files hashed by this scan
        self._stats: np.ndarray | None = None
        self._changed = True
        a, self._a = self._a, None  # what the last scan wrote is not needed past this lookup (unless rewritten)
        if a is None or not len(a["keys"]) or not n:
            return self._known.copy()
        keys, offsets, stats, digests = a["keys"], a["offsets"], a["stats"], a["digests"]
        blob = memoryview(a["paths"])
        limit = self._ref_ns - RACY_NS
        for lo in range(0, n, _BLOCK):  # a block at a time: no Python object per file held past its block
            hi = min(lo + _BLOCK, n)
            where = np.minimum(np.searchsorted(keys, self._keys[lo:hi]), len(keys) - 1)
            cached = stats[where]
            safe = np.maximum(cached[:, 1], cached[:, 2]) < limit
            starts, ends = offsets[where].tolist(), offsets[where + 1].tolist()
            mine = rels.raw_chunk(lo, hi)
            seen, sigs = [], []
            for j in np.flatnonzero(safe).tolist():
                rel = mine[j]
                if blob[starts[j]:ends[j]] != rel:
                    continue  # another path with the same 8-byte key, or none
                try:
                    st = os.stat(base + rel.decode("utf-8", "surrogateescape"))
                except OSError:
                    continue  # hashing it reports why
                if stat.S_ISREG(st.st_mode):
                    seen.append(j)
                    sigs.append(signature(st))
            if not seen:
                continue
            at = np.array(seen, dtype=np.int64)
            hit = at[np.all(np.array(sigs, dtype=np.int64).reshape(len(at), 5) == cached[at], axis=1)]
            self._known[lo + hit] = True
            self._served[lo + hit] = where[hit]
            self.digests[lo + hit] = digests[where[hit]]
            self.sizes[lo + hit] = cached[hit, 0]
        self._changed = not self._known.all() or len(keys) != n
        if self._changed:
            self._stats = stats  # the signatures of the files served, for the file this scan writes
        return self._known.copy()

    def learn(self, i: int, sig: tuple[int, ...] | None, digest: bytes, size: int) -> None:
        """The hash and size of file ``i`` (of the last :meth:`lookup`), read with stat signature ``sig``;
        remembered for the next scan unless ``sig`` is None (the file changed while it was read)."""
        self.digests[i] = np.frombuffer(digest, dtype=np.uint8)
        self.sizes[i] = size
        self._changed = True
        if sig is None:
            return
        if self._learned is None:
            self._learned = np.zeros((len(self._known), 5), dtype=np.int64)
        self._learned[i] = sig
        self._known[i] = True
        self._served[i] = -1

    def save(self, rels: Paths) -> None:
        """Write what this scan knows (the files of the last :meth:`lookup`), atomically; nothing when every
        file was served from the cache as it is."""
        if self.file is None or not self._changed:
            return
        keep = np.flatnonzero(self._known)
        order = keep[np.argsort(self._keys[keep], kind="stable")]
        paths = rels.take(order)
        sigs = np.zeros((len(order), 5), dtype=np.int64)
        served = self._served[order]
        if self._stats is not None:
            sigs[served >= 0] = self._stats[served[served >= 0]]
        if self._learned is not None:
            sigs[served < 0] = self._learned[order[served < 0]]
        header = {"format": FORMAT, "version": VERSION, "root": str(self.root), "device": self.device,
                  "started_ns": self.started_ns, "entries": len(order)}
        arrays = {
            "keys": self._keys[order],
            "offsets": paths.offsets,
            "paths": np.frombuffer(paths.blob, dtype=np.uint8),
            "stats": sigs,
            "digests": self.digests[order],
            "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
        }
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.file.parent, prefix=f".{self.file.stem}-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, **arrays)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.file)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            _log.warning("note: could not write the scan cache %s (%s); the next run hashes every file again",
                         self.file, e.strerror or e)


def _read(file: Path, root: Path, device: int) -> tuple[dict[str, np.ndarray] | None, int]:
    """The arrays of a cache file and the start time of the scan that wrote it, or (None, 0) with a note."""
    try:
        with np.load(file, allow_pickle=False) as z:
            a = {k: z[k] for k in _FIELDS}
    except FileNotFoundError:
        return None, 0
    except Exception as e:
        _log.warning("note: ignoring the damaged scan cache %s (%s); hashing every file", file, e)
        return None, 0
    problem = _check(a, root, device)
    if problem:
        _log.warning("note: ignoring the scan cache %s (%s); hashing every file", file, problem)
        return None, 0
    return a, int(json.loads(a["header"].tobytes())["started_ns"])


def _check(a: dict[str, np.ndarray], root: Path, device: int) -> str | None:
    try:
        header = json.loads(a["header"].tobytes())
    except ValueError:
        return "its header is not JSON"
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        return "not a scan cache of this version"
    if header.get("root") != str(root) or header.get("device") != device:
        return "written for another folder"
    n = header.get("entries")
    started = header.get("started_ns")
    if not isinstance(n, int) or not isinstance(started, int) or isinstance(started, bool):
        return "its header lacks entries or started_ns"
    keys, offsets, blob, stats, digests = (a[k] for k in ("keys", "offsets", "paths", "stats", "digests"))
    shapes = (keys.dtype == np.uint64 and keys.shape == (n,) and offsets.dtype == np.int64
              and offsets.shape == (n + 1,) and blob.dtype == np.uint8 and blob.ndim == 1
              and stats.dtype == np.int64 and stats.shape == (n, 5)
              and digests.dtype == np.uint8 and digests.shape == (n, 32))
    if not shapes:
        return "its arrays do not have the shapes of its header"
    if offsets[0] != 0 or offsets[-1] != len(blob) or np.any(offsets[1:] < offsets[:-1]) or np.any(keys[1:] < keys[:-1]):
        return "its paths or keys are out of order"
    return None
