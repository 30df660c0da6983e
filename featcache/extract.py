"""The extract pipeline: reader (DataLoader workers decode) → backbone → writer (background).

Only images whose bytes are not yet in the feature space go through the network; the
rest are reused. Whatever was computed is committed even when the run stops early
(a bad file under ``strict``, Ctrl-C), so a re-run resumes instead of starting over.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from . import __version__
from .names import check_backbone_name
from .backbones import Joint, create_backbone, create_joint, module_name, resolve_precision
from .choices import DTYPES, SPLITS, default_store_url
from .config import ExtractConfig
from .data import DECODE_RECIPE, Item, Manifest, Skip, scan
from .units import human_bytes, now_iso
from .keys import row_key, set_key, space_key
from .errors import DataError, FeatcacheError, StoreError
from .pipeline import Writer, checked, commit_partial, resolve_device, run_backbone
from .store import SetRecord, Store, created_by, is_read_only, open_store

__all__ = ["DTYPES", "ExtractConfig", "ExtractResult", "LayersResult", "Interrupted", "extract", "default_store_url"]

_log = logging.getLogger("featcache.extract")  # one INFO line as each phase starts; the CLI shows them


class Interrupted(FeatcacheError, KeyboardInterrupt):
    """Ctrl-C during extract; what was computed is committed."""


@dataclass
class ExtractResult:
    set_key: str
    space: str
    store: str
    splits: dict[str, int]
    extracted: int
    reused: int
    skipped: list[Skip]
    seconds: float
    bytes_stored: int
    bytes_raw: int
    timings: dict[str, float]
    shape: tuple[int, ...]
    views: int = 0
    views_extracted: int = 0
    set_bytes: int = 0
    layer: str | None = None

    @property
    def images(self) -> int:
        return sum(self.splits.values())

    @property
    def images_per_s(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    @property
    def cache_hit(self) -> bool:
        return self.extracted == 0 and self.views_extracted == 0

    def summary(self) -> str:
        """One line: the set, its images, what was computed, time, and the set's own bytes on disk."""
        splits = ", ".join(f"{k} {v}" for k, v in self.splits.items())
        if self.cache_hit:
            work = f"nothing to compute ({self.reused} rows reused)"
        else:
            rate = f" ({self.images_per_s:.1f} images/s)" if self.extracted else ""
            work = f"extracted {self.extracted}{rate}, reused {self.reused}"
        skipped = f", skipped {len(self.skipped)}" if self.skipped else ""
        views = f"; {self.views} views per training image ({self.views_extracted} computed)" if self.views else ""
        where = ("in memory, gone when this process ends" if str(self.store).lower().startswith("memory://")
                 else "on disk")
        return (f"set {self.set_key}: {self.images} images ({splits}); {work}{skipped}{views}; {self.seconds:.1f} s; "
                f"{human_bytes(self.set_bytes)} {where}")

    def time_line(self) -> str | None:
        """Where the time went (``None`` when nothing was computed): with model processes, their
        seconds decoding and in the forward (summed over the processes) and this process's wait
        for them; else the wait for decoded images and the model; and the background writer."""
        t = self.timings
        if self.cache_hit or not t:
            return None
        if t.get("actors"):
            work = (f"{int(t['actors'])} Ray model actors; decode tasks {t.get('decode', 0.0):.1f} s, forward "
                    f"{t.get('forward', 0.0):.1f} s, write tasks {t.get('write', 0.0):.1f} s (summed over the cluster)")
            return f"time: {work}"
        if t.get("processes"):
            work = (f"{int(t['processes'])} model processes decoding {t.get('decode', 0.0):.1f} s and in the forward "
                    f"{t.get('forward', 0.0):.1f} s (summed), waited for {t.get('read', 0.0):.1f} s")
        else:
            work = f"waiting for decoded images {t.get('read', 0.0):.1f} s, model and checks {t.get('model', 0.0):.1f} s"
        return f"time: {work}; writer busy {t.get('write', 0.0):.1f} s (alongside)"

    def to_dict(self) -> dict:
        """The result as JSON values (``extract --json``)."""
        return {
            "set": self.set_key, "store": self.store, "space": self.space, "layer": self.layer,
            "splits": dict(self.splits),
            "images": self.images, "extracted": self.extracted, "reused": self.reused,
            "skipped": [s.to_dict() for s in self.skipped], "views": self.views, "views_extracted": self.views_extracted,
            "seconds": round(self.seconds, 3), "images_per_s": round(self.images_per_s, 3), "shape": list(self.shape),
            "set_bytes": self.set_bytes, "space_bytes": self.bytes_stored, "space_bytes_raw": self.bytes_raw,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


@dataclass
class LayersResult:
    """What ``extract(layer=[...])`` did: one :class:`ExtractResult` (one set) per layer, in the order asked."""

    results: list[ExtractResult]

    def __iter__(self):
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i: int) -> ExtractResult:
        return self.results[i]

    @property
    def set_keys(self) -> list[str]:
        return [r.set_key for r in self.results]

    @property
    def skipped(self) -> list[Skip]:
        return self.results[0].skipped

    @property
    def seconds(self) -> float:
        return self.results[0].seconds

    @property
    def computed(self) -> int:
        """Images that went through the network (once, for every layer that missed them)."""
        return max(r.extracted for r in self.results)

    def summary(self) -> str:
        """One line per set (its layer first), then one for the pass they shared."""
        lines = [f"{r.layer}: {r.summary()}" for r in self.results]
        return "\n".join(lines + [f"{len(self.results)} layers, one pass: {self.computed} images through the "
                                   f"network in {self.seconds:.1f} s"])

    def to_dict(self) -> dict:
        """The result as JSON values (``extract --json``): each set's, and the pass they shared."""
        return {"sets": [r.to_dict() for r in self.results], "computed": self.computed,
                "seconds": round(self.seconds, 3)}


