"""extract: scan and plan -> compute what the spaces miss -> record the set -> commit.

Only images whose bytes are not yet in the feature space go through the network
(:mod:`featcache.compute`); the rest are reused. Whatever was computed is committed even when
the run stops early (a bad file under ``strict``, Ctrl-C), so a re-run resumes instead of
starting over. The set is recorded last, under a lease, after its rows are checked once more.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import __version__, backbones
from .backbones import Joint, module_name, resolve_precision
from .choices import SPLITS
from .compute import Engine, compute, local_engine, read_only_error, remote_failures, restore_missing, storage_error
from .config import ExtractConfig
from .data import DECODE_RECIPE, Item, Manifest, Skip, scan
from .errors import DataError, FeatcacheError
from .extracted import ExtractResult, LayersResult
from .keys import row_key, set_key, space_key
from .names import check_backbone_name
from .pipeline import resolve_device
from .procs import barrier, distributed, from_first, merge_failures
from .recall import Recall
from .store import SetRecord, Store, created_by, open_store
from .units import now_iso

__all__ = ["ExtractResult", "LayersResult", "extract"]

_log = logging.getLogger("featcache.extract")  # one INFO line as each phase starts; the CLI shows them


def augmentation(preprocessing: dict, seed: int) -> dict:
    """The recorded recipe of augmented training views (part of the view space's key)."""
    return {"transform": "RandomResizedCrop+RandomHorizontalFlip", "size": preprocessing.get("crop_size", [224]),
            "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "flip_p": 0.5, "seed": seed,
            "mean": preprocessing.get("mean"), "std": preprocessing.get("std")}


def _versions() -> dict[str, str]:
    import zarr

    return {
        "featcache": __version__,
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        # recorded, not keyed (see Backbone.provenance): read from the installed metadata, not imported
        **_installed("torchvision", "pillow", "timm", "transformers"),
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


def _engine(cfg: ExtractConfig) -> Engine:
    """What computes the rows: the one-process pipeline, or Ray Data for ``engine="ray"``."""
    if cfg.engine == "ray":
        from .ray_engine import run_model  # imports ray only when it is asked for

        return run_model
    return local_engine


@remote_failures
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
            raise FeatcacheError("--engine ray runs from one driver; start it without torchrun", param="engine")
        from .ray_engine import import_ray

        import_ray()  # a missing extra is one clear error before anything is scanned or written
    start = time.perf_counter()
    rank, world = distributed()
    manifest = from_first(lambda: scan(cfg.data, cfg.split, cfg.seed, labels=cfg.labels,
                                       labels_from_name=cfg.labels_from_name, classes=cfg.classes,
                                       exclude_class=cfg.exclude_class, rehash=rehash), world, rank)
    if cfg.strict and manifest.skipped:
        first = manifest.skipped[0]
        raise DataError(f"{first.path}: {first.reason} (--strict; {len(manifest.skipped)} such files)")
    several = isinstance(cfg.layer, tuple)
    precision = resolve_precision(cfg.precision, resolve_device(cfg.device))
    # a set already recorded with every row stored is answered from its record, without building the model
    recall = Recall.of(cfg, precision) if module is None and transform is None else None
    answered = recall.answer(manifest, start) if recall is not None else None
    if answered is not None:
        return answered
    _log.info("loading %s%s", cfg.backbone,
              f" (layers {', '.join(cfg.layer)})" if several else f" (layer {cfg.layer})" if cfg.layer else "")
    if several:
        joint = backbones.create_joint(module if module is not None else cfg.backbone, cfg.layer, cfg.weights,
                                       cfg.pool, transform=transform)
    else:
        backbone = backbones.create_backbone(module if module is not None else cfg.backbone, cfg.layer, cfg.weights,
                                             cfg.pool, transform=transform)
        joint = Joint((backbone,), backbone.model)
    provenances = [{**part.provenance(), "decode": DECODE_RECIPE, "precision": precision, "dtype": cfg.dtype}
                   for part in joint.parts]
    if recall is not None:
        recall.remember(provenances, backbones.weights_files(cfg.backbone, cfg.weights))
    store = open_store(cfg.store)
    # every part has the same preprocessing, so the same augmented views
    augment = augmentation(joint.parts[0].preprocessing, cfg.seed) if cfg.views else None
    view_provenances = [{**p, "augment": augment} for p in provenances] if cfg.views else []
    # The lease keeps gc off these spaces from before anything is written or any row is chosen
    # for reuse until the set that refers to them is committed and its rows checked once more.
    try:
        lease = store.lease([space_key(p) for p in provenances + view_provenances])
    except OSError as e:
        raise storage_error(e, cfg.store) from None
    # on a store this process may only read (no lease), a set already recorded is served as is; anything
    # that must be written is refused below, before any work
    with lease:
        try:
            spaces = [store.ensure_space(p) for p in provenances]
            view_spaces = [store.ensure_space(p) for p in view_provenances] if cfg.views else [None] * len(spaces)
        except OSError as e:
            raise storage_error(e, cfg.store, "its feature space is not in it yet") from None
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
    engine = _engine(cfg)
    known = [store.known_hashes(space) for space in spaces]
    hashes = [it.sha256 for it in manifest.items]
    absent = np.zeros(len(hashes), dtype=bool)
    for held in known:  # one sorted search per space for all images, not a lookup per image
        absent |= ~held.contains(hashes)
    todo: dict[str, Item] = {}
    for it, miss in zip(manifest.items, absent.tolist()):
        if miss and it.sha256 not in todo:
            todo[it.sha256] = it
    if store.read_only and todo:
        raise read_only_error(cfg.store, store.read_only, f"{len(todo)} images are not in it yet and would have to "
                               "be computed and stored")
    barrier(world)  # every rank has decided what to do before any rank writes
    if todo:
        per_split = {s: sum(1 for it in todo.values() if it.split == s) for s in SPLITS}
        _log.info("extracting %s%s", " + ".join(f"{n} {s}" for s, n in per_split.items() if n),
                  f" ({len(manifest.items) - len(todo)} reused)" if len(manifest.items) > len(todo) else "")
    else:
        _log.info("nothing to compute (%d rows reused)", len({it.sha256 for it in manifest.items}))
    failed, timings = compute(engine, joint, manifest.root, [(it, None) for it in list(todo.values())[rank::world]],
                               store, spaces, known, cfg, progress)
    failed = merge_failures(failed, world)
    view_jobs = 0
    if cfg.views:
        known_views = [store.known_hashes(space) for space in view_spaces]
        train = {it.sha256: it for it in manifest.items if it.split == "train" and it.sha256 not in failed}
        pairs = [(it, k) for it in train.values() for k in range(cfg.views)]
        keys = [row_key(it.sha256, k) for it, k in pairs]
        need = np.zeros(len(pairs), dtype=bool)
        for held in known_views:
            need |= ~held.contains(keys)
        jobs = [pair for pair, n in zip(pairs, need.tolist()) if n]
        if store.read_only and jobs:
            raise read_only_error(cfg.store, store.read_only, f"{len(jobs)} augmented views are not in it yet")
        barrier(world)
        view_jobs = len(jobs)
        if jobs:
            _log.info("computing %d augmented views (%d per training image)", len(jobs), cfg.views)
        _, view_timings = compute(engine, joint, manifest.root, jobs[rank::world], store, view_spaces, known_views,
                                  cfg, progress, augment)
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
        barrier(world)
        if rank == 0:
            # Rows chosen for reuse may have been removed meanwhile (a gc that started before the
            # lease): recompute any that are gone, before and after the set is committed.
            one = Joint((part,), part.model)
            restore_missing(engine, one, manifest.root, kept, store, space, view_space, augment, cfg, progress)
            try:
                store.write_set(key, record, arrays)
            except OSError as e:
                raise storage_error(e, cfg.store, f"the set {key} of this folder is not recorded in it yet") from None
            restore_missing(engine, one, manifest.root, kept, store, space, view_space, augment, cfg, progress)
        barrier(world)  # the set is committed before any rank returns
        fs = store.get_set(key) if rank == 0 else None  # its size as recorded at commit; measured if it has none
        set_bytes = 0 if fs is None else store.set_size(fs, measure=fs.record.summary is None) or 0
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
