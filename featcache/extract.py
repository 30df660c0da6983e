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
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import __version__, backbones
from .backbones import Joint, module_name, resolve_precision
from .choices import SPLITS
from .compute import (
    Engine,
    compute,
    held_among,
    local_engine,
    read_only_error,
    remote_failures,
    restore_missing,
    storage_error,
)
from .config import ExtractConfig
from .data import DECODE_RECIPE, Item, Manifest, Skip, scan
from .errors import DataError, FeatcacheError
from .extracted import ExtractResult, LayersResult
from .keys import row_key, set_key, space_key
from .names import check_backbone_name
from .pipeline import resolve_device
from .procs import distributed, merge_failures, on_first, to_each
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


def _scanned(cfg: ExtractConfig, rehash: bool, hasher) -> Manifest:
    manifest = scan(cfg.data, cfg.split, cfg.seed, labels=cfg.labels, labels_from_name=cfg.labels_from_name,
                    classes=cfg.classes, exclude_class=cfg.exclude_class, rehash=rehash, hasher=hasher)
    if cfg.strict and manifest.skipped:
        first = manifest.skipped[0]
        raise DataError(f"{first.path}: {first.reason} (--strict; {len(manifest.skipped)} such files)")
    return manifest


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
        from .ray_hash import hasher as ray_hasher

        import_ray()  # a missing extra is one clear error before anything is scanned or written
        hasher = ray_hasher(cfg.ray_address)  # the files the scan cache does not serve, hashed on the cluster
    else:
        hasher = None
    start = time.perf_counter()
    rank, world = distributed()
    # under torchrun rank 0 alone scans and holds the manifest; the other ranks receive their share of the plan
    manifest = on_first(lambda: _scanned(cfg, rehash, hasher), world, rank)
    several = isinstance(cfg.layer, tuple)
    precision = resolve_precision(cfg.precision, resolve_device(cfg.device))
    # a set already recorded with every row stored is answered from its record, without building the model
    recall = Recall.of(cfg, precision) if module is None and transform is None and world == 1 else None
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


def _extract_leased(configs: list[ExtractConfig], manifest: Manifest | None, joint: Joint, store: Store,
                    spaces: list[str], view_spaces: list[str | None], augment: dict | None, provenances: list[dict],
                    precision: str, rank: int, world: int, progress: bool) -> list[ExtractResult]:
    """Compute what any part's space misses in one pass, then record one set per part (``configs[k]`` is the
    config its set records: the whole extract's, its layer that part's). The plan is made on the manifest's
    columns: an image that is not computed gets no Python object of its own. Under torchrun rank 0 holds the
    manifest and the spaces' row indexes, plans, and sends each rank only its share of the work (its images,
    and which of them each space holds already); it records the sets, and every rank returns its results."""
    cfg = configs[0]
    engine = _engine(cfg)
    plan: dict = {}

    def rows_plan() -> list:
        assert manifest is not None
        plan.update(_plan_rows(manifest, store, spaces, cfg))
        return _shares(manifest.root, list(plan["todo"].values()), [None] * len(plan["todo"]), plan["known"], world)

    root, jobs, have = to_each(rows_plan, world, rank)  # every rank's share is decided before any rank writes
    failed, timings = compute(engine, joint, root, jobs, store, spaces, have, cfg, progress)
    failed = merge_failures(failed, world)
    if cfg.views:
        def views_plan() -> list:
            assert manifest is not None
            root, jobs, held = _plan_views(manifest, store, view_spaces, cfg, failed)
            plan["view_jobs"] = len(jobs)
            return _shares(root, [it for it, _ in jobs], [k for _, k in jobs], held, world)

        root, jobs, have = to_each(views_plan, world, rank)
        _, view_timings = compute(engine, joint, root, jobs, store, view_spaces, have, cfg, progress, augment)
        if view_timings:
            timings["views_model"] = view_timings.get("model", 0.0)

    def record() -> list:
        assert manifest is not None
        results = _record(configs, manifest, plan, failed, timings, joint, store, spaces, view_spaces, augment,
                          provenances, precision, engine, progress)
        return [results] * world

    return to_each(record, world, rank)


