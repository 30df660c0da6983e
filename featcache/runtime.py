"""Process settings that decide how fast a CPU runs a frozen network.

glibc gives every allocation above its mmap threshold (128 KiB to start, 32 MiB at most) its
own fresh pages and returns freed memory at the top of the heap to the system. A CNN forward
allocates and frees activation buffers of tens of MB at every layer, so each batch faults all
of them in again, page by page: on efficientnet_lite0 about 30,000 minor faults per image,
more than half of the forward's CPU time spent in the kernel (benchmarks/README.md, "Peers").

:func:`keep_memory` sets both thresholds (``mallopt``) so freed buffers stay in the process
and are reused: after the first batch nothing is faulted again. It takes effect at once, in
this process and in every process forked from it later (DataLoader workers), with no re-exec
and no environment variable. Memory stays bounded by the largest working set (the peak is
the same; it is only not given back to the system until the process ends). On a C library
without ``mallopt`` (musl, macOS) nothing changes. ``FEATCACHE_KEEP_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import resource
import signal
import sys
import threading
import time

__all__ = ["keep_memory", "memory_kept", "release_memory", "peak_rss_mb", "minor_faults", "die_with_parent"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1
_state: dict[str, bool] = {}


def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name or "libc.so.6")
        lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.mallopt.restype = ctypes.c_int
        return lib
    except (OSError, AttributeError):  # no glibc: nothing to set
        return None


def keep_memory() -> bool:
    """Keep freed memory in the process (glibc); True when the setting is in effect. Idempotent."""
    if "kept" in _state:
        return _state["kept"]
    kept = False
    if os.environ.get("FEATCACHE_KEEP_MEMORY", "1") != "0":
        lib = _libc()
        if lib is not None:
            # the largest threshold the C library accepts: older glibc caps it at 32 MiB
            mmap = any(lib.mallopt(_M_MMAP_THRESHOLD, v) == 1 for v in (_INT_MAX, 32 << 20))
            trim = lib.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
            kept = mmap and trim
    _state["kept"] = kept
    return kept


def release_memory() -> None:
    """Give the memory freed so far back to the system (glibc's ``malloc_trim``), unless :func:`keep_memory`
    keeps it on purpose. For a step that has just let go of large structures built of many pieces (a
    folder's listing, a scan cache, a row index): glibc otherwise keeps the freed pieces, which the next
    structure, of other sizes, does not fit into, and the process's peak grows by the sum of both."""
    if memory_kept():
        return
    lib = _libc()
    if lib is not None and hasattr(lib, "malloc_trim"):
        lib.malloc_trim(0)


def memory_kept() -> bool:
    """Whether :func:`keep_memory` has taken effect in this process."""
    return _state.get("kept", False)


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident memory of this process (or the largest of its finished children), MiB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def die_with_parent(parent: int) -> None:
    """In a forked helper process: end it when ``parent`` ends, however it ends (SIGKILL included), so
    nothing is left blocked on a pipe nobody reads or busy for nobody. The kernel's parent-death signal
    on Linux, and a watchdog on the parent's pid everywhere (it also covers a parent gone before)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="featcache-parent-watch").start()