def augmentation(preprocessing: dict, seed: int) -> dict:
    """The recorded recipe of augmented training views (part of the view space's key)."""
    return {"transform": "RandomResizedCrop+RandomHorizontalFlip", "size": preprocessing.get("crop_size", [224]),
            "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "flip_p": 0.5, "seed": seed,
            "mean": preprocessing.get("mean"), "std": preprocessing.get("std")}


def _run_model(
    joint: Joint,
    manifest: Manifest,
    todo: list[Item],
    store: Store,
    spaces: list[str],
    have: list[set[str]],
    cfg: ExtractConfig,
    progress: bool,
    views: list[int] | None = None,
    augment: dict | None = None,
) -> tuple[dict[str, str], dict[str, float]]:
    """Push ``todo`` through the network once; each part's rows go into new segments of its space (one per
    checkpoint), except the rows that space already holds (``have``, by row key).

    Returns the reasons of images that failed to decode (by content hash) and stage timings.
    """
    keys = [row_key(it.sha256, views[i] if views else None) for i, it in enumerate(todo)]
    writers = [Writer(store, space, sum(k not in held for k in keys), part.shape, cfg.dtype, cfg.checkpoint_s)
               for part, space, held in zip(joint.parts, spaces, have)]
    for w in writers:
        w.start()
    failed: dict[str, str] = {}
    timings = {"read": 0.0, "model": 0.0}
    batches = run_backbone(joint, manifest.root, todo, device=cfg.device, precision=cfg.precision,
                           batch_size=cfg.batch_size, workers=cfg.workers, compile=cfg.compile, progress=progress,
                           desc="views" if views is not None else "extract",
                           views=views, augment=augment, timings=timings)
    closed = 0
    try:
        with contextlib.closing(batches):
            for b in batches:
                for i, reason in b.failed:
                    if cfg.strict:
                        raise DataError(f"{todo[i].path}: {reason} (--strict). Remove the file or drop --strict.")
                    failed[todo[i].sha256] = reason
                if b.features is not None:
                    t = time.perf_counter()
                    outs = b.features if isinstance(b.features, list) else [b.features]
                    for part, out, held, writer in zip(joint.parts, outs, have, writers):
                        rows = [j for j, i in enumerate(b.indices) if keys[i] not in held]
                        if rows:
                            out = out if len(rows) == len(b.indices) else out[rows]
                            feats = checked(out, cfg.dtype, part, [todo[b.indices[j]] for j in rows])
                            writer.put(feats, [keys[b.indices[j]] for j in rows])
                    timings["model"] += time.perf_counter() - t
        for writer in writers:
            writer.close()
            closed += 1
    finally:
        for writer in writers[closed:]:
            commit_partial(writer)
    timings["write"] = sum(w.busy for w in writers)
    return failed, timings


