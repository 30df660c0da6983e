"""``extract --engine ray``: the same rows, computed on a Ray cluster that survives lost workers.

The driver scans, plans and leases as a one-process extract does (featcache's manifest, its row
keys, its lease); this module only computes the rows it is handed, through the same seam as the
one-process pipeline (:func:`featcache.compute.compute`):

* one dataset row per planned batch (batch ``j`` holds the images a one-process run puts in batch
  ``j``), never one Ray task per file;
* CPU tasks read each file, check its bytes against the SHA-256 it was planned under and decode
  them with featcache's own reader (:class:`featcache.pipeline.Images`);
* an autoscaling pool of actors runs the frozen network, built inside each actor from the same
  backbone spec (and its weights checked against the driver's digest), on GPUs when asked;
* a :class:`ray.data.Datasink` whose write tasks each commit one segment per feature space
  through featcache's store (integrity record, commit marker last).

Rows never depend on the layout: batches keep their one-process composition, and a batch under
16 images runs on at least two threads, where PyTorch takes the kernels a multi-threaded
one-process run takes (see :mod:`featcache.procs`). The store is the checkpoint: a retried batch
or write only adds rows that readers already resolve (the oldest segment holding a key wins), a
write task killed before its marker leaves an uncommitted segment that readers ignore and gc
removes, and a killed driver is resumed by running the same command again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FeatcacheError

__all__ = ["run_model", "import_ray", "connect", "SEGMENT_IMAGES"]

SEGMENT_IMAGES = 4096  # images per write task, so per committed segment (rounded to whole batches)
MIN_BATCH = 16  # procs.MIN_BATCH: below this, one thread takes other convolution kernels than several


def import_ray():
    """``ray`` and ``ray.data``, or one clear error naming the extra to install."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise FeatcacheError("--engine ray needs Ray Data: pip install 'featcache[ray]'", param="engine") from None
    return ray


def connect(address: str | None = None) -> Any:
    """Join the cluster at ``address`` (else ``$RAY_ADDRESS``), or start a local instance bound to 127.0.0.1.
    A Ray already initialised in this process (by the caller) is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:  # a private instance: nobody else needs to reach it
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                     configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        where = address or "a local instance"
        raise FeatcacheError(f"cannot connect to Ray at {where}: {first}", param="ray_address") from None
    _messages_to_stderr(ray)
    return ray


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


@dataclass(frozen=True)
class _Job:
    path: str
    sha256: str


def _decode(row: dict, root: str, transform, augment: dict | None) -> dict:
    """Ray Data ``map`` task: read, hash-check and decode one planned batch with featcache's reader."""
    from .pipeline import Images

    t = time.perf_counter()
    plan = json.loads(row["plan"])
    items = [_Job(p, h) for p, h in zip(plan["paths"], plan["sha256"])]
    views = plan["views"] if augment is not None else None
    images = Images(Path(root), items, transform, views, augment)
    ok, tensors, bad = [], [], []
    for i in range(len(items)):
        _, tensor, err = images[i]
        if err is None:
            ok.append(i)
            tensors.append(tensor.numpy())
        else:
            bad.append([i, err])
    x = np.stack(tensors).astype(np.float32, copy=False) if tensors else np.zeros((0,), np.float32)
    return {"batch": row["batch"], "plan": row["plan"], "x": x, "ok": np.asarray(ok, np.int64),
            "bad": json.dumps(bad), "decode_s": time.perf_counter() - t}


