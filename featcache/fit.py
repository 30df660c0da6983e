"""Load a feature set, train a head on it, measure it, and write a run directory.

A run directory holds ``config.json``, ``head.json`` + ``head.npz`` (the learned arrays),
``metrics.json`` (val and test) and ``history.json`` (one row per epoch). JSON and arrays
only: a run directory from someone else can be read without running their code.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import FeatcacheError, RunError, StoreError, os_error_text
from .config import FitConfig
from .metrics import compute_metrics
from .pooling import prepared_shape
from .units import human_bytes
from .heads import C_GRID, HEADS, head_class
from .persist import HeadRecord
from .runs import RunRecord
from .store import FeatureSet, open_store, resolved_url
from .runtime import keep_memory
from .stream import RowReader, Streamed, memory_budget

__all__ = ["FitResult", "fit", "selection_of", "HEAD_OPTIONS", "check_head_options"]

_log = logging.getLogger("featcache.fit")  # one INFO line as each phase starts; the CLI shows them


@dataclass
class FitResult:
    run_dir: Path
    set_key: str
    metrics: dict
    history: list[dict]
    seconds: dict[str, float]
    chosen_C: float | None = None
    notes: list[str] = field(default_factory=list)
    best_epoch: int | None = None  # torch heads: the epoch whose weights were kept
    stopped_early: bool = False
    head: Any = field(default=None, repr=False)  # the fitted head
    config: FitConfig | None = None
    probas: dict | None = field(default=None, repr=False)  # per split, for plots written later (sweeps)
    record: Any = field(default=None, repr=False)  # the RunRecord written, for a report written later (sweeps)
    selection: dict | None = None  # what was chosen on what, and which split is held out (see selection_of)

    def stopping(self) -> str | None:
        """``stopped early at epoch 14 of 30; kept epoch 4 (lowest val loss)``; None for heads without epochs."""
        if not self.history:
            return None
        ran = len(self.history)
        stop = f"stopped early at epoch {ran}" if self.stopped_early else f"ran {ran} epochs"
        kept = "the start (epoch 0)" if self.best_epoch == 0 else f"epoch {self.best_epoch}"
        return f"{stop}; kept {kept} (lowest {'val' if 'val_loss' in self.history[0] else 'train'} loss)"

    def to_dict(self) -> dict:
        """The result as JSON values (``fit --json``)."""
        return {"run": str(self.run_dir), "set": self.set_key, "head": self.config.head if self.config else None,
                "metrics": self.metrics,
                "epochs_run": len(self.history), "best_epoch": self.best_epoch, "stopped_early": self.stopped_early,
                "C": self.chosen_C, "selection": self.selection,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "notes": self.notes}

    def summary(self) -> str:
        parts = [f"run {self.run_dir}"]
        sel = self.selection or {}
        for split in ("val", "test"):
            if split in self.metrics:
                why = (" (selection-biased: chose the kept epoch)" if split in sel.get("biased", ()) else
                       " (held out)" if split == sel.get("score") and sel.get("chosen") else "")
                parts.append(f"{split} top-1 {self.metrics[split]['top1']:.4f}{why}")
        if self.chosen_C is not None:
            how = next((c["on"] for c in sel.get("chosen", ()) if c["what"] == "C"), None)
            parts.append(f"C {self.chosen_C:g}" + (f" (by {how})" if how else ""))
        parts.append(f"load {self.seconds['load']:.2f} s, fit {self.seconds['fit']:.2f} s")
        return "; ".join(parts)


BIASED_VAL_NOTE = ("val numbers are selection-biased: the kept epoch was chosen on val loss and the set has no test "
                   "split to report instead; extract with a test split (a test/ folder, or --split 0.7,0.15,0.15) "
                   "for a held-out score")


def selection_of(head, splits) -> tuple[dict, list[str]]:
    """What fitting chose and on which rows, which split's numbers are selection-biased, and which
    split holds the held-out score (test when there is one); with a note when only a biased val exists.

    C = "auto" is chosen by cross-validation of train, so val and test stay held out; the kept
    epoch of a torch head is chosen on val loss (train loss without val), which biases val."""
    chosen = []
    search = getattr(head, "C_search_", None)
    if search and search.get("grid"):
        chosen.append({"what": "C", "on": f"{search['by']} of train"})
    history = getattr(head, "history_", None) or []
    if history:
        chosen.append({"what": "epoch", "on": "val loss" if "val_loss" in history[0] else "train loss"})
    biased = ["val"] if any(c["on"] == "val loss" for c in chosen) else []
    score = "test" if "test" in splits else ("val" if "val" in splits and not biased else None)
    notes = []
    if biased and "test" not in splits:
        notes.append(BIASED_VAL_NOTE)
    return {"chosen": chosen, "biased": biased, "score": score}, notes


def _new_run_dir(cfg: FitConfig) -> Path:
    return new_folder(cfg.out, cfg.runs, cfg.head)


def discard_run_dir(run_dir: Path, made: bool) -> None:
    """A run that failed leaves nothing: the folder goes if fit made it, else only what was put in it."""
    if made:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for p in Path(run_dir).iterdir() if Path(run_dir).is_dir() else ():
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def new_folder(out: str | None, runs: str, label: str) -> Path:
    """``out`` (new or empty), else a new ``runs/<time>-<label>`` folder."""
    option, path = ("--out", Path(out)) if out else ("--runs", None)
    try:
        if path is not None:
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise RunError(f"run directory {path} exists and is not an empty folder; choose another --out", option=option)
            path.mkdir(parents=True, exist_ok=True)
            return path
        base = Path(runs) / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{label}"
        path, n = base, 1
        while True:
            try:
                path.mkdir(parents=True, exist_ok=False)
                return path
            except FileExistsError:
                if not path.parent.is_dir():
                    raise
                n += 1
                path = base.with_name(f"{base.name}-{n}")
    except OSError as e:
        raise RunError(f"cannot create run directory {path}: {e.strerror or e}; choose another {option}", option=option) from None


def _memory_need(cfg: FitConfig, fs: FeatureSet, keep_shape: bool) -> int:
    """Bytes the labelled splits (and the training views) take in memory as prepared float32 features."""
    views = fs.views if cfg.use_views else 0
    counts = fs.attrs["splits"]
    rows = sum(counts[s] for s in fs.labelled_splits) + views * counts["train"]
    return rows * int(np.prod(prepared_shape(fs.shape, cfg.pool, keep_shape))) * 4


def check_memory_for(cfg: FitConfig, fs: FeatureSet) -> None:
    """Refuse a head that needs the whole set in memory when the set is over ``--max-memory`` (a sweep asks
    for each of its heads before any fit, so no head is handed streamed data it cannot take)."""
    head = head_class(cfg.head)
    need, budget = _memory_need(cfg, fs, head.takes_maps), memory_budget(cfg.max_memory)
    if need > budget and not head.streams:
        streaming = ", ".join(h for h in HEADS if head_class(h).streams and not head_class(h).takes_maps)
        raise FeatcacheError(
            f"--head {cfg.head} needs the whole set in memory ({human_bytes(need)} as float32) but --max-memory is "
            f"{human_bytes(budget)}; raise --max-memory or use --head {streaming}, which stream",
            option="--max-memory",
        )


def _load_data(cfg: FitConfig, fs: FeatureSet, keep_shape: bool) -> tuple[dict, np.ndarray | Streamed | None, list[str]]:
    """Each split's prepared features and labels, and the training views: in memory when they fit
    in ``--max-memory``, else as :class:`Streamed` splits (torch heads only)."""
    views = fs.views if cfg.use_views else 0
    need, budget = _memory_need(cfg, fs, keep_shape), memory_budget(cfg.max_memory)
    labels = {s: fs.labels(s) for s in fs.labelled_splits}
    if need <= budget:
        data = {s: (RowReader(fs.store, fs.space, fs.hashes(s), fs.shape, cfg.pool, keep_shape).load(), labels[s])
                for s in fs.labelled_splits}
        train_views = None
        if views:
            flat = RowReader(fs.store, fs.attrs["view_space"], fs.view_keys(), fs.shape, cfg.pool, keep_shape).load()
            train_views = flat.reshape((len(labels["train"]), views) + flat.shape[1:])
        return data, train_views, []
    check_memory_for(cfg, fs)
    window = budget // 2  # the window being trained on and the one read ahead
    data = {
        s: (Streamed(fs.store, fs.space, fs.hashes(s).tolist(), labels[s], fs.shape, cfg.pool, keep_shape, window,
                     views=views if s == "train" else 0, view_space=fs.attrs.get("view_space")), labels[s])
        for s in fs.labelled_splits
    }
    note = (f"streaming: the set needs {human_bytes(need)} as float32, over --max-memory {human_bytes(budget)}; "
            f"chunks are read in shuffled windows of up to {human_bytes(window)}")
    return data, None, [note]


# FitConfig fields that are parameters of some head: giving one the chosen head does not take is an error
HEAD_OPTIONS = ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "step_size", "gamma", "hidden",
                "dropout", "patience", "C", "max_iter", "pretrained_lr_scale", "freeze", "warmup_epochs", "init",
                "backbone", "device")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_head_options(head: str, given) -> None:
    """Refuse options in ``given`` (FitConfig field names the user set) that ``head`` does not take."""
    from .heads import head_params

    takes = set(head_params(head))
    for name in sorted(given):
        if name in HEAD_OPTIONS and name not in takes:
            own = ", ".join(_flag(p) for p in HEAD_OPTIONS if p in takes)
            raise FeatcacheError(f"{_flag(name)} is not an option of --head {head} (its options: {own})",
                                 option=_flag(name))


def given_options(cfg: FitConfig) -> set[str]:
    """The head options of ``cfg`` that differ from their defaults (what a library caller set)."""
    blank = FitConfig(store=cfg.store)
    return {f.name for f in fields(FitConfig) if f.name in HEAD_OPTIONS and getattr(cfg, f.name) != getattr(blank, f.name)}


def open_fit_set(cfg: FitConfig) -> FeatureSet:
    """The set ``cfg`` names, checked against what its head needs."""
    if cfg.backbone is not None:
        from .backbones import check_user_backbone

        check_user_backbone(cfg.backbone)
    fs = open_store(cfg.store, mode="r").get_set(cfg.set, data=cfg.data)
    _log.info("loading set %s (%s/%s, %s images)", fs.key, fs.attrs.get("backbone"), fs.attrs.get("layer"),
              sum(fs.attrs["splits"].values()))
    check_set_for(cfg, fs)
    return fs


def check_set_for(cfg: FitConfig, fs: FeatureSet) -> None:
    """Refuse a set ``cfg``'s head cannot train on (a head that takes maps on pooled features, or a
    network it cannot continue). The default layer has a name too (flatten, pre_logits, ...): the
    rest after it is the network's last Linear, replaced."""
    if not head_class(cfg.head).takes_maps:
        return
    if fs.attrs["pool"] != "none" or cfg.pool != "none":
        raise FeatcacheError(
            f"--head {cfg.head} trains the network after the cached layer, so it needs unpooled features; set {fs.key} "
            f"is pooled ({fs.attrs['pool']}) or --pool was given. Extract with --layer {fs.attrs['layer']} --pool none.",
            option="--head",
        )
    from .backbones import check_rest

    check_rest(fs.attrs["backbone"])