def _versions() -> dict[str, str]:
    import torchvision
    import zarr

    return {
        "featcache": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        **_installed("pillow", "timm", "transformers"),  # recorded, not keyed: see Backbone.provenance
    }


def _installed(*names: str) -> dict[str, str]:
    """The versions of those of ``names`` that are installed, without importing them."""
    from importlib import metadata

    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _read_only_error(url: str, why: str, need: str) -> StoreError:
    return StoreError(f"the store at {url} is read-only: {need} ({why}). Nothing was written; ask for write access, or "
                      "extract into a store of your own (--store)")


def _storage_error(e: OSError, url: str, need: str = "this extract must write to it") -> StoreError:
    """A write that failed (disk full, permissions, network) as a clear error; committed data is untouched."""
    if is_read_only(e):
        return _read_only_error(url, f"{e.strerror or e.__class__.__name__}", need)
    what = "no space left on the device" if e.errno == errno.ENOSPC else f"{e.__class__.__name__}: {e.strerror or e}"
    return StoreError(
        f"writing to {url} failed ({what}). Everything committed before is intact; fix the cause and re-run "
        "the same command to resume (featcache gc removes the unfinished leftovers)."
    )


def _distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun; (0, 1) otherwise. Ranks split the images to extract."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _merge_failures(failed: dict[str, str], world: int) -> dict[str, str]:
    if world <= 1:
        return failed
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, failed)  # in-process messages between ranks, never stored
    return {k: v for part in parts for k, v in part.items()}


def _interrupted() -> Interrupted:
    return Interrupted("finished batches are committed. Re-run the same command to resume.")


class Engine(Protocol):
    """What computes rows: ``todo`` (with ``views``, a view number each, for augmented views) through ``joint``
    into new committed segments of each part's space, except the rows that space holds (``have``, by row key).
    Returns the reasons of images that failed to decode (by content hash) and seconds spent per stage.
    Planning, keys and the set record stay with the caller; ``local`` is :func:`_run_model`, ``ray`` is
    :func:`featcache.ray_engine.run_model`."""

    def __call__(self, joint: Joint, manifest: Manifest, todo: list[Item], store: Store, spaces: list[str],
                 have: list[set[str]], cfg: ExtractConfig, progress: bool, views: list[int] | None = None,
                 augment: dict | None = None) -> tuple[dict[str, str], dict[str, float]]: ...


def _engine(cfg: ExtractConfig) -> Engine:
    if cfg.engine == "ray":
        from .ray_engine import run_model  # imports ray only when it is asked for

        return run_model
    return _run_model


def _compute(joint: Joint, manifest: Manifest, jobs: list[tuple[Item, int | None]], store: Store, spaces: list[str],
             have: list[set[str]], cfg: ExtractConfig, progress: bool,
             augment: dict | None = None) -> tuple[dict[str, str], dict[str, float]]:
    """Rows for ``jobs`` (an image, and a view number or None) into new segments of each part's space, for the
    parts whose space does not hold them yet (``have``)."""
    if not jobs:
        return {}, {}
    views = [k for _, k in jobs] if augment is not None else None
    engine = _engine(cfg)
    try:
        return engine(joint, manifest, [it for it, _ in jobs], store, spaces, have, cfg, progress, views, augment)
    except KeyboardInterrupt:
        raise _interrupted() from None
    except OSError as e:
        raise _storage_error(e, cfg.store) from None


