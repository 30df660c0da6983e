"""``extract --engine ray``: the same rows, computed on a Ray cluster that survives lost workers.

The driver lists the folder, plans and leases as a one-process extract does (featcache's manifest,
its row keys, its lease); the cluster does the reading. What runs on the workers is in
:mod:`featcache.ray_stages`:

* hashing: the files the scan cache does not serve go to tasks in blocks of a few thousand paths
  (:mod:`featcache.ray_hash`, passed to :func:`featcache.data.scan`), never one task per file;
* one dataset row per planned batch (batch ``j`` holds the images a one-process run puts in batch
  ``j``); CPU tasks read each file, check its bytes against the SHA-256 it was planned under and
  decode them with featcache's own reader;
* an autoscaling pool of actors runs the frozen network, built inside each actor from the same
  backbone spec (and its weights checked against the driver's digest), on GPUs when asked;
* write tasks, each committing one segment per feature space through featcache's store
  (integrity record, commit marker last). The driver cuts the segments as the one-process
  engine's writer does: a segment is committed ``checkpoint_s`` seconds after its first batch
  came out of the model, or at :data:`SEGMENT_IMAGES` images, whichever is first, and after
  Ctrl-C or SIGTERM the finished batches are committed before the command ends.

Rows never depend on the layout: batches keep their one-process composition, and a batch under
16 images runs on at least two threads, where PyTorch takes the kernels a multi-threaded
one-process run takes (see :mod:`featcache.procs`). The store is the checkpoint: a retried batch
or write only adds rows that readers already resolve (the oldest segment holding a key wins), a
write task killed before its marker leaves an uncommitted segment that readers ignore and gc
removes, and a killed driver is resumed by running the same command again (it loses at most the
batches of its last ``checkpoint_s`` seconds, as a killed one-process extract does).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

from .errors import FeatcacheError

__all__ = ["SEGMENT_IMAGES", "connect", "import_ray", "run_model"]

SEGMENT_IMAGES = 4096  # the most images in one committed segment (rounded to whole batches)
WRITE_RETRIES = 3  # a write task whose worker or node is lost runs again this many times (then its batches do)
_ROUNDS = 3  # runs of the batches still missing after Ray lost writes or model outputs it could not rebuild
_log = logging.getLogger("featcache.extract")


def import_ray():
    """``ray`` and ``ray.data``, or one clear error naming the extra to install."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise FeatcacheError("--engine ray needs Ray Data: pip install 'featcache[ray]'", param="engine") from None
    return ray


