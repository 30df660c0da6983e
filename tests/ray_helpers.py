"""Faults for the Ray engine's tests, done for real inside the Ray worker processes.

Every worker of the test cluster finds ``$FEATCACHE_RAY_TEST_DIR``; a test arms a fault by creating
a file there, and the first worker process that reaches the fault renames the file (atomic, so
exactly one process takes it) and does it:

* ``kill-forward``: a model actor SIGKILLs itself on its second batch;
* ``slow-forward``: one model actor sleeps ``SLOW_S`` per batch (a straggler);
* ``kill-commit``: a write task SIGKILLs itself after its rows are on storage, before the commit marker.

Each batch through the model appends the actor's process id to ``calls.log`` (``slow_probe_cnn``: the same,
``SLOW_S / 5`` seconds per batch).
The model is the tiny test CNN with the probe as a call in its traced graph (so the rows are those
of ``probe_cnn`` on any engine, faults or not).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from tests.tiny_backbone import TinyCNN

SLOW_S = 1.5
_calls = 0
_slow = False


def _dir() -> Path | None:
    d = os.environ.get("FEATCACHE_RAY_TEST_DIR")
    return Path(d) if d else None


def _claim(name: str) -> bool:
    """Whether this process took the armed fault ``name`` (at most one process does)."""
    d = _dir()
    if d is None:
        return False
    try:
        os.rename(d / name, d / f"{name}.taken-{os.getpid()}")
        return True
    except FileNotFoundError:
        return False


def _in_actor() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:
        return False


def _probe(x):
    global _calls, _slow
    if len(x) > 1 and _in_actor():
        _calls += 1
        d = _dir()
        if d is not None:
            with open(d / "calls.log", "a") as f:
                f.write(f"{os.getpid()}\n")
        if _calls == 1 and _claim("slow-forward"):
            _slow = True
        if _slow:
            time.sleep(SLOW_S)
        if _calls == 2 and _claim("kill-forward"):
            os.kill(os.getpid(), signal.SIGKILL)
    return x


torch.fx.wrap("_probe")  # kept as a call in the traced graph, so it runs on every batch


class ProbeCNN(TinyCNN):
    def forward(self, x):
        return super().forward(_probe(x))


def probe_cnn() -> torch.nn.Module:
    return ProbeCNN()


class SlowProbeCNN(ProbeCNN):
    """The probe CNN taking ``SLOW_S / 5`` per batch, so a test can stop an extract midway and count batches."""

    def forward(self, x):
        return super().forward(_pause(x))


def _pause(x):
    time.sleep(SLOW_S / 5)
    return x


torch.fx.wrap("_pause")


def slow_probe_cnn() -> torch.nn.Module:
    return SlowProbeCNN()


def setup_worker() -> None:
    """``worker_process_setup_hook``: a write task that takes ``kill-commit`` dies between its rows and its marker."""
    from featcache.store import segments

    commit = segments.SegmentWriter.commit

    def killed_before_marker(self, **attrs):
        if _claim("kill-commit"):
            self._flush(final=True)  # the rows are on storage ...
            os.kill(os.getpid(), signal.SIGKILL)  # ... and the marker never will be
        return commit(self, **attrs)

    segments.SegmentWriter.commit = killed_before_marker