def _plan_rows(manifest: Manifest, store: Store, spaces: list[str], cfg: ExtractConfig) -> dict:
    """Per part, which images its space misses (one sorted search per space for all images), and one job per
    content among them."""
    known = [store.known_hashes(space) for space in spaces]
    absent = [~held.contains_digests(manifest.digests) for held in known]
    missing = np.logical_or.reduce(absent) if absent else np.zeros(len(manifest), dtype=bool)
    first = manifest.first_of_each(np.flatnonzero(missing))  # one job per content
    todo: dict[str, Item] = {it.sha256: it for it in manifest.items_at(first)}
    if store.read_only and todo:
        raise read_only_error(cfg.store, store.read_only, f"{len(todo)} images are not in it yet and would have to "
                               "be computed and stored")
    if todo:
        per_split = {s: int(np.count_nonzero(manifest.split_codes[first] == k)) for k, s in enumerate(SPLITS)}
        _log.info("extracting %s%s", " + ".join(f"{n} {s}" for s, n in per_split.items() if n),
                  f" ({len(manifest) - len(todo)} reused)" if len(manifest) > len(todo) else "")
    else:
        _log.info("nothing to compute (%d rows reused)", manifest.distinct())
    return {"known": known, "absent": absent, "first": first, "todo": todo}


def _plan_views(manifest: Manifest, store: Store, view_spaces: list[str | None], cfg: ExtractConfig,
                failed: dict[str, str]) -> tuple[Path, list[tuple[Item, int]], list]:
    """The augmented views of the training images (those that did not fail) that the view spaces miss."""
    known_views = [store.known_hashes(space) for space in view_spaces if space is not None]
    train = manifest.first_of_each(np.flatnonzero(manifest.in_split("train") & ~_rows_of(manifest, failed)))
    rows, views = np.repeat(train, cfg.views), np.tile(np.arange(cfg.views, dtype=np.int32), len(train))
    need = np.zeros(len(rows), dtype=bool)
    for held in known_views:
        need |= ~held.contains_digests(manifest.digests[rows], views)
    jobs = [(manifest.item(i), k) for i, k in zip(rows[need].tolist(), views[need].tolist())]
    if store.read_only and jobs:
        raise read_only_error(cfg.store, store.read_only, f"{len(jobs)} augmented views are not in it yet")
    if jobs:
        _log.info("computing %d augmented views (%d per training image)", len(jobs), cfg.views)
    return manifest.root, jobs, known_views


def _shares(root: Path, items: list[Item], views: list[int | None], held: list, world: int) -> list:
    """Per rank: the data root, its jobs (every ``world``-th), and per space which of its jobs' rows the space
    holds already: the space's index itself for one process, a set the size of the share for a rank."""
    if world <= 1:
        return [(root, list(zip(items, views)), held)]
    out = []
    for r in range(world):
        mine = list(zip(items[r::world], views[r::world]))
        keys = [row_key(it.sha256, k) for it, k in mine]
        out.append((root, mine, [held_among(index, keys) for index in held]))
    return out