def connect(address: str | None = None) -> Any:
    """Join the cluster at ``address`` (else ``$RAY_ADDRESS``, else one started on this machine by ``ray start``),
    or, with none of them or ``address="local"``, start a private instance whose every process listens on
    127.0.0.1 only. A Ray already initialised in this process (by the caller) is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or _started_here(ray) or "local"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main = threading.current_thread() is threading.main_thread()
    term = signal.getsignal(signal.SIGTERM) if main else None
    try:
        if address != "local":
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:
            _init_private(ray)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        where = "a local instance" if address == "local" else address
        raise FeatcacheError(f"cannot connect to Ray at {where}: {first}", param="ray_address") from None
    if main and callable(term):  # ray.init makes SIGTERM exit at once; the command's own handler (its clean-up) stays
        signal.signal(signal.SIGTERM, term)
    _messages_to_stderr(ray)
    return ray


def _started_here(ray) -> str | None:
    """The address of the cluster the last ``ray start`` on this machine started (Ray's own record), if any."""
    try:
        return ray._private.services.find_bootstrap_address(None) or None
    except Exception:  # a Ray without that record: start a private instance
        return None


def _init_private(ray) -> None:
    """A private instance: nobody else needs to reach it, so every process of it (GCS, raylet, agents, workers)
    listens on 127.0.0.1 only. Given the loopback address alone, Ray still opens its servers on every interface
    and its agents on this machine's address; in its single-machine mode (Ray's own for macOS and Windows) it
    binds them all to loopback."""
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    cluster = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if cluster is not None:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
    finally:
        if cluster is not None:
            constants.ENABLE_RAY_CLUSTER = cluster


def _messages_to_stderr(ray) -> None:
    """What the cluster reports (a lost actor, a retried task) Ray prints on standard output, whenever it
    arrives; in a Ray this process started for featcache it goes to standard error, so standard output
    stays the command's own (``extract --json``)."""
    worker = getattr(getattr(ray, "_private", None), "worker", None)
    show = getattr(worker, "print_to_stdstream", None)
    if show is None or getattr(show, "to_stderr", False):
        return

    def to_stderr(data, *args, **kwargs):
        return show({**data, "is_err": True}, *args, **kwargs)

    to_stderr.to_stderr = True
    worker.print_to_stdstream = to_stderr


class _Segments:
    """The driver's side of writing: model outputs (Ray object references, no rows pass through the driver) are
    gathered and handed to a write task as one segment when the first of them is ``checkpoint_s`` seconds old or
    they hold ``per_write`` batches, as the one-process writer commits every ``checkpoint_s`` seconds."""

    def __init__(self, ray, args: tuple, checkpoint_s: float, per_write: int, most_writes: int):
        from .ray_stages import write_segment

        self.ray, self.args = ray, args
        self.checkpoint_s, self.per_write, self.most = checkpoint_s, per_write, most_writes
        self.task = ray.remote(write_segment).options(num_cpus=0.5, max_retries=WRITE_RETRIES)
        self.refs: list = []
        self.pieces: list = []
        self.batches = 0
        self.since = 0.0
        self.writes: list = []
        self.returns: list[dict] = []
        self.lost = False

    def add(self, bundle) -> None:
        """One output bundle of the model stage; a segment goes to a write task when it is due."""
        for entry, piece in zip(bundle.blocks, getattr(bundle, "slices", None) or [None] * len(bundle.blocks)):
            ref = entry.ref if hasattr(entry, "ref") else entry[0]
            self.refs.append(ref)
            self.pieces.append(None if piece is None else (piece.start_offset, piece.end_offset))
        if not self.batches:
            self.since = time.monotonic()
        self.batches += bundle.num_rows()
        if self.batches >= self.per_write or time.monotonic() - self.since >= self.checkpoint_s:
            self.cut()
        while len(self.writes) > self.most:  # back-pressure: the model stage waits while writes are behind
            self._collect(1)

    def cut(self) -> None:
        if self.refs:
            self.writes.append(self.task.remote(*self.args, self.pieces, *self.refs))
        self.refs, self.pieces, self.batches = [], [], 0

    def _collect(self, n: int) -> None:
        done, self.writes = self.ray.wait(self.writes, num_returns=n)
        for ref in done:
            try:
                self.returns.append(self.ray.get(ref))
            except Exception as e:
                if not _lost(e):
                    raise
                self.lost = True  # its batches run again in the next round

    def finish(self) -> None:
        """Commit what is gathered and wait for every write."""
        self.cut()
        if self.writes:
            self._collect(len(self.writes))



def run_model(joint, root: Path, todo: Sequence, store, spaces: list[str], have: Sequence[AbstractSet[str]], cfg,
              progress: bool, views: list[int] | None = None,
              augment: dict | None = None) -> tuple[dict[str, str], dict[str, float]]:
    """The Ray engine behind :func:`featcache.compute.compute`: rows of ``todo`` into new segments of each
    part's space (those ``have`` misses), committed by write tasks; returns failures by content hash and
    seconds summed over the cluster (``decode``, ``forward``, ``write``) and the model actors seen."""
    from .backbones import resolve_precision
    from .backbones.factory import PYTHON
    from .compute import held_among
    from .keys import row_key
    from .pipeline import resolve_device

    ray = connect(cfg.ray_address)
    from ray.data import ActorPoolStrategy, DataContext

    from .ray_stages import Forward, decode

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = bool(progress)
    ctx.print_on_execution_start = False
    if hasattr(ctx, "enable_operator_progress_bars"):
        ctx.enable_operator_progress_bars = bool(progress)

    bs = cfg.batch_size
    keys = [row_key(it.sha256, views[i] if views else None) for i, it in enumerate(todo)]
    batches = [range(j * bs, min(len(todo), (j + 1) * bs)) for j in range(-(-len(todo) // bs))]

    several = len(joint.parts) > 1
    layer = tuple(p.layer for p in joint.parts) if several else None if cfg.layer is None else joint.parts[0].layer
    # The precision the driver resolved is the one the space records: the actors compute at it, wherever they run.
    spec = {"backbone": cfg.backbone, "layer": layer, "several": several, "weights": cfg.weights, "pool": cfg.pool,
            "digests": [p.weights_sha256 for p in joint.parts],
            "provenances": [json.dumps(p.provenance(), sort_keys=True, default=str) for p in joint.parts],
            "device": cfg.device, "precision": resolve_precision(cfg.precision, resolve_device(cfg.device)),
            "gpus": cfg.ray_gpus_per_actor}
    shipped = ray.put(joint) if cfg.backbone.startswith(f"{PYTHON}:") else None

    cpus = int(ray.cluster_resources().get("CPU", 1))
    gpus = cfg.ray_gpus_per_actor or 0
    most = cfg.ray_max_actors or (max(1, int(ray.cluster_resources().get("GPU", 0) // gpus)) if gpus
                                  else max(1, cpus))
    decode_cpus = cfg.ray_decode_cpus or 1.0
    # Ray Data restarts a lost actor and re-runs its batches (max_restarts, max_task_retries: -1 by default);
    # a lost task is retried by Ray (its max_retries)
    actor_args: dict[str, Any] = {}
    if gpus:
        actor_args["num_gpus"] = gpus
        actor_args["num_cpus"] = 1
    else:
        # Decode tasks and actors share the CPUs: an actor asks for half of one, so decoding always finds room.
        actor_args["num_cpus"] = 0.5
    args = (store.url, list(spaces), [tuple(p.shape) for p in joint.parts], cfg.dtype, [p.layer for p in joint.parts])
    returns: list[dict] = []
    for attempt in range(_ROUNDS):
        # each round runs the planned batches some row of which a space still misses, each batch as planned (its
        # composition is the one-process run's); a round after the first follows a loss Ray could not repair
        held = [held_among(h, keys) for h in have]
        plans = []
        for j, span in enumerate(batches):
            need = [[keys[i] not in h for h in held] for i in span]
            if any(any(n) for n in need):
                plan = {"paths": [todo[i].path for i in span], "sha256": [todo[i].sha256 for i in span],
                        "views": [views[i] for i in span] if views else None, "keys": [keys[i] for i in span],
                        "need": need}
                plans.append({"batch": j, "plan": json.dumps(plan)})
        if not plans:
            break
        if attempt:
            _log.warning("note: Ray lost writes or model outputs (workers or nodes gone); %d batches run again",
                         len(plans))
        ds = ray.data.from_items(plans, override_num_blocks=max(1, min(len(plans), 4 * max(1, cpus))))
        ds = ds.map(decode, fn_kwargs={"root": str(root), "transform": joint.transform, "augment": augment},
                    num_cpus=decode_cpus)
        ds = ds.map_batches(Forward, batch_size=1, batch_format="numpy",
                            fn_constructor_kwargs={"spec": spec, "shipped": shipped},
                            compute=ActorPoolStrategy(min_size=most if cfg.ray_max_actors else 1, max_size=most,
                                                      max_tasks_in_flight_per_actor=2),
                            **actor_args)
        segments = _Segments(ray, args, cfg.checkpoint_s, max(1, SEGMENT_IMAGES // bs), max(2, cpus))
        lost = _stream(ds, segments)
        returns += segments.returns
        if not lost and not segments.lost:
            break
        store.forget_index()
        have = [store.known_hashes(space) for space in spaces]
    else:
        raise FeatcacheError(f"Ray lost writes or model outputs {_ROUNDS} times over (workers or nodes going away?). Every "
                             "committed segment is kept; re-run the same command to compute the rest")
    failed: dict[str, str] = {}
    errors: list[str] = []
    timings = {"decode": 0.0, "forward": 0.0, "write": 0.0}
    pids: set[int] = set()
    for r in returns:
        for h, reason in r["failed"].items():
            failed[h] = reason.split("\t", 1)[1]
        errors.extend(r["errors"])
        for k in timings:
            timings[k] += r[k]
        pids.update(r["pids"])
    timings["actors"] = float(len(pids))
    if errors:
        from .errors import DataError

        raise DataError(errors[0])
    if cfg.strict and failed:
        from .errors import DataError

        first_bad = next(r for r in returns if r["failed"])
        path, reason = next(iter(first_bad["failed"].values())).split("\t", 1)
        raise DataError(f"{path}: {reason} (--strict). Remove the file or drop --strict.")
    return failed, timings


def _stream(ds, segments: _Segments) -> bool:
    """Run the dataset, its model outputs into segments; True when it stopped because outputs were lost (a node
    gone beyond what Ray repairs), after committing those that came out."""
    bundles = ds.iter_internal_ref_bundles()
    try:
        try:
            for bundle in bundles:
                segments.add(bundle)
        except BaseException:
            # Ctrl-C, SIGTERM or a failure: the batches that came out of the model are committed, as the
            # one-process engine commits its finished rows, before the error goes on (it matters more)
            getattr(bundles, "close", lambda: None)()  # the model stage stops: its CPUs go to the last writes
            with contextlib.suppress(Exception):
                segments.finish()
            raise
        segments.finish()
    except (KeyboardInterrupt, FeatcacheError):
        raise
    except Exception as e:
        if _lost(e):
            return True
        # a Ray failure (workers lost beyond retries, a cluster gone): what committed stays
        raise FeatcacheError(f"the Ray run stopped: {_first_line(e)}. Every committed segment is kept; "
                             "re-run the same command to compute the rest") from None
    return False


def _lost(e: BaseException | None) -> bool:
    """Whether ``e`` (or what caused it) is Ray losing objects or the node or worker holding them."""
    import ray.exceptions as rex

    kinds = (rex.ObjectLostError, rex.NodeDiedError, rex.WorkerCrashedError)
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, kinds):
            return True
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
        seen += 1
    return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else e.__class__.__name__