_REMOTE_LIBRARIES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "azure", "google", "requests",
                     "urllib3")


def _remote_failures(fn):
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


@_remote_failures
def extract(config: ExtractConfig | None = None, *, progress: bool = False, transform=None, rehash: bool = False,
            **kwargs) -> ExtractResult | LayersResult:
    """Extract features for a folder into the store and record the dataset view.

    ``featcache.extract(backbone="resnet18", data="photos", weights="none")`` or pass an
    :class:`ExtractConfig`. ``backbone`` may also be an ``nn.Module``, with ``transform`` its
    preprocessing (PIL image → tensor). Returns what was done; ``result.summary()`` is one line.
    Several layers (``layer=["layer3", "layer4"]`` or ``"layer3,layer4"``) run the images through
    the network once and make one set per layer, each as its own extract would; then the result
    is a :class:`LayersResult` with one :class:`ExtractResult` per layer. Files unchanged since the
    last scan of the folder (same stat signature) are not read to be hashed; ``rehash=True`` reads them all.
    """
    module = kwargs.get("backbone") if isinstance(kwargs.get("backbone"), torch.nn.Module) else None
    if module is not None:
        kwargs["backbone"] = module_name(module)  # what the set records; the module itself is used below
    cfg = config if config is not None else ExtractConfig(**kwargs)
    if module is None:
        check_backbone_name(cfg.backbone)  # a mistyped name is refused before the folder is scanned
    if cfg.engine == "ray":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise FeatcacheError("--engine ray runs from one driver; start it without torchrun", option="--engine")
        from .ray_engine import import_ray

        import_ray()  # a missing extra is one clear error before anything is scanned or written
    start = time.perf_counter()
    manifest = scan(cfg.data, cfg.split, cfg.seed, labels=cfg.labels, labels_from_name=cfg.labels_from_name,
                    classes=cfg.classes, exclude_class=cfg.exclude_class, rehash=rehash)
    if cfg.strict and manifest.skipped:
        first = manifest.skipped[0]
        raise DataError(f"{first.path}: {first.reason} (--strict; {len(manifest.skipped)} such files)")
    several = isinstance(cfg.layer, tuple)
    _log.info("loading %s%s", cfg.backbone,
              f" (layers {', '.join(cfg.layer)})" if several else f" (layer {cfg.layer})" if cfg.layer else "")
    if several:
        joint = create_joint(module if module is not None else cfg.backbone, cfg.layer, cfg.weights, cfg.pool,
                             transform=transform)
    else:
        backbone = create_backbone(module if module is not None else cfg.backbone, cfg.layer, cfg.weights, cfg.pool,
                                   transform=transform)
        joint = Joint((backbone,), backbone.model)
    precision = resolve_precision(cfg.precision, resolve_device(cfg.device))
    provenances = [{**part.provenance(), "decode": DECODE_RECIPE, "precision": precision, "dtype": cfg.dtype}
                   for part in joint.parts]
    store = open_store(cfg.store)
    # every part has the same preprocessing, so the same augmented views
    augment = augmentation(joint.parts[0].preprocessing, cfg.seed) if cfg.views else None
    view_provenances = [{**p, "augment": augment} for p in provenances] if cfg.views else []
    rank, world = _distributed()
    # The lease keeps gc off these spaces from before anything is written or any row is chosen
    # for reuse until the set that refers to them is committed and its rows checked once more.
    try:
        lease = store.lease([space_key(p) for p in provenances + view_provenances])
    except OSError as e:
        raise _storage_error(e, cfg.store) from None
    # on a store this process may only read (no lease), a set already recorded is served as is; anything
    # that must be written is refused below, before any work
    with lease:
        try:
            spaces = [store.ensure_space(p) for p in provenances]
            view_spaces = [store.ensure_space(p) for p in view_provenances] if cfg.views else [None] * len(spaces)
        except OSError as e:
            raise _storage_error(e, cfg.store, "its feature space is not in it yet") from None
        configs = [replace(cfg, layer=layer) for layer in cfg.layer] if several else [cfg]
        results = _extract_leased(configs, manifest, joint, store, spaces, view_spaces, augment, provenances,
                                  precision, rank, world, progress and rank == 0)
    seconds = time.perf_counter() - start
    for result in results:
        result.seconds = seconds
        result.timings["total"] = seconds
    return LayersResult(results) if several else results[0]


