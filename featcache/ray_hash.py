"""Hashing over Ray for ``extract --engine ray``: the driver lists the folder and keeps the scan cache
(:func:`featcache.data.scan`); the files the cache does not serve go to Ray tasks a block of
:data:`HASH_BLOCK` paths each (never one task per file), and the driver plans with what they return.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .ray_engine import _first_line, connect

__all__ = ["HASH_BLOCK", "RayHasher", "hash_block", "hasher"]

HASH_BLOCK = 2048  # files per hashing task; fewer files than this are hashed on the driver
_HASH_THREADS = 8  # files one task reads at once (reads wait on storage more than on the CPU)
_log = logging.getLogger("featcache.extract")


def hash_block(paths: list[str]) -> tuple[int, list]:
    """(this process id, for each file what the scan's hashing gives: (hex SHA-256, size, stat signature or None),
    or None where reading it failed (the driver reads that one again, for its own error))."""
    from .data.manifest import _hash_signed

    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        found = list(pool.map(_hash_signed, [Path(p) for p in paths]))
    return os.getpid(), [None if isinstance(r, OSError) else r for r in found]


class RayHasher:
    """A :data:`featcache.data.manifest.Hasher` that hashes on the Ray cluster at ``address``: the paths go to
    tasks in blocks of :data:`HASH_BLOCK` (fewer are hashed here, without starting Ray); the results come back in
    order. A file a task could not read is read here again, for this machine's own error; a block whose task
    failed beyond Ray's retries is hashed here. A task's stat signature is trusted for the scan cache only when
    this machine's ``stat`` sees the same file (size, times, inode): the cache then serves it on the next scan.
    ``tasks`` and ``processes`` say how the last call's work was spread."""

    def __init__(self, address: str | None = None, block: int | None = None):
        self.address, self.block = address, block
        self.tasks = 0
        self.processes: set[int] = set()

    def __call__(self, paths: list[Path]) -> list:
        from .data.manifest import _hash_signed, _hash_threads

        block = self.block or HASH_BLOCK
        self.tasks, self.processes = 0, set()
        if len(paths) < block:
            return _hash_threads(paths)
        ray = connect(self.address)
        task = ray.remote(hash_block).options(num_cpus=1)  # a lost worker's task runs again (Ray's max_retries)
        starts = list(range(0, len(paths), block))
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        _log.info("hashing %d files on Ray (%d tasks of up to %d)", len(paths), len(starts), block)
        pending: dict[int, Any] = {}
        out: list = [None] * len(paths)
        ahead = iter(starts)
        for start in ahead:  # at most `window` blocks in flight, so the driver's paths are sent as they are needed
            pending[start] = task.remote([str(p) for p in paths[start:start + block]])
            while len(pending) >= window or (pending and start == starts[-1]):
                done, _ = ray.wait(list(pending.values()), num_returns=1)
                first = next(k for k, ref in pending.items() if ref == done[0])
                ref = pending.pop(first)
                chunk = paths[first:first + block]
                try:
                    pid, found = ray.get(ref)
                    self.tasks += 1
                    self.processes.add(pid)
                except Exception as e:  # a block beyond Ray's retries: read here
                    _log.warning("note: a hashing task failed (%s); its %d files are hashed here", _first_line(e),
                                 len(chunk))
                    found = [None] * len(chunk)
                out[first:first + len(chunk)] = found
        with ThreadPoolExecutor(_HASH_THREADS) as pool:
            return list(pool.map(_here, paths, out, [_hash_signed] * len(paths)))


def hasher(address: str | None = None) -> RayHasher:
    """What ``extract --engine ray`` passes to :func:`featcache.data.scan` (``hasher=``)."""
    return RayHasher(address)


def _here(path: Path, found, hash_signed):
    """A task's result for ``path`` as the scan cache needs it: its signature as this machine sees the file."""
    if found is None:
        return hash_signed(path)
    from .data.scancache import signature

    hexdigest, size, theirs = found
    if theirs is None:
        return hexdigest, size, None
    try:
        mine = signature(os.stat(path))
    except OSError:
        return hexdigest, size, None
    return hexdigest, size, mine if tuple(mine[:4]) == tuple(theirs[:4]) else None  # the device is the mount's