def load_fit_data(cfg: FitConfig, fs: FeatureSet) -> tuple[dict, np.ndarray | None, list[str]]:
    """Each labelled split's features and labels, the training views, and notes (see ``_load_data``)."""
    try:
        return _load_data(cfg, fs, keep_shape=head_class(cfg.head).takes_maps)
    except StoreError as e:
        raise StoreError(str(e) if f"set {fs.key}" in str(e) else f"set {fs.key}: {e}") from None


def fit(
    config: FitConfig | None = None,
    *,
    on_epoch: Callable[[dict], None] | None = None,
    given: set[str] | None = None,
    **kwargs,
) -> FitResult:
    """Train a head on a stored feature set and write its run directory.

    ``featcache.fit(head="logreg", store="featcache.zarr")`` or pass a :class:`FitConfig`.
    ``on_epoch`` receives each epoch's row (torch heads). ``given``: the options the user set
    (the CLI knows; by default the keyword arguments, or the fields of ``config`` that differ
    from their defaults). A head option the head does not take is an error.
    """
    cfg = config if config is not None else FitConfig(**kwargs)
    keep_memory()  # batches and set loads reuse freed memory instead of faulting in fresh pages
    if given is None:
        given = set(kwargs) if config is None else given_options(cfg)
    check_head_options(cfg.head, given)
    tracking = open_tracking_for(cfg)  # a missing library is an error before any work
    t0 = time.perf_counter()
    fs = open_fit_set(cfg)
    data, train_views, notes = load_fit_data(cfg, fs)
    if tracking is None:
        return fit_loaded(cfg, fs, data, train_views, notes, time.perf_counter() - t0, on_epoch=on_epoch)
    made = not (cfg.out and Path(cfg.out).exists())
    run_dir = _new_run_dir(cfg)  # made now, so a tracker can write into it while the head trains
    run = tracking.start(run_dir.name, cfg, fs, run_dir=run_dir)
    try:
        result = fit_loaded(cfg, fs, data, train_views, notes, time.perf_counter() - t0,
                            on_epoch=tracking.on_epoch(run, on_epoch), run_dir=run_dir)
    except BaseException:
        tracking.abort(run)
        discard_run_dir(run_dir, made)
        raise
    tracking.finish(run, result)
    result.notes += tracking.all_notes(result.run_dir)
    return result


