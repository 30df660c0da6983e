"""What runs inside the Ray workers of ``extract --engine ray`` (:mod:`featcache.ray_engine` plans and drives):

* :func:`decode`: a Ray Data ``map`` task reading, hash-checking and decoding one planned batch with
  featcache's own reader (:class:`featcache.pipeline.Images`);
* :class:`Forward`: the actor running the frozen network, built once per actor from the driver's spec;
* :func:`write_segment`: a task committing the rows of some batches as one new segment per feature space
  (integrity record, commit marker last) through :class:`featcache.compute.Writers`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from .errors import FeatcacheError

if TYPE_CHECKING:
    from .backbones import Backbone

__all__ = ["Forward", "decode", "write_segment"]

MIN_BATCH = 16  # procs.MIN_BATCH: below this, one thread takes other convolution kernels than several


@dataclass
class _Job:
    path: str
    sha256: str


def decode(row: dict, root: str, transform, augment: dict | None) -> dict:
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


class Forward:
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


@dataclass
class _Layer:
    layer: str | None


def _as_array(value) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else np.asarray(value, dtype=np.float32)


def _rows(block, piece: tuple[int, int] | None) -> list[dict]:
    """The rows of a Ray Data block (Arrow or pandas), or of its slice ``piece`` (start, end)."""
    import pyarrow as pa

    table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
    if piece is not None:
        table = table.slice(piece[0], piece[1] - piece[0])
    return table.to_pylist()


def write_segment(url: str, spaces: list[str], shapes: list[tuple[int, ...]], dtype: str, layers: list,
                  pieces: list[tuple[int, int] | None], *blocks) -> dict:
    """A task: the rows of ``blocks`` (model outputs of whole batches; ``pieces``: the slice of each to take, None
    for all of it) as one new committed segment per space. Returns what happened: rows committed, batches,
    failures by content hash, errors, seconds per stage."""
    from .compute import Writers
    from .pipeline import checked
    from .store import open_store

    t = time.perf_counter()
    rows = [row for block, piece in zip(blocks, pieces) for row in _rows(block, piece)]
    failed: dict[str, str] = {}
    errors: list[str] = []
    out: list[list[tuple[np.ndarray, list[str]]]] = [[] for _ in spaces]
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
        for p, shape in enumerate(shapes):
            size = int(np.prod(shape))
            part = np.ascontiguousarray(feats[:, at:at + size]).reshape(len(ok), *shape)
            at += size
            take = [j for j, i in enumerate(ok) if need[i][p]]
            if not take:
                continue
            part = part if len(take) == len(ok) else part[take]
            try:
                stored = checked(part, dtype, cast("Backbone", _Layer(layers[p])),  # it names the layer only
                                 [_Job(plan["paths"][ok[j]], plan["sha256"][ok[j]]) for j in take])
            except FeatcacheError as e:
                errors.append(str(e))
                continue
            out[p].append((stored, [keys[ok[j]] for j in take]))
    store = open_store(url)
    committed = 0
    for space, shape, parts in zip(spaces, shapes, out):
        total = sum(len(k) for _, k in parts)
        if not total:
            continue
        # one segment per space: the driver chose these batches by --checkpoint-every and the segment size
        with Writers(store, [space], [total], [tuple(shape)], dtype, math.inf) as writers:
            for feats, keys in parts:
                writers.put(0, feats, keys)
        committed += writers.committed_rows
    return {"rows": committed, "batches": len(rows), "failed": failed, "errors": errors, "decode": decode_s,
            "forward": forward_s, "write": time.perf_counter() - t, "pids": sorted(pids)}