def _extract_leased(configs: list[ExtractConfig], manifest: Manifest, joint: Joint, store: Store, spaces: list[str],
                    view_spaces: list[str | None], augment: dict | None, provenances: list[dict], precision: str,
                    rank: int, world: int, progress: bool) -> list[ExtractResult]:
    """Compute what any part's space misses in one pass, then record one set per part (``configs[k]`` is the
    config its set records: the whole extract's, its layer that part's)."""
    cfg = configs[0]
    known = [store.known_hashes(space) for space in spaces]
    todo: dict[str, Item] = {}
    for it in manifest.items:
        if it.sha256 not in todo and any(it.sha256 not in held for held in known):
            todo[it.sha256] = it
    if store.read_only and todo:
        raise _read_only_error(cfg.store, store.read_only, f"{len(todo)} images are not in it yet and would have to "
                               "be computed and stored")
    _barrier(world)  # every rank has decided what to do before any rank writes
    if todo:
        per_split = {s: sum(1 for it in todo.values() if it.split == s) for s in SPLITS}
        _log.info("extracting %s%s", " + ".join(f"{n} {s}" for s, n in per_split.items() if n),
                  f" ({len(manifest.items) - len(todo)} reused)" if len(manifest.items) > len(todo) else "")
    else:
        _log.info("nothing to compute (%d rows reused)", len({it.sha256 for it in manifest.items}))
    failed, timings = _compute(joint, manifest, [(it, None) for it in list(todo.values())[rank::world]],
                               store, spaces, known, cfg, progress)
    failed = _merge_failures(failed, world)
    view_jobs = 0
    if cfg.views:
        known_views = [store.known_hashes(space) for space in view_spaces]
        train = {it.sha256: it for it in manifest.items if it.split == "train" and it.sha256 not in failed}
        jobs = [(it, k) for it in train.values() for k in range(cfg.views)
                if any(row_key(it.sha256, k) not in held for held in known_views)]
        if store.read_only and jobs:
            raise _read_only_error(cfg.store, store.read_only, f"{len(jobs)} augmented views are not in it yet")
        _barrier(world)
        view_jobs = len(jobs)
        if jobs:
            _log.info("computing %d augmented views (%d per training image)", len(jobs), cfg.views)
        _, view_timings = _compute(joint, manifest, jobs[rank::world], store, view_spaces, known_views, cfg, progress,
                                   augment)
        if view_timings:
            timings["views_model"] = view_timings.get("model", 0.0)

    kept = [it for it in manifest.items if it.sha256 not in failed]
    skipped = manifest.skipped + [Skip(it.path, failed[it.sha256]) for it in manifest.items if it.sha256 in failed]
    splits = [s for s in SPLITS if any(it.split == s for it in kept)]
    for s in (s for s in splits if s not in manifest.unlabelled):
        present = {it.label for it in kept if it.split == s}
        missing = [c for i, c in enumerate(manifest.classes) if i not in present]
        if missing:
            raise DataError(
                f"no decodable images left for class(es) {', '.join(missing)} in split {s}; "
                f"skipped: {'; '.join(f'{k.path}: {k.reason}' for k in skipped[:5])}"
            )
    if "train" not in splits:
        raise DataError("no decodable training images; nothing to fit on")

    view = Manifest(manifest.root, manifest.classes, kept)
    data_root = str(Path(cfg.data).resolve())
    arrays = {
        s: {
            "sha256": np.array([it.sha256 for it in kept if it.split == s], dtype=str),
            "labels": np.array([it.label for it in kept if it.split == s], dtype=np.int32),
            "paths": np.array([it.path for it in kept if it.split == s], dtype=str),
        }
        for s in splits
    }
    results = []
    for part, space, view_space, provenance, part_cfg, held in zip(joint.parts, spaces, view_spaces, provenances,
                                                                  configs, known):
        key = set_key(space, view.digest(), data_root, manifest.split_fractions, manifest.split_seed, cfg.views,
                      view_space)
        record = SetRecord(
            key=key, space=space, space_provenance=provenance, backbone=part.name, layer=part.layer,
            pool=part.pool, dtype=cfg.dtype, precision=precision, weights_id=part.weights_id,
            weights_sha256=part.weights_sha256, preprocessing=part.preprocessing,
            classes=tuple(manifest.classes), splits={s: sum(1 for it in kept if it.split == s) for s in splits},
            unlabelled=tuple(s for s in manifest.unlabelled if s in splits), data_root=data_root,
            layout=manifest.layout, split_fractions=manifest.split_fractions, split_seed=manifest.split_seed,
            manifest_sha256=view.digest(), views=cfg.views, view_space=view_space, augment=augment,
            skipped=tuple(s.to_dict() for s in skipped), ignored=tuple(s.to_dict() for s in manifest.ignored),
            config=part_cfg.to_dict(), versions=_versions(), created_at=now_iso(), created_by=created_by(),
            integrity={},
        )
        _barrier(world)
        if rank == 0:
            # Rows chosen for reuse may have been removed meanwhile (a gc that started before the
            # lease): recompute any that are gone, before and after the set is committed.
            one = Joint((part,), part.model)
            _restore_missing(one, manifest, kept, store, space, view_space, augment, cfg, progress)
            try:
                store.write_set(key, record, arrays)
            except OSError as e:
                raise _storage_error(e, cfg.store, f"the set {key} of this folder is not recorded in it yet") from None
            _restore_missing(one, manifest, kept, store, space, view_space, augment, cfg, progress)
        _barrier(world)  # the set is committed before any rank returns
        set_bytes = store.set_bytes(store.get_set(key)) if rank == 0 else 0
        extracted = sum(1 for h in todo if h not in held and h not in failed)  # by all ranks together
        stats = store.space_stats(space)
        results.append(ExtractResult(
            set_key=key,
            space=space,
            store=cfg.store,
            splits=record.splits,
            extracted=extracted,
            reused=len({it.sha256 for it in kept}) - extracted,
            skipped=skipped,
            seconds=0.0,
            bytes_stored=stats["bytes_stored"],
            bytes_raw=stats["bytes_raw"],
            timings=dict(timings),
            shape=part.shape,
            views=cfg.views,
            views_extracted=view_jobs,
            set_bytes=set_bytes,
            layer=part.layer,
        ))
    return results


