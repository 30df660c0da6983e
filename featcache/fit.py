"""Load a feature set, train a head on it, measure it, and write a run directory.

``fit`` resolves the ``--head`` name to its class once, then ``prepare`` (``featcache.prepare``:
the set opened and checked, its splits loaded) and ``train`` (the class given: fit, measure, build
the :class:`RunRecord`, write it; the report is drawn from that record in memory). ``sweep`` does
the same for a grid, each head name resolved once.

A run directory holds ``config.json``, ``head.json`` + ``head.npz`` (the learned arrays),
``metrics.json`` (val and test) and ``history.json`` (one row per epoch). JSON and arrays
only: a run directory from someone else can be read without running their code.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from .config import FitConfig
from .errors import FeatcacheError, RunError, os_error_text
from .heads import C_GRID, head_class
from .metrics import compute_metrics
from .persist import HeadRecord
from .prepare import Prepared, check_head_options, given_options, prepare
from .runs import RunRecord
from .runtime import keep_memory
from .store import resolved_url
from .tails import RestNetwork

__all__ = ["FitResult", "fit", "train", "selection_of"]

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
    param, path = ("out", Path(out)) if out else ("runs", None)
    option = "--" + param
    try:
        if path is not None:
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise RunError(f"run directory {path} exists and is not an empty folder; choose another --out", param=param)
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
        raise RunError(f"cannot create run directory {path}: {e.strerror or e}; choose another {option}", param=param) from None


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
    head = head_class(cfg.head)  # the one place the --head name becomes a class
    check_head_options(head, given)
    tracking = open_tracking_for(cfg)  # a missing library is an error before any work
    prepared = prepare(cfg, head)
    if tracking is None:
        return train(cfg, head, prepared, on_epoch=on_epoch)
    made = not (cfg.out and Path(cfg.out).exists())
    run_dir = _new_run_dir(cfg)  # made now, so a tracker can write into it while the head trains
    run = tracking.start(run_dir.name, cfg, prepared.fs, run_dir=run_dir)
    try:
        result = train(cfg, head, prepared, on_epoch=tracking.on_epoch(run, on_epoch), run_dir=run_dir)
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


def _head_params(cfg: FitConfig, cls: type, fs) -> dict:
    """The head's parameters from ``cfg`` (those its class takes), with what the set and the user add:
    the layer the set was cut at (a default-layer set's config names none) and the builder of the
    network after it, which imports only the user's own --backbone."""
    names = set(cls.kind.params)
    params = {k: v for k, v in cfg.to_dict().items() if k in names}
    if "freeze" in names:
        params["freeze"] = tuple(cfg.freeze)
    if "rest_of" in names:
        r = fs.record
        params["rest_of"] = {"backbone": r.config["backbone"], "layer": r.layer, "weights": r.config["weights"]}
    if "network" in names:
        params["network"] = RestNetwork(cfg.backbone)
    return params


def train(cfg: FitConfig, cls: type, prepared: Prepared, *, on_epoch: Callable[[dict], None] | None = None,
          plots: bool | None = None, run_dir: Path | None = None, t_load: float | None = None) -> FitResult:
    """Fit ``cls`` (the head class ``cfg.head`` names, resolved by the caller) on the prepared splits,
    measure it, and write its run directory (``run_dir``: a folder the caller made for it, else a new
    one); the report is drawn from the run record in memory. ``t_load``: the load seconds to record
    (a sweep's shared load), else ``prepared.seconds``."""
    fs, data, train_views = prepared.fs, prepared.data, prepared.train_views
    t_load = prepared.seconds if t_load is None else t_load
    head = cls(**_head_params(cfg, cls, fs))
    x_train, y_train = data["train"]
    x_val, y_val = data.get("val", (None, None))
    notes = list(prepared.notes)
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
    r = fs.record
    record = RunRecord(
        config=cfg,
        set=fs.key,
        store=resolved_url(str(cfg.store)),  # absolute: the run works from any folder
        classes=tuple(fs.classes),
        feature_shape=tuple(fs.shape),
        input_shape=tuple(x_train.shape[1:]),
        backbone=r.backbone,
        layer=r.layer,
        weights={"id": r.weights_id, "sha256": r.weights_sha256},
        preprocessing=r.preprocessing,
        space_provenance=r.space_provenance,
        extract_config=r.config,
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

