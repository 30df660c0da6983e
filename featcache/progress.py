"""Progress bars that move per image, while whole batches go through the model.

Rows are computed a batch at a time, so a bar updated per batch stands still for seconds on a
CPU (64 images of efficientnet_lite0 on 2 cores: about 3 s). Here each process that decodes
or runs a batch keeps a count in shared memory (one slot per process, no lock: one writer
each): decoding a file adds its share, and so does each module of the network as it finishes
(forward hooks on the leaf modules), so that a batch of ``b`` files has added exactly ``b``
when its rows are out. The share of decoding is the measured share of the previous batch's
time. A thread of the main process polls the slots and moves the bar. Nothing here changes a
row: the hooks only count.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from typing import Any

__all__ = ["Progress", "progress_bar"]


class _NoBar:
    n = 0

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool, desc: str = "extract"):
    """A tqdm bar with images/s, or one that shows nothing."""
    if not enabled or total == 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True, smoothing=0.1)


class _NoSlot:
    """The slot of a bar that is off: counts nothing."""

    def start(self, size: float) -> None:
        pass

    def decoded(self) -> None:
        pass

    def module_done(self) -> None:
        pass

    def hand_over(self) -> float:
        return 0.0

    def finish(self) -> None:
        pass


class _Slot:
    """One process's count of finished files, fractions included (written by that process only)."""

    def __init__(self, counts, index: int, decoding: bool, modules: int):
        self.counts, self.index = counts, index
        self.base = counts[index]
        self.size = 0.0
        self.decode_share = 0.25 if decoding else 0.0  # until a batch has been timed
        self.calls = 0  # leaf modules finished in this batch
        self.calls_per_batch = modules  # a guess until a batch has been counted
        self.learnt = False
        self.t0 = self.t1 = 0.0

    def start(self, size: float) -> None:
        """A batch of ``size`` files (a fraction for one whose decoding another process counted)."""
        self.base, self.size, self.calls = self.counts[self.index], size, 0
        self.t0 = self.t1 = time.perf_counter()

    def decoded(self) -> None:
        self._set(self.counts[self.index] + self.decode_share)
        self.t1 = time.perf_counter()

    def module_done(self) -> None:
        self.calls += 1
        if self.calls_per_batch:
            step = self.size * (1 - self.decode_share) / self.calls_per_batch
            self._set(self.counts[self.index] + step)

    def _set(self, value: float) -> None:
        self.counts[self.index] = min(value, self.base + self.size - 0.01)  # whole only when the rows are out

    def hand_over(self) -> float:
        """The batch goes to another process for its forward: what is left of it to count there."""
        return self.base + self.size - self.counts[self.index]

    def finish(self) -> None:
        t2 = time.perf_counter()
        if self.t1 > self.t0 and t2 > self.t0:
            self.decode_share = min(0.9, (self.t1 - self.t0) / (t2 - self.t0))
        if not self.learnt and self.calls:
            self.calls_per_batch, self.learnt = self.calls, True
        self.counts[self.index] = self.base + self.size


class Progress:
    """Per-file progress of ``slots`` processes (the main process's slot is the last) shown on ``bar``.

    Use :meth:`watch` on the model before the forked processes start, :meth:`slot` in each process,
    and :meth:`close` at the end (it stops the polling thread and removes the hooks)."""

    def __init__(self, bar, slots: int):
        self.bar = bar
        self.enabled = not isinstance(bar, _NoBar)
        self.counts = mp.get_context("fork").RawArray("d", slots) if self.enabled and slots > 1 else [0.0] * max(slots, 1)
        self.slots = slots
        self.current: _Slot | _NoSlot = _NoSlot()  # this process's slot (set again in each forked process)
        self._hooks: list[Any] = []
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        if self.enabled:
            self._poller = threading.Thread(target=self._poll, daemon=True, name="featcache-progress")
            self._poller.start()

    def watch(self, model) -> None:
        """Count the leaf modules of ``model`` as they finish (nothing is counted with the bar off)."""
        if not self.enabled:
            return
        for m in model.modules():
            if next(m.children(), None) is None:
                self._hooks.append(m.register_forward_hook(self._module_done))

    def _module_done(self, *_) -> None:
        self.current.module_done()

    def slot(self, index: int, decoding: bool) -> _Slot | _NoSlot:
        """This process's slot (one that counts nothing with the bar off); ``decoding``: whether it decodes its files."""
        self.current = _Slot(self.counts, index, decoding, len(self._hooks)) if self.enabled else _NoSlot()
        return self.current

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            self._show()

    def _show(self) -> None:
        done = int(sum(self.counts[i] for i in range(self.slots)) + 1e-6)
        if done > self.bar.n:
            self.bar.update(min(done, self.bar.total) - self.bar.n)

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
            self._show()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.bar.close()