class _Forward:
    """The actor: the frozen network, built once per actor, run on one decoded batch per call."""

    def __init__(self, spec: dict, shipped=None):
        import torch

        from .backbones import Joint, create_backbone, create_joint
        from .pipeline import resolve_device
        from .runtime import keep_memory

        if shipped is not None:  # a module passed in Python: the driver's own object
            import ray

            joint = ray.get(shipped)
        elif spec["several"]:
            joint = create_joint(spec["backbone"], spec["layer"], spec["weights"], spec["pool"])
        else:
            one = create_backbone(spec["backbone"], spec["layer"], spec["weights"], spec["pool"])
            joint = Joint((one,), one.model)
        digests = [p.weights_sha256 for p in joint.parts]
        if digests != spec["digests"]:  # rows must belong to the space the driver keys them under
            raise FeatcacheError(f"the backbone built on this worker has other weights ({digests}) than the "
                                 f"driver's ({spec['digests']}); give every node the same weights file")
        built = [json.dumps(p.provenance(), sort_keys=True, default=str) for p in joint.parts]
        if shipped is None and built != spec["provenances"]:
            raise FeatcacheError(f"the backbone built on this worker is not the driver's (provenance {built} against "
                                 f"{spec['provenances']}); give every node the same featcache, torch and weights")
        gpus = spec["gpus"]
        device = "cuda" if gpus else spec["device"]
        self.dev = resolve_device(device)
        self.precision = spec["precision"]
        self.model = joint.model.to(self.dev).eval()
        if self.dev.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.threads = torch.get_num_threads()
        keep_memory()

    def __call__(self, batch: dict) -> dict:
        import torch

        from .backbones import autocast
        from .pipeline import flat

        t = time.perf_counter()
        x = batch["x"][0]
        feats = np.zeros((0,), np.float32)
        if x.ndim > 1 and len(x):
            short = self.dev.type == "cpu" and len(x) < MIN_BATCH and self.threads < 2
            if short:  # the kernels a multi-threaded one-process run takes for a short batch
                torch.set_num_threads(2)
            try:
                with torch.inference_mode(), autocast(self.precision, self.dev):
                    inputs = torch.from_numpy(np.array(x, dtype=np.float32, order="C")).to(self.dev)
                    if self.dev.type == "cuda":
                        inputs = inputs.contiguous(memory_format=torch.channels_last)
                    feats = np.ascontiguousarray(flat(self.model(inputs)), dtype=np.float32)
            finally:
                if short:
                    torch.set_num_threads(self.threads)
        return {"batch": batch["batch"], "plan": batch["plan"], "ok": batch["ok"], "bad": batch["bad"],
                "feats": _one(feats), "decode_s": batch["decode_s"],
                "forward_s": np.array([time.perf_counter() - t]), "pid": np.array([os.getpid()])}


def _one(arr: np.ndarray) -> np.ndarray:
    """A column of one row holding ``arr`` (an object array, so its shape may differ from other rows')."""
    out = np.empty(1, dtype=object)
    out[0] = arr
    return out


def _sink_class(base):
    class _SegmentSink(base):
        """Each write task commits its rows as one new segment per space (commit marker last)."""

        def __init__(self, url: str, spaces: list[str], shapes: list[tuple[int, ...]], dtype: str, layers: list,
                     checkpoint_s: float, per_write: int):
            self.url, self.spaces, self.shapes, self.dtype = url, spaces, shapes, dtype
            self.layers, self.checkpoint_s, self.per_write = layers, checkpoint_s, per_write
            self.returns: list[dict] = []

        @property
        def min_rows_per_write(self) -> int:  # rows are batches: this many batches per segment
            return self.per_write

        def write(self, blocks, ctx) -> dict:
            import pyarrow as pa

            from .compute import Writers
            from .pipeline import checked
            from .store import open_store

            t = time.perf_counter()
            rows = []
            for block in blocks:
                table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
                rows.extend(table.to_pylist())
            failed: dict[str, str] = {}
            errors: list[str] = []
            out: list[list[tuple[np.ndarray, list[str]]]] = [[] for _ in self.spaces]
            decode_s = forward_s = 0.0
            pids = set()
            for row in rows:
                plan = json.loads(row["plan"])
                keys, need = plan["keys"], plan["need"]
                for i, reason in json.loads(row["bad"]):
                    failed[plan["sha256"][i]] = f"{plan['paths'][i]}\t{reason}"
                decode_s += float(row["decode_s"])
                forward_s += float(row["forward_s"])
                pids.add(int(row["pid"]))
                ok = list(row["ok"])
                if not ok:
                    continue
                feats = _as_array(row["feats"]).reshape(len(ok), -1)
                at = 0
                for p, shape in enumerate(self.shapes):
                    size = int(np.prod(shape))
                    part = np.ascontiguousarray(feats[:, at:at + size]).reshape(len(ok), *shape)
                    at += size
                    take = [j for j, i in enumerate(ok) if need[i][p]]
                    if not take:
                        continue
                    part = part if len(take) == len(ok) else part[take]
                    try:
                        stored = checked(part, self.dtype, _Layer(self.layers[p]),
                                         [_Job(plan["paths"][ok[j]], plan["sha256"][ok[j]]) for j in take])
                    except FeatcacheError as e:
                        errors.append(str(e))
                        continue
                    out[p].append((stored, [keys[ok[j]] for j in take]))
            store = open_store(self.url)
            committed = 0
            for space, shape, parts in zip(self.spaces, self.shapes, out):
                total = sum(len(k) for _, k in parts)
                if not total:
                    continue
                with Writers(store, [space], [total], [shape], self.dtype, self.checkpoint_s) as writers:
                    for feats, keys in parts:
                        writers.put(0, feats, keys)
                committed += writers.committed_rows
            return {"rows": committed, "batches": len(rows), "failed": failed, "errors": errors,
                    "decode": decode_s, "forward": forward_s, "write": time.perf_counter() - t,
                    "pids": sorted(pids)}

        def on_write_complete(self, write_result) -> None:
            self.returns = [r for r in write_result.write_returns if r]

    return _SegmentSink


