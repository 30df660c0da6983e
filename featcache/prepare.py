"""What ``fit`` and ``sweep`` do before any head trains: the head options checked against the
head (its class, resolved once by the caller), the set opened and checked against what the head
needs, and each labelled split loaded as prepared float32 features (or streamed when over
``--max-memory``). The set's persisted fields are read through its record (``fs.record``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields

import numpy as np

from .config import FitConfig
from .errors import FeatcacheError, StoreError
from .heads import KINDS
from .pooling import prepared_shape
from .store import FeatureSet, open_store
from .stream import RowReader, Streamed, memory_budget
from .units import human_bytes

__all__ = ["HEAD_OPTIONS", "Prepared", "prepare", "check_head_options", "given_options", "open_fit_set",
           "check_set_for", "check_memory_for", "load_fit_data"]

_log = logging.getLogger("featcache.fit")  # one INFO line as each phase starts; the CLI shows them

# FitConfig fields that are parameters of some head: giving one the chosen head does not take is an error
HEAD_OPTIONS = ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "step_size", "gamma", "hidden",
                "dropout", "patience", "C", "max_iter", "pretrained_lr_scale", "freeze", "warmup_epochs", "init",
                "backbone", "device")


@dataclass
class Prepared:
    """A set opened and checked for a head, its labelled splits loaded: what training needs."""

    fs: FeatureSet
    data: dict  # split -> (features, labels): arrays, or Streamed splits over --max-memory
    train_views: np.ndarray | None = None  # (N, K, ...) augmented views of train, when used
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # opening and loading


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_head_options(head: type, given) -> None:
    """Refuse options in ``given`` (FitConfig field names the user set) that the head class does not take."""
    takes = set(head.kind.options)
    for name in sorted(given):
        if name in HEAD_OPTIONS and name not in takes:
            own = ", ".join(_flag(p) for p in HEAD_OPTIONS if p in takes)
            raise FeatcacheError(f"{_flag(name)} is not an option of --head {head.name} (its options: {own})",
                                 param=name)


def given_options(cfg: FitConfig) -> set[str]:
    """The head options of ``cfg`` that differ from their defaults (what a library caller set)."""
    blank = FitConfig(store=cfg.store)
    return {f.name for f in fields(FitConfig) if f.name in HEAD_OPTIONS and getattr(cfg, f.name) != getattr(blank, f.name)}


def _memory_need(cfg: FitConfig, fs: FeatureSet, keep_shape: bool) -> int:
    """Bytes the labelled splits (and the training views) take in memory as prepared float32 features."""
    views = fs.views if cfg.use_views else 0
    counts = fs.record.splits
    rows = sum(counts[s] for s in fs.labelled_splits) + views * counts["train"]
    return rows * int(np.prod(prepared_shape(fs.shape, cfg.pool, keep_shape))) * 4


def check_memory_for(cfg: FitConfig, head: type, fs: FeatureSet) -> None:
    """Refuse a head that needs the whole set in memory when the set is over ``--max-memory`` (a sweep asks
    for each of its heads before any fit, so no head is handed streamed data it cannot take)."""
    need, budget = _memory_need(cfg, fs, head.takes_maps), memory_budget(cfg.max_memory)
    if need > budget and not head.streams:
        streaming = ", ".join(k.name for k in KINDS.values() if k.streams and not k.takes_maps)
        raise FeatcacheError(
            f"--head {head.name} needs the whole set in memory ({human_bytes(need)} as float32) but --max-memory is "
            f"{human_bytes(budget)}; raise --max-memory or use --head {streaming}, which stream",
            param="max_memory",
        )


def _load_data(cfg: FitConfig, head: type, fs: FeatureSet) -> tuple[dict, np.ndarray | None, list[str]]:
    """Each split's prepared features and labels, and the training views: in memory when they fit
    in ``--max-memory``, else as :class:`Streamed` splits (heads that stream only)."""
    keep_shape = head.takes_maps
    views = fs.views if cfg.use_views else 0
    view_space = fs.record.view_space
    need, budget = _memory_need(cfg, fs, keep_shape), memory_budget(cfg.max_memory)
    labels = {s: fs.labels(s) for s in fs.labelled_splits}
    if need <= budget:
        data = {s: (RowReader(fs.store, fs.space, fs.hashes(s), fs.shape, cfg.pool, keep_shape,
                              hint=fs.locations(s)).load(), labels[s])
                for s in fs.labelled_splits}
        train_views = None
        if views:
            flat = RowReader(fs.store, view_space, fs.view_keys(), fs.shape, cfg.pool, keep_shape).load()
            train_views = flat.reshape((len(labels["train"]), views) + flat.shape[1:])
        return data, train_views, []
    check_memory_for(cfg, head, fs)
    window = budget // 2  # the window being trained on and the one read ahead
    data = {
        s: (Streamed(fs.store, fs.space, fs.hashes(s).tolist(), labels[s], fs.shape, cfg.pool, keep_shape, window,
                     views=views if s == "train" else 0, view_space=view_space, hint=fs.locations(s)), labels[s])
        for s in fs.labelled_splits
    }
    note = (f"streaming: the set needs {human_bytes(need)} as float32, over --max-memory {human_bytes(budget)}; "
            f"chunks are read in shuffled windows of up to {human_bytes(window)}")
    return data, None, [note]


def open_fit_set(cfg: FitConfig) -> FeatureSet:
    """The set ``cfg`` names (a --backbone given is checked first)."""
    if cfg.backbone is not None:
        from .backbones import check_user_backbone

        check_user_backbone(cfg.backbone)
    fs = open_store(cfg.store, mode="r").get_set(cfg.set, data=cfg.data)
    r = fs.record
    _log.info("loading set %s (%s/%s, %s images)", fs.key, r.backbone, r.layer, sum(r.splits.values()))
    return fs


def check_set_for(cfg: FitConfig, head: type, fs: FeatureSet) -> None:
    """Refuse a set the head cannot train on (a head that takes maps on pooled features, or a
    network it cannot continue). The default layer has a name too (flatten, pre_logits, ...): the
    rest after it is the network's last Linear, replaced."""
    if not head.takes_maps:
        return
    r = fs.record
    if r.pool != "none" or cfg.pool != "none":
        raise FeatcacheError(
            f"--head {head.name} trains the network after the cached layer, so it needs unpooled features; set "
            f"{fs.key} is pooled ({r.pool}) or --pool was given. Extract with --layer {r.layer} --pool none.",
            param="head",
        )
    from .backbones import check_rest

    check_rest(r.backbone)


def load_fit_data(cfg: FitConfig, head: type, fs: FeatureSet) -> tuple[dict, np.ndarray | None, list[str]]:
    """Each labelled split's features and labels, the training views, and notes (see ``_load_data``)."""
    try:
        return _load_data(cfg, head, fs)
    except StoreError as e:
        raise StoreError(str(e) if f"set {fs.key}" in str(e) else f"set {fs.key}: {e}") from None


def prepare(cfg: FitConfig, head: type) -> Prepared:
    """Open ``cfg``'s set, check it against the head class, and load its labelled splits."""
    t0 = time.perf_counter()
    fs = open_fit_set(cfg)
    check_set_for(cfg, head, fs)
    data, train_views, notes = load_fit_data(cfg, head, fs)
    return Prepared(fs, data, train_views, notes, time.perf_counter() - t0)
