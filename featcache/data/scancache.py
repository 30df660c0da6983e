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

Format (version 2): one file per folder, in the order of the folder's walk: per file a 16-byte
key of its relative path (BLAKE2b), its signature as five int64 and its SHA-256 as 32 bytes, raw
little-endian arrays each with its CRC-32, then a JSON footer (format, folder, device, start
time of the scan, the SHA-256 of the whole list of paths, where each array is). A re-run whose
folder lists the same paths (the footer's digest says so) reads the hashes straight into the
manifest's array and the signatures a block at a time: no copy of the cache is held, about 40
bytes per file fewer than version 1's ``.npz`` of paths and sorted keys, whose files are read once
(matched by path) and replaced. A listing that changed is matched by path key. The file is written
to a temporary file and renamed over the old one, so concurrent runs leave one whole file (the
last writer's, whose entries are validated like any other). A file that does not read back as
exactly that (magic, footer, sizes, CRCs) is ignored with a note: never a wrong hash, at worst a
re-hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
from pathlib import Path

import numpy as np

from .columns import Paths
from .scanfile import FORMAT, IO_BLOCK, SUFFIX, VERSION, Damaged, ScanFile, read_file, write_file

__all__ = ["RACY_NS", "ScanCache", "cache_dir", "signature", "user_cache", "read_file", "write_file", "SUFFIX"]

RACY_NS = 2_000_000_000
"""An entry is trusted only if its file's mtime and ctime are this much older than the start of
the scan that hashed it: covers coarse timestamps (FAT's 2 s, a kernel's clock tick) and a
small clock skew between this machine and a file server."""

_log = logging.getLogger("featcache.data")
_BLOCK = 1024  # files a lookup step holds Python objects for at once


def _stat_matches(rels: Paths, base: str, lo: int, cached: np.ndarray, limit: int) -> np.ndarray:
    """Of files ``lo`` on (``len(cached)`` of them, their entries' signatures ``cached``; -1: none), those whose
    entry is older than ``limit`` and whose ``stat`` now is a regular file of the same signature: their offsets."""
    safe = (cached[:, 0] >= 0) & (np.maximum(cached[:, 1], cached[:, 2]) < limit)
    mine = rels.raw_chunk(lo, lo + len(cached))
    seen, sigs = [], []
    for j in np.flatnonzero(safe).tolist():
        try:
            st = os.stat(base + mine[j].decode("utf-8", "surrogateescape"))
        except OSError:
            continue  # hashing it reports why
        if stat.S_ISREG(st.st_mode):
            seen.append(j)
            sigs.append(signature(st))
    if not seen:
        return np.zeros(0, dtype=np.int64)
    at = np.array(seen, dtype=np.int64)
    return at[np.all(np.array(sigs, dtype=np.int64).reshape(len(at), 5) == cached[at], axis=1)]


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
    """(N, 2) uint64: a 16-byte BLAKE2b key of each relative path's UTF-8 bytes."""
    blake = hashlib.blake2b
    out = np.empty((len(rels), 2), dtype="<u8")
    flat = out.reshape(-1).view(np.uint8)
    for lo in range(0, len(rels), _BLOCK):
        hi = min(lo + _BLOCK, len(rels))
        flat[lo * 16 : hi * 16] = np.frombuffer(b"".join(blake(r, digest_size=16).digest()
                                                          for r in rels.raw_chunk(lo, hi)), dtype=np.uint8)
    return out


def _listing_digest(rels: Paths) -> str:
    """SHA-256 of the whole list of paths (their offsets and bytes): equal lists, equal digests."""
    h = hashlib.sha256(np.ascontiguousarray(rels.offsets, dtype="<i8"))
    h.update(rels.blob)
    return h.hexdigest()


def _open_checked(file: Path, root: Path, device: int) -> ScanFile | _Version1 | None:
    """The cache file of ``root`` opened and its footer checked, or None (with a note when one is there but
    cannot be used)."""
    try:
        fh = ScanFile.open(file)
    except FileNotFoundError:
        earlier = file.with_suffix(".npz")
        return _Version1.load(earlier, root, device) if earlier.exists() else None
    except (OSError, Damaged) as e:
        _log.warning("note: ignoring the damaged scan cache %s (%s); hashing every file", file, e)
        return None
    if fh.footer.get("root") != str(root) or fh.footer.get("device") != device:
        fh.close()
        _log.warning("note: ignoring the scan cache %s (written for another folder); hashing every file", file)
        return None
    return fh


class ScanCache:
    """The cached hashes of one folder's files; :meth:`lookup` serves them, :meth:`save` writes the new ones.

    ``ScanCache.open(root)`` opens what the last scan of ``root`` wrote (nothing with ``rehash=True``,
    or when the cache is off, unreadable or for another folder); :meth:`close` (or ``with``) lets it go.
    """

    def __init__(self, root: Path, file: Path | None, old: ScanFile | _Version1 | None, device: int):
        self.root, self.file, self.device = root, file, device
        self._old = old
        self._ref_ns: int = old.footer["started_ns"] if old is not None else 0
        self.entries = old.entries if old is not None else 0
        self.started_ns = time.time_ns()  # before any file is looked at: the reference of what this scan writes

    @classmethod
    def open(cls, root: str | os.PathLike, *, rehash: bool = False) -> ScanCache:
        root = Path(root).resolve()
        device = os.stat(root).st_dev
        folder = cache_dir()
        if folder is None:
            return cls(root, None, None, device)
        name = hashlib.sha256(f"{root}\0{device}".encode("utf-8", "surrogateescape")).hexdigest()[:32]
        file = folder / f"{name}{SUFFIX}"
        return cls(root, file, None if rehash else _open_checked(file, root, device), device)

    def close(self) -> None:
        if self._old is not None:
            self._old.close()
            self._old = None

    def __enter__(self) -> ScanCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def lookup(self, rels: Paths, base: str) -> np.ndarray:
        """Which files (``base + rels[i]``) the cache holds a trusted entry for whose signature matches the
        file's ``stat`` now, as a bool array; their hashes and sizes are then in :attr:`digests` and
        :attr:`sizes`. Hash the others, then :meth:`learn` the results."""
        n = self._n = len(rels)
        self.digests = np.zeros((n, 32), dtype=np.uint8)
        self.sizes = np.full(n, -1, dtype=np.int64)
        self._known = np.zeros(n, dtype=bool)
        self._aligned = False  # the old file's entries are this listing's files, in its order
        self._served: np.ndarray | None = None  # otherwise: the old entry each file was served from (-1: none)
        self._old_stats: np.ndarray | None = None
        self._keys: np.ndarray | None = None
        self._learned: np.ndarray | None = None  # the stat signatures of files hashed by this scan
        self._changed = True
        old = self._old
        if old is None or not old.entries or not n:
            return self._known.copy()
        try:
            if isinstance(old, ScanFile) and old.entries == n and old.footer["listing"] == _listing_digest(rels):
                self._aligned = True
                old.read("digests", out=self.digests)  # straight into the manifest's array: no copy held
                for lo, cached in old.blocks("stats"):
                    self._match(rels, base, lo, cached, np.arange(lo, lo + len(cached)))
                self.digests[~self._known] = 0
            else:
                self._match_keys(rels, base, old)
        except (OSError, Damaged) as e:
            _log.warning("note: ignoring the damaged scan cache %s (%s); hashing every file", self.file, e)
            self.digests[:] = 0
            self.sizes[:] = -1
            self._known[:] = False
            self._aligned, self._served, self._old_stats = False, None, None
            self.close()
            return self._known.copy()
        self._changed = not (self._aligned and self._known.all())
        return self._known.copy()

    def _match_keys(self, rels: Paths, base: str, old: ScanFile | _Version1) -> None:
        """The listing changed: each file's entry found by its path key, wherever it is in the old file."""
        self._keys = _path_keys(rels)
        okeys = old.read("keys")
        order = np.argsort(okeys[:, 0], kind="stable")
        first = okeys[order, 0]
        stats, digests = old.read("stats"), old.read("digests")
        self._served = np.full(self._n, -1, dtype=np.int64)
        for lo in range(0, self._n, _BLOCK):
            q = self._keys[lo : lo + _BLOCK]
            where = order[np.minimum(np.searchsorted(first, q[:, 0]), len(first) - 1)]
            same = np.all(okeys[where] == q, axis=1)
            stats_here = np.where(same[:, None], stats[where], -1)
            hit = self._match(rels, base, lo, stats_here, where)
            self.digests[lo + hit] = digests[where[hit]]
        self._old_stats = stats

    def _match(self, rels: Paths, base: str, lo: int, cached: np.ndarray, where: np.ndarray) -> np.ndarray:
        """Files ``lo`` on whose entries are ``cached`` (signatures; -1: none): those whose entry is safely old
        and whose ``stat`` now gives the same signature are served. Their offsets from ``lo``."""
        limit = self._ref_ns - RACY_NS
        starts = range(0, len(cached), _BLOCK)  # a block at a time: no Python object per file held past its block
        # one thread: os.stat releases the GIL, but the Python around each call does not, and threads sharing
        # it made this step slower (1M files on 2 cores: 3.4 s alone, 4.8 s on 2 threads, 5.7 s on 4)
        hits = [a + _stat_matches(rels, base, lo + a, cached[a : a + _BLOCK], limit) for a in starts]
        hit = np.concatenate(hits) if hits else np.zeros(0, dtype=np.int64)
        self._known[lo + hit] = True
        self.sizes[lo + hit] = cached[hit, 0]
        if self._served is not None:
            self._served[lo + hit] = where[hit]
        return hit

    def learn(self, i: int, sig: tuple[int, ...] | None, digest: bytes, size: int) -> None:
        """The hash and size of file ``i`` (of the last :meth:`lookup`), read with stat signature ``sig``;
        remembered for the next scan unless ``sig`` is None (the file changed while it was read)."""
        self.digests[i] = np.frombuffer(digest, dtype=np.uint8)
        self.sizes[i] = size
        self._changed = True
        if sig is None:
            return
        if self._learned is None:
            self._learned = np.full((self._n, 5), -1, dtype=np.int64)
        self._learned[i] = sig
        self._known[i] = True

    def save(self, rels: Paths) -> None:
        """Write what this scan knows (the files of the last :meth:`lookup`, in their order), atomically; nothing
        when every file was served from the cache as it is."""
        try:
            if self.file is None or not self._changed:
                return
            footer = {"format": FORMAT, "version": VERSION, "root": str(self.root), "device": self.device,
                      "started_ns": self.started_ns, "entries": self._n, "listing": _listing_digest(rels)}
            old = self._old if self._aligned and isinstance(self._old, ScanFile) else None
            keys = self._keys if self._keys is not None else \
                (b for _, b in old.blocks("keys")) if old is not None else _path_keys(rels)
            try:
                write_file(self.file, footer, {"keys": keys, "stats": self._stats_blocks(old), "digests": self.digests})
            except Damaged as e:  # the old file changed under this scan: nothing written, the next scan hashes
                _log.warning("note: could not write the scan cache %s (%s); the next run hashes every file again",
                             self.file, e)
                return
            self.file.with_suffix(".npz").unlink(missing_ok=True)  # an earlier version's file
        except OSError as e:
            _log.warning("note: could not write the scan cache %s (%s); the next run hashes every file again",
                         self.file, e.strerror or e)
        finally:
            self.close()

    def _stats_blocks(self, old: ScanFile | None):
        """The signature of each file as this scan trusts it, a block at a time: the old entry's for a file
        served from it, what :meth:`learn` was given for one hashed, -1 (never served) for the others."""
        olds = old.blocks("stats") if old is not None else None
        for lo in range(0, self._n, IO_BLOCK):
            hi = min(lo + IO_BLOCK, self._n)
            out = np.full((hi - lo, 5), -1, dtype=np.int64)
            known = self._known[lo:hi]
            if olds is not None:
                start, block = next(olds)
                assert start == lo
                out[known] = block[known]
            elif self._served is not None and self._old_stats is not None:
                served = self._served[lo:hi]
                out[served >= 0] = self._old_stats[served[served >= 0]]
            if self._learned is not None:
                mine = self._learned[lo:hi, 0] >= 0
                out[mine] = self._learned[lo:hi][mine]
            yield out
        if olds is not None:
            for _ in olds:  # the old signatures copied must pass their CRC
                pass


class _Version1:
    """A cache file of version 1 (an ``.npz`` of sorted 8-byte path keys, the paths, signatures and hashes),
    read once so that an upgrade re-reads no unchanged file: its entries are matched to the listing by path,
    like a version-2 file whose listing changed, and the scan writes version 2 and removes it."""

    def __init__(self, arrays: dict[str, np.ndarray], started_ns: int):
        self._arrays, self.entries = arrays, len(arrays["digests"])
        self.footer: dict = {"started_ns": started_ns, "listing": ""}  # never the listing's: matched by path

    @classmethod
    def load(cls, file: Path, root: Path, device: int) -> _Version1 | None:
        try:
            with np.load(file, allow_pickle=False) as z:
                a = {k: z[k] for k in ("offsets", "paths", "stats", "digests", "header")}
            header = json.loads(a["header"].tobytes())
            n = header["entries"]
            started = header["started_ns"]
            offsets, blob, stats, digests = a["offsets"], a["paths"], a["stats"], a["digests"]
            if header.get("format") != FORMAT or header.get("version") != 1 or header.get("root") != str(root) \
                    or header.get("device") != device:
                raise ValueError("not a scan cache of this folder")
            if not (isinstance(n, int) and isinstance(started, int) and offsets.dtype == np.int64
                    and offsets.shape == (n + 1,) and blob.dtype == np.uint8 and blob.ndim == 1
                    and stats.dtype == np.int64 and stats.shape == (n, 5) and digests.dtype == np.uint8
                    and digests.shape == (n, 32) and offsets[0] == 0 and offsets[-1] == len(blob)
                    and not np.any(offsets[1:] < offsets[:-1])):
                raise ValueError("its arrays do not have the shapes of its header")
        except Exception as e:  # damaged or of another kind: hashed again, as before
            _log.warning("note: ignoring the scan cache %s of an earlier version (%s); hashing every file", file, e)
            return None
        keys = _path_keys(Paths(blob.tobytes(), offsets))
        return cls({"keys": keys, "stats": stats, "digests": digests}, started)

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        if out is not None:
            out[...] = self._arrays[name]
            return out
        return self._arrays[name]

    def close(self) -> None:
        pass
