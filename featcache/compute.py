"""The one path that computes rows missing from feature spaces and commits what was done.

``extract`` (the images a set needs that a space misses), ``evaluate`` and ``predict`` (a run's
images not in its store) and the re-check that restores rows a lease-blind gc removed all push
images through a backbone here. An engine computes: the one-process pipeline (:func:`run_local`
over :func:`featcache.pipeline.run_backbone`) or Ray Data (:func:`featcache.ray_engine.run_model`);
both plug into :func:`compute` through one seam (:class:`Engine`). Rows go through
:class:`Writers`: new segments per space, committed every ``checkpoint_s`` seconds and at the end;
after a failure or Ctrl-C the finished rows are committed too (marked ``partial``), so a re-run
resumes instead of starting over, and nothing committed before is touched. What goes wrong with
the storage meanwhile becomes one :class:`StoreError` here (:func:`storage_errors`,
:func:`remote_failures`), never a storage library's traceback.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Protocol

import numpy as np

from .backbones import Backbone, Joint
from .choices import default_store_url
from .config import ExtractConfig
from .data import Item, Manifest
from .errors import DataError, FeatcacheError, StoreError
from .keys import row_key
from .pipeline import MAX_CAST_ERROR, cast_error, checked, finite_rows, run_backbone
from .store import Store, is_read_only
from .store.rowindex import RowIndex
from .store.spacekeys import SpaceKeys

__all__ = ["Engine", "Interrupted", "Writer", "Writers", "commit_partial", "compute", "first_line", "held_among", "local_engine",
           "read_only_error", "remote_failures", "restore_missing", "run_local", "storage_error", "storage_errors"]


class Interrupted(FeatcacheError, KeyboardInterrupt):
    """Ctrl-C during extract; what was computed is committed."""


class Writer(threading.Thread):
    """Compresses and writes in the background so the model never waits on storage.

    Every ``checkpoint_s`` seconds the current segment is committed and a new one started,
    so a killed run loses at most that much work.
    """

    def __init__(self, store: Store, space: str, total: int, shape: tuple[int, ...], dtype: str, checkpoint_s: float):
        super().__init__(daemon=True)
        self.store, self.space, self.remaining = store, space, total
        self.shape, self.dtype, self.checkpoint_s = shape, dtype, checkpoint_s
        self.segment = None
        self.started = 0.0
        self.queue: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.busy = 0.0
        self.committed_rows = 0

    def _append(self, features: np.ndarray, hashes: list[str]) -> None:
        if self.segment is None:
            self.segment = self.store.new_segment(self.space, self.remaining, self.shape, self.dtype)
            self.started = time.monotonic()
        self.segment.append(features, hashes)
        self.remaining -= len(hashes)
        if time.monotonic() - self.started >= self.checkpoint_s:
            self._commit()

    def _commit(self, **attrs) -> None:
        if self.segment is not None:
            self.committed_rows += self.segment.commit(**attrs)
            self.segment = None

    def run(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is None:
                t = time.perf_counter()
                try:
                    self._append(*job)
                except BaseException as e:  # re-raised in the main thread by close()
                    self.error = e
                self.busy += time.perf_counter() - t

    def put(self, features: np.ndarray, hashes: list[str]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((features, hashes))

    def close(self, **attrs) -> None:
        """Drain the queue and commit what is left (also after an error or Ctrl-C)."""
        self.queue.put(None)
        self.join()
        if self.error is not None:
            raise self.error
        self._commit(**attrs)


def commit_partial(writer: Writer) -> None:
    """Keep the rows finished before an error or Ctrl-C; they are valid and save a re-run."""
    with contextlib.suppress(BaseException):  # the original error matters more; the segment stays uncommitted
        writer.close(partial=True)


class Writers:
    """One background :class:`Writer` per space (none where ``spaces[p]`` is None or there is no store).

    As a context manager: on success every writer is closed (its last segment committed, the first
    error raised); after an error or Ctrl-C, and for the writers after one whose close failed, the
    rows finished so far are committed as ``partial`` (:func:`commit_partial`) and the error goes on.
    """

    def __init__(self, store: Store | None, spaces: Sequence[str | None], totals: Sequence[int],
                 shapes: Sequence[tuple[int, ...]], dtype: str, checkpoint_s: float):
        self.writers: list[Writer | None] = [
            Writer(store, space, total, tuple(shape), dtype, checkpoint_s) if store is not None and space else None
            for space, total, shape in zip(spaces, totals, shapes)]

    def __enter__(self) -> Writers:
        for w in self._live:
            w.start()
        return self

    @property
    def _live(self) -> list[Writer]:
        return [w for w in self.writers if w is not None]

    def put(self, part: int, features: np.ndarray, keys: list[str]) -> None:
        """Rows of part ``part`` under their row keys (nothing where that part has no writer)."""
        writer = self.writers[part]
        if writer is not None:
            writer.put(features, keys)

    @property
    def busy(self) -> float:
        """Seconds the writers spent compressing and writing (alongside the model)."""
        return sum(w.busy for w in self._live)

    @property
    def committed_rows(self) -> int:
        return sum(w.committed_rows for w in self._live)

    def __exit__(self, exc_type, exc, tb) -> bool:
        live = self._live
        closed = 0
        try:
            if exc_type is None:
                for writer in live:
                    writer.close()
                    closed += 1
        finally:
            for writer in live[closed:]:
                commit_partial(writer)
        return False


def run_local(joint: Backbone | Joint, root: Path, items: Sequence, keys: list[str], writers: Writers,
              have: Sequence[AbstractSet[str]], *, dtype: str, device: str = "auto", precision: str = "auto",
              batch_size: int = 64, workers: int | None = None, compile: bool = False, progress: bool = False,
              desc: str = "extract", views: list[int] | None = None, augment: dict | None = None,
              strict: bool = False, skip_bad_rows: bool = False,
              on_rows: Callable[[list[int], np.ndarray], None] | None = None,
              timings: dict[str, float] | None = None) -> dict[int, str]:
    """The one-process engine: push ``items`` (``.path`` under ``root``, ``.sha256``) through ``joint`` once;
    each part's rows (in ``dtype``) go to its writer under ``keys``, except those its space holds (``have``).

    Returns the reasons of items that failed, by position. An image that cannot be decoded is such a
    failure (with ``strict``, a :class:`DataError`). A non-finite row, or one the cast to ``dtype`` loses,
    refuses its batch with a :class:`DataError` (nothing of it is stored); with ``skip_bad_rows`` it is a
    failure of that item instead, and ``on_rows(positions, rows)`` gets the other rows of a one-part
    ``joint``. ``timings`` accumulates ``read`` and ``model`` seconds (the checks count as model time).
    """
    parts = joint.parts if isinstance(joint, Joint) else (joint,)
    spent = timings if timings is not None else {}
    failed: dict[int, str] = {}
    batches = run_backbone(joint, root, items, device=device, precision=precision, batch_size=batch_size,
                           workers=workers, compile=compile, progress=progress, desc=desc, views=views,
                           augment=augment, timings=spent)
    with contextlib.closing(batches):
        for b in batches:
            for i, reason in b.failed:
                if strict:
                    raise DataError(f"{items[i].path}: {reason} (--strict). Remove the file or drop --strict.")
                failed[i] = reason
            if b.features is None:
                continue
            t = time.perf_counter()
            outs = b.features if isinstance(b.features, list) else [b.features]
            for p, (part, out, held) in enumerate(zip(parts, outs, have)):
                if skip_bad_rows:
                    _put_good_rows(out, b.indices, keys, held, dtype, p, writers, failed, on_rows)
                    continue
                rows = [j for j, i in enumerate(b.indices) if keys[i] not in held]
                if rows:
                    out = out if len(rows) == len(b.indices) else out[rows]
                    feats = checked(out, dtype, part, [items[b.indices[j]] for j in rows])
                    writers.put(p, feats, [keys[b.indices[j]] for j in rows])
            spent["model"] = spent.get("model", 0.0) + time.perf_counter() - t
    return failed


def _put_good_rows(out: np.ndarray, indices: list[int], keys: list[str], held: AbstractSet[str], dtype: str, part: int,
                   writers: Writers, failed: dict[int, str], on_rows) -> None:
    """A batch's rows in ``dtype``; a row that is not finite, or that the cast loses, is a failure of its item."""
    rows = out.astype(dtype)
    ok = finite_rows(rows)
    lost = ok & (cast_error(out, rows) > MAX_CAST_ERROR)  # underflow: the cast lost the row
    ok &= ~lost
    for j in np.asarray(indices)[~ok].tolist():
        failed[j] = f"the backbone gave non-finite features (NaN or inf, or beyond {dtype})"
    for j in np.asarray(indices)[lost].tolist():
        failed[j] = f"the backbone's features underflow {dtype} (values lost in the cast)"
    good = np.asarray(indices)[ok].tolist()
    rows = rows[ok]
    new = [k for k, j in enumerate(good) if keys[j] not in held]
    if new:
        writers.put(part, rows if len(new) == len(good) else rows[new], [keys[good[k]] for k in new])
    if on_rows is not None:
        on_rows(good, rows)