@dataclass
class _Layer:
    layer: str | None


def _as_array(value) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else np.asarray(value, dtype=np.float32)


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
    from ray.data import ActorPoolStrategy, DataContext, Datasink

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = bool(progress)
    ctx.print_on_execution_start = False
    if hasattr(ctx, "enable_operator_progress_bars"):
        ctx.enable_operator_progress_bars = bool(progress)

    bs = cfg.batch_size
    keys = [row_key(it.sha256, views[i] if views else None) for i, it in enumerate(todo)]
    have = [held_among(held, keys) for held in have]
    plans = []
    for j in range(-(-len(todo) // bs)):
        span = range(j * bs, min(len(todo), (j + 1) * bs))
        plan = {"paths": [todo[i].path for i in span], "sha256": [todo[i].sha256 for i in span],
                "views": [views[i] for i in span] if views else None, "keys": [keys[i] for i in span],
                "need": [[keys[i] not in held for held in have] for i in span]}
        plans.append({"batch": j, "plan": json.dumps(plan)})

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

    ds = ray.data.from_items(plans, override_num_blocks=max(1, min(len(plans), 4 * max(1, cpus))))
    ds = ds.map(_decode, fn_kwargs={"root": str(root), "transform": joint.transform, "augment": augment},
                num_cpus=decode_cpus)
    ds = ds.map_batches(_Forward, batch_size=1, batch_format="numpy",
                        fn_constructor_kwargs={"spec": spec, "shipped": shipped},
                        compute=ActorPoolStrategy(min_size=most if cfg.ray_max_actors else 1, max_size=most,
                                                  max_tasks_in_flight_per_actor=2),
                        **actor_args)
    sink = _sink_class(Datasink)(store.url, list(spaces), [tuple(p.shape) for p in joint.parts], cfg.dtype,
                                 [p.layer for p in joint.parts], cfg.checkpoint_s, max(1, SEGMENT_IMAGES // bs))
    try:
        ds.write_datasink(sink)
    except (KeyboardInterrupt, FeatcacheError):
        raise
    except Exception as e:  # a Ray failure (workers lost beyond retries, a cluster gone): what committed stays
        raise FeatcacheError(f"the Ray run stopped: {_first_line(e)}. Every committed segment is kept; "
                             "re-run the same command to compute the rest") from None
    failed: dict[str, str] = {}
    errors: list[str] = []
    timings = {"decode": 0.0, "forward": 0.0, "write": 0.0}
    pids: set[int] = set()
    for r in sink.returns:
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

        first_bad = next(r for r in sink.returns if r["failed"])
        path, reason = next(iter(first_bad["failed"].values())).split("\t", 1)
        raise DataError(f"{path}: {reason} (--strict). Remove the file or drop --strict.")
    return failed, timings


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else e.__class__.__name__