def _record(configs: list[ExtractConfig], manifest: Manifest, plan: dict, failed: dict[str, str],
            timings: dict[str, float], joint: Joint, store: Store, spaces: list[str], view_spaces: list[str | None],
            augment: dict | None, provenances: list[dict], precision: str, engine: Engine,
            progress: bool) -> list[ExtractResult]:
    """Record one set per part (rank 0 under torchrun), its rows checked once more; the results."""
    cfg = configs[0]
    failed_rows = _rows_of(manifest, failed)
    first = plan["first"]
    # per part, the images computed into its space (by all ranks together)
    extracted = [int(np.count_nonzero(miss[first] & ~failed_rows[first])) for miss in plan["absent"]]
    view_jobs = plan.get("view_jobs", 0)
    plan.clear()  # the row indexes as they were before this run's rows: not needed any more
    kept = manifest.select(~failed_rows) if failed_rows.any() else manifest
    skipped = manifest.skipped + [Skip(manifest.paths[i], failed[manifest.hex(i)]) for i in np.flatnonzero(failed_rows)]
    splits = [s for s in SPLITS if np.any(kept.in_split(s))]
    for s in (s for s in splits if s not in manifest.unlabelled):
        present = set(np.unique(kept.labels[kept.in_split(s)]).tolist())
        missing_classes = [c for i, c in enumerate(manifest.classes) if i not in present]
        if missing_classes:
            raise DataError(
                f"no decodable images left for class(es) {', '.join(missing_classes)} in split {s}; "
                f"skipped: {'; '.join(f'{k.path}: {k.reason}' for k in skipped[:5])}"
            )
    if "train" not in splits:
        raise DataError("no decodable training images; nothing to fit on")

    # the digest of the view: the manifest's classes and the kept rows only (the scan's other fields play no part)
    view_digest = kept.digest()
    data_root = str(Path(cfg.data).resolve())
    arrays = _SetArrays(kept, splits)
    counts = {s: int(np.count_nonzero(kept.in_split(s))) for s in splits}
    reused_all = kept.distinct()
    results = []
    for part, space, view_space, provenance, part_cfg, done in zip(joint.parts, spaces, view_spaces, provenances,
                                                                  configs, extracted):
        key = set_key(space, view_digest, data_root, manifest.split_fractions, manifest.split_seed, cfg.views,
                      view_space)
        record = SetRecord(
            key=key, space=space, space_provenance=provenance, backbone=part.name, layer=part.layer,
            pool=part.pool, dtype=cfg.dtype, precision=precision, weights_id=part.weights_id,
            weights_sha256=part.weights_sha256, preprocessing=part.preprocessing,
            classes=tuple(manifest.classes), splits=dict(counts),
            unlabelled=tuple(s for s in manifest.unlabelled if s in splits), data_root=data_root,
            layout=manifest.layout, split_fractions=manifest.split_fractions, split_seed=manifest.split_seed,
            manifest_sha256=view_digest, views=cfg.views, view_space=view_space, augment=augment,
            skipped=tuple(s.to_dict() for s in skipped), ignored=tuple(s.to_dict() for s in manifest.ignored),
            config=part_cfg.to_dict(), versions=_versions(), created_at=now_iso(), created_by=created_by(),
            integrity={},
        )
        # Rows chosen for reuse may have been removed meanwhile (a gc that started before the
        # lease): recompute any that are gone, before and after the set is committed.
        one = Joint((part,), part.model)
        restore_missing(engine, one, manifest.root, kept, store, space, view_space, augment, cfg, progress)
        try:
            store.write_set(key, record, arrays)  # a mapping whose arrays are made on first read
        except OSError as e:
            raise storage_error(e, cfg.store, f"the set {key} of this folder is not recorded in it yet") from None
        restore_missing(engine, one, manifest.root, kept, store, space, view_space, augment, cfg, progress)
        fs = store.get_set(key)  # its size as recorded at commit; measured if it has none
        set_bytes = store.set_size(fs, measure=fs.record.summary is None) or 0
        stats = store.space_stats(space)
        results.append(ExtractResult(
            set_key=key,
            space=space,
            store=cfg.store,
            splits=record.splits,
            extracted=done,
            reused=reused_all - done,
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


def _rows_of(manifest: Manifest, failed: dict[str, str]) -> np.ndarray:
    """Which rows hold the bytes of a failed image (``failed`` is by content hash), as a bool array."""
    if not failed:
        return np.zeros(len(manifest), dtype=bool)
    bad = np.frombuffer(bytes.fromhex("".join(failed)), dtype=np.uint8).reshape(len(failed), 32)
    return np.isin(manifest.keys(), bad.view("S32").reshape(len(failed)))


class _SetArrays(Mapping[str, dict[str, np.ndarray]]):
    """The arrays of a set record, per split, made when the store reads them: a set already recorded is found
    by its key before they are asked for, so a re-run with nothing changed never makes them."""

    def __init__(self, kept: Manifest, splits: list[str]):
        self.kept, self.splits = kept, splits

    def __len__(self) -> int:
        return len(self.splits)

    def __iter__(self) -> Iterator[str]:
        return iter(self.splits)

    def __getitem__(self, split: str) -> dict[str, np.ndarray]:
        if split not in self.splits:
            raise KeyError(split)
        rows = np.flatnonzero(self.kept.in_split(split))
        hexes = np.ascontiguousarray(self.kept.digests[rows]).tobytes().hex().encode()
        return {
            "sha256": np.frombuffer(hexes, dtype="S64").astype(str),
            "labels": self.kept.labels[rows].astype(np.int32),
            "paths": np.array(self.kept.paths.take(rows).chunk(0, len(rows)), dtype=str),
        }