def held_among(held: AbstractSet[str], keys: list[str]) -> set[str]:
    """Those of ``keys`` that ``held`` holds, as a plain set the size of the work: a space's row index answers
    for all of them in one sorted search, and the engines then ask per row without touching it."""
    found = held.contains(keys) if isinstance(held, (RowIndex, SpaceKeys)) else [k in held for k in keys]
    return {k for k, f in zip(keys, found) if f}


class Engine(Protocol):
    """What computes rows: ``todo`` (with ``views``, a view number each, for augmented views) through ``joint``
    into new committed segments of each part's space, except the rows that space holds (``have``, by row key).
    Returns the reasons of images that failed to decode (by content hash) and seconds spent per stage.
    Planning, keys and the set record stay with the caller; ``local`` is :func:`local_engine`, ``ray`` is
    :func:`featcache.ray_engine.run_model`."""

    def __call__(self, joint: Joint, root: Path, todo: list[Item], store: Store, spaces: list[str],
                 have: Sequence[AbstractSet[str]], cfg: ExtractConfig, progress: bool, views: list[int] | None = None,
                 augment: dict | None = None) -> tuple[dict[str, str], dict[str, float]]: ...


def local_engine(joint: Joint, root: Path, todo: list[Item], store: Store, spaces: list[str],
                 have: Sequence[AbstractSet[str]], cfg: ExtractConfig, progress: bool, views: list[int] | None = None,
                 augment: dict | None = None) -> tuple[dict[str, str], dict[str, float]]:
    """The one-process pipeline as an :class:`Engine`: each part's rows into new segments of its space (one per
    checkpoint)."""
    keys = [row_key(it.sha256, views[i] if views else None) for i, it in enumerate(todo)]
    have = [held_among(held, keys) for held in have]
    timings = {"read": 0.0, "model": 0.0}
    totals = [sum(k not in held for k in keys) for held in have]
    with Writers(store, spaces, totals, [part.shape for part in joint.parts], cfg.dtype, cfg.checkpoint_s) as writers:
        failed = run_local(joint, root, todo, keys, writers, have, dtype=cfg.dtype, device=cfg.device,
                           precision=cfg.precision, batch_size=cfg.batch_size, workers=cfg.workers, compile=cfg.compile,
                           progress=progress, desc="views" if views is not None else "extract", views=views,
                           augment=augment, strict=cfg.strict, timings=timings)
    timings["write"] = writers.busy
    return {todo[i].sha256: reason for i, reason in failed.items()}, timings