def open_tracking_for(cfg: FitConfig):
    """``cfg``'s tracker (None without one); MLflow's default ``mlruns`` goes beside ``--runs`` (or ``--out``)."""
    if cfg.tracker is None:
        return None
    from .tracking import open_tracking

    return open_tracking(cfg.tracker, cfg.tracking_uri, Path(cfg.out).parent if cfg.out else Path(cfg.runs).parent)


def _edge_notes(head) -> list[str]:
    search = getattr(head, "C_search_", None)
    if not search or len(search["grid"]) <= len(C_GRID):
        return []
    tried = ", ".join(f"{c:g} ({s:.4f})" for c, s in zip(search["grid"], search["scores"]) if c not in C_GRID)
    return [f"C search: the best C of {C_GRID[0]:g} to {C_GRID[-1]:g} was at the edge, so it went on: {tried}; "
            f"chose C {head.C_:g}"]


def fit_loaded(cfg: FitConfig, fs: FeatureSet, data: dict, train_views, notes: list[str], t_load: float, *,
               on_epoch: Callable[[dict], None] | None = None, plots: bool | None = None,
               run_dir: Path | None = None) -> FitResult:
    """Fit ``cfg``'s head on splits already loaded from ``fs`` and write its run directory
    (``run_dir``: a folder the caller made for it, else a new one)."""
    cls = head_class(cfg.head)
    names = set(cls._get_param_names())
    params = {k: v for k, v in cfg.to_dict().items() if k in names}
    if "freeze" in names:
        params["freeze"] = tuple(cfg.freeze)
    if "rest_of" in names:
        # the layer the set was cut at, as resolved: a default-layer set's config names none
        params["rest_of"] = {"backbone": fs.attrs["config"]["backbone"], "layer": fs.attrs["layer"],
                             "weights": fs.attrs["config"]["weights"]}
    head = cls(**params)
    x_train, y_train = data["train"]
    x_val, y_val = data.get("val", (None, None))
    notes = list(notes)
    t1 = time.perf_counter()
    _log.info("training %s on %d images", cfg.head, len(y_train))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        head.fit(x_train, y_train, x_val, y_val, classes=np.arange(len(fs.classes)), on_epoch=on_epoch,
                 train_views=train_views)
    for w in caught:  # the head's own warnings (a C at the edge of its grid) become notes
        if type(w.message).__name__ == "CEdgeWarning":
            notes.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    notes += _edge_notes(head)
    t_fit = time.perf_counter() - t1
    probas = {s: head.predict_proba(x) for s, (x, _) in data.items()}
    metrics = {s: compute_metrics(probas[s], y, fs.classes, cls.calibrated) for s, (_, y) in data.items()}
    selection, selection_notes = selection_of(head, [s for s, (_, y) in data.items() if len(y)])
    notes += selection_notes
    record = RunRecord(
        config=cfg,
        set=fs.key,
        store=resolved_url(str(cfg.store)),  # absolute: the run works from any folder
        classes=tuple(fs.classes),
        feature_shape=tuple(fs.shape),
        input_shape=tuple(x_train.shape[1:]),
        backbone=fs.attrs.get("backbone"),
        layer=fs.attrs.get("layer"),
        weights=fs.attrs.get("weights"),
        preprocessing=fs.attrs.get("preprocessing"),
        space_provenance=fs.attrs.get("space_provenance"),
        extract_config=fs.attrs.get("config"),
        metrics=metrics,
        history=tuple(head.history_),
        head=HeadRecord.of(head),
        views_used=fs.views if (fs.views and cfg.use_views) else 0,
        best_epoch=getattr(head, "best_epoch_", None),
        C=getattr(head, "C_", None),
        C_search=getattr(head, "C_search_", None),
        stopped_early=getattr(head, "stopped_early_", False),
        selection=selection,
        seconds={"load": t_load, "fit": t_fit},
        created_at=datetime.now().astimezone().isoformat(timespec="seconds"),
    )
    try:  # never leave a run directory that cannot be read back
        record.check(f"the run fitted on set {fs.key}")
    except RunError as e:
        raise FeatcacheError(f"the trained head cannot be saved as a run ({e}); check the features with "
                             "featcache verify, or lower --lr") from None
    run = Path(run_dir) if run_dir is not None else _new_run_dir(cfg)
    try:
        record.write(run)
        if cfg.plots if plots is None else plots:
            from .report import have_matplotlib, write_report

            if have_matplotlib():  # from what is in memory: nothing is read back or predicted again
                write_report(run, data=cfg.data, record=record, fs=fs, head=head, probas=probas)
            else:
                notes.append("plots skipped: matplotlib is not installed (pip install 'featcache[plots]')")
    except OSError as e:
        if isinstance(e, FeatcacheError):
            raise
        shutil.rmtree(run, ignore_errors=True)  # a run directory is whole or absent, never half-written
        raise RunError(f"writing the run directory {run} failed ({os_error_text(e)}: {e.filename or run}); nothing "
                       "was left there. Free space or choose another --runs / --out, then re-run fit") from None
    return FitResult(run, fs.key, metrics, head.history_, {"load": t_load, "fit": t_fit}, getattr(head, "C_", None),
                     notes, best_epoch=record.best_epoch, stopped_early=record.stopped_early, head=head, config=cfg,
                     probas=probas, selection=selection, record=record)