def _restore_missing(joint: Joint, manifest: Manifest, kept: list[Item], store: Store, space: str,
                     view_space: str | None, augment: dict | None, cfg: ExtractConfig, progress: bool) -> None:
    """Recompute the rows of ``kept`` that are no longer in the store (a few tries, then an error)."""
    for _ in range(3):
        store.forget_index()
        known = store.known_hashes(space)
        jobs = list({it.sha256: (it, None) for it in kept if it.sha256 not in known}.values())
        view_jobs = []
        known_views: set[str] = set()
        if view_space:
            known_views = store.known_hashes(view_space)
            view_jobs = [(it, k) for it in {i.sha256: i for i in kept if i.split == "train"}.values()
                         for k in range(cfg.views) if row_key(it.sha256, k) not in known_views]
        if not jobs and not view_jobs:
            return
        failed, _ = _compute(joint, manifest, jobs, store, [space], [known], cfg, progress)
        _compute(joint, manifest, view_jobs, store, [view_space], [known_views], cfg, progress, augment)
        if failed:
            raise DataError(f"{len(failed)} image(s) whose rows vanished from the store during this run cannot be "
                            f"read any more (first: {next(iter(failed.values()))}); re-run the command")
    raise StoreError(f"rows of this set keep vanishing from {cfg.store} (a gc that ignores leases?); re-run the command")