def compute(engine: Engine, joint: Joint, root: Path, jobs: list[tuple[Item, int | None]], store: Store,
            spaces: list[str], have: Sequence[AbstractSet[str]], cfg: ExtractConfig, progress: bool,
            augment: dict | None = None) -> tuple[dict[str, str], dict[str, float]]:
    """Rows for ``jobs`` (an image, and a view number or None) into new segments of each part's space, for the
    parts whose space does not hold them yet (``have``), by ``engine``. Returns the reasons of images that
    failed (by content hash) and seconds per stage; a failed write is a :class:`StoreError`, Ctrl-C
    :class:`Interrupted`, and what was finished is committed either way."""
    if not jobs:
        return {}, {}
    views = [k for _, k in jobs] if augment is not None else None
    with storage_errors(cfg.store):
        return engine(joint, root, [it for it, _ in jobs], store, spaces, have, cfg, progress, views, augment)


def restore_missing(engine: Engine, joint: Joint, root: Path, kept: Manifest, store: Store, space: str,
                    view_space: str | None, augment: dict | None, cfg: ExtractConfig, progress: bool) -> None:
    """Recompute the rows of ``kept`` that are no longer in the store (a few tries, then an error). Only the
    images whose rows are gone become :class:`Item` objects."""
    distinct = kept.first_of_each()
    digests = kept.digests if len(distinct) == len(kept) else kept.digests[distinct]  # no copy when all differ
    train = kept.first_of_each(np.flatnonzero(kept.in_split("train"))) if view_space else distinct[:0]
    rows = np.repeat(train, cfg.views) if view_space else train
    views = np.tile(np.arange(cfg.views, dtype=np.int32), len(train)) if view_space else np.zeros(0, np.int32)
    for _ in range(3):
        store.refresh_index()  # segments removed meanwhile rebuild it; added ones (ours) extend it
        known = store.known_hashes(space)
        held = known.contains_digests(digests)
        jobs: list[tuple[Item, int | None]] = [(it, None) for it in kept.items_at(distinct[~held])]
        view_jobs: list[tuple[Item, int | None]] = []
        known_views: AbstractSet[str] = set()
        if view_space:
            index = store.known_hashes(view_space)
            known_views = index
            held = index.contains_digests(kept.digests[rows], views)
            view_jobs = [(kept.item(i), k) for i, k in zip(rows[~held].tolist(), views[~held].tolist())]
        del held
        if not jobs and not view_jobs:
            return
        failed, _ = compute(engine, joint, root, jobs, store, [space], [known], cfg, progress)
        compute(engine, joint, root, view_jobs, store, [view_space], [known_views], cfg, progress, augment)
        if failed:
            raise DataError(f"{len(failed)} image(s) whose rows vanished from the store during this run cannot be "
                            f"read any more (first: {next(iter(failed.values()))}); re-run the command")
    raise StoreError(f"rows of this set keep vanishing from {cfg.store} (a gc that ignores leases?); "
                     "re-run the command")


# ---------------------------------------------------------------- the error-mapping boundary


def first_line(e: BaseException) -> str:
    """The first sentence of an error: what went wrong, without the fix meant for another command."""
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else e.__class__.__name__


def read_only_error(url: str, why: str, need: str) -> StoreError:
    return StoreError(f"the store at {url} is read-only: {need} ({why}). Nothing was written; ask for write access, or "
                      "extract into a store of your own (--store)")


def storage_error(e: OSError, url: str, need: str = "this extract must write to it") -> StoreError:
    """A write that failed (disk full, permissions, network) as a clear error; committed data is untouched."""
    if is_read_only(e):
        return read_only_error(url, f"{e.strerror or e.__class__.__name__}", need)
    what = "no space left on the device" if e.errno == errno.ENOSPC else f"{e.__class__.__name__}: {e.strerror or e}"
    return StoreError(
        f"writing to {url} failed ({what}). Everything committed before is intact; fix the cause and re-run "
        "the same command to resume (featcache gc removes the unfinished leftovers)."
    )


@contextlib.contextmanager
def storage_errors(url: str, need: str = "this extract must write to it", *,
                   optional: str | None = None) -> Iterator[None]:
    """Around work that writes to the store at ``url``: a failed write is one :class:`StoreError` (committed data
    is intact) and Ctrl-C is :class:`Interrupted` (what was finished is committed). ``optional``: the writes are
    an extra the caller can go without (evaluate, predict); the error then names that fix, and Ctrl-C goes on
    as it is."""
    try:
        yield
    except KeyboardInterrupt:
        if optional is not None:
            raise
        raise Interrupted("finished batches are committed. Re-run the same command to resume.") from None
    except OSError as e:
        if optional is not None:
            raise StoreError(f"writing to {url} failed ({first_line(e)}); {optional}") from None
        raise storage_error(e, url, need) from None


_REMOTE_LIBRARIES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "azure", "google", "requests",
                     "urllib3")


def remote_failures(fn):
    """A remote store that stops answering mid-run (an endpoint gone, a network down) is one
    :class:`StoreError` saying what is kept, not the storage library's traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if isinstance(e, FeatcacheError) or not any(t.__module__.split(".")[0] in _REMOTE_LIBRARIES
                                                       for t in type(e).__mro__):
                raise
            cfg = args[0] if args else kwargs.get("config")
            url = cfg.store if isinstance(cfg, ExtractConfig) else kwargs.get("store") or default_store_url()
            text = " ".join(str(e).split())[:300]
            raise StoreError(f"the store {url} stopped answering ({type(e).__name__}: {text}). Batches finished "
                             "before that are committed and kept; re-run the same command when the store is back "
                             "to resume (it reuses them)") from None
    return wrapper
