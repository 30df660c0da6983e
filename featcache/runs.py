"""What a run directory holds, as one typed record that reads and checks itself.

A run directory (written by ``fit``)::

    RUN/
      head.npz       the learned arrays (plain numbers; loaded without pickle)
      head.json      the head's kind, parameters and fitted facts
      metrics.json   per split: images, top-1, top-5, log loss, per-class accuracy
      confusion_matrix.SPLIT.npy   per split: the confusion matrix (classes x classes counts, int64)
      history.json   one row per epoch (empty for scikit-learn heads)
      config.json    everything else below; written last, so a run without it is no run

:meth:`RunRecord.read` checks every field (types, ranges, sizes) and cross-checks them
against each other and the stored arrays (class count against the head's outputs, the input
shape against the head's inputs); a run directory from anyone is refused with one
:class:`~featcache.errors.RunError` naming the run, the file and the field, never used wrongly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .choices import MAX_CLASSES, SPLITS
from .config import ExtractConfig, FitConfig
from .errors import RunError, StoreError
from .fields import Fields, is_finite, is_int, is_number
from .heads import check_head
from .persist import HeadRecord, json_text, read_json, read_table, write_json, write_table
from .pooling import prepared_shape

__all__ = ["RUN_FILES", "RunRecord", "read_run", "run_store", "describe_selection"]

RUN_FILES = ("config.json", "metrics.json", "history.json", "head.json", "head.npz")  # + confusion_matrix.SPLIT.npy
_HISTORY_KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"}
_TYPES = {  # dataclass annotations (as strings) -> JSON value check
    "int": is_int,
    "float": is_finite,
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "None": lambda v: v is None,
    "tuple[str, ...]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "tuple[float, ...]": lambda v: isinstance(v, list) and all(is_number(x) for x in v),
}


def _parse_config(cls: type, f: Fields, name: str, convert=None) -> Any:
    """A config dataclass from JSON: each field of its annotated type, then the class's own checks."""
    sub = f.obj(name)
    known = {x.name: x for x in dataclasses.fields(cls)}
    for key, value in sub.doc.items():
        if key not in known:
            raise sub.bad(key, f"absent (not a field of {cls.__name__})", value)
        checks = [_TYPES.get(t.strip()) for t in str(known[key].type).split("|")]
        if None not in checks and not any(check(value) for check in checks):
            raise sub.bad(key, f"of type {known[key].type}", value)
    try:
        return convert(sub.doc) if convert else cls(**sub.doc)
    except (TypeError, ValueError) as e:
        raise RunError(f"{f.where}: {f.file} field {name!r} is not a valid {cls.__name__} ({e}); "
                       "the run directory is damaged, re-run featcache fit") from None


def _doc(fields: Fields | None) -> dict | None:
    return None if fields is None else fields.doc


def _parse_metrics(doc: Any, classes: tuple[str, ...], where: str) -> dict:
    f = Fields(doc, where, "metrics.json")
    c = len(classes)
    if not doc:
        raise RunError(f"{where}: metrics.json holds no split; the run directory is damaged, re-run featcache fit")
    for split in doc:
        if split not in SPLITS:
            raise f.bad(split, "absent (splits are train, val, test)", doc[split])
        m = f.obj(split)
        n = m.integer("n", 0)
        m.number("top1", 0, 1, nonfinite=n == 0)  # NaN for an empty split
        m.number("top5", 0, 1, optional=True, nonfinite=n == 0)
        m.number("log_loss", 0, optional=True, nonfinite=n == 0)
        m.number("balanced_accuracy", 0, 1, optional=True, nonfinite=n == 0)
        for avg in ("macro", "weighted"):
            a = m.obj(avg, optional=True)
            for k in ("precision", "recall", "f1") if a is not None else ():
                a.number(k, 0, 1)
        per_class = m.obj("per_class_accuracy")
        if list(per_class.doc) != list(classes):
            raise m.bad("per_class_accuracy", f"one entry per class of the run ({c})", list(per_class.doc))
        for name in classes:
            per_class.number(name, 0, 1, optional=True)
        cm = m.get("confusion_matrix", lambda v: isinstance(v, list) and len(v) == c and all(
            isinstance(r, list) and len(r) == c and all(is_int(x) and x >= 0 for x in r) for r in v),
            f"a {c}x{c} table of counts")
        if sum(map(sum, cm)) != n:
            raise m.bad("confusion_matrix", f"counts adding up to n = {n}", f"a sum of {sum(map(sum, cm))}")
    return doc


def _parse_c_search(f: Fields) -> dict | None:
    """How a scikit-learn head chose C: ``by``, and a score per ``grid`` value."""
    search = f.obj("C_search", optional=True)
    if search is None:
        return None
    search.text("by")
    grid = search.get("grid", lambda v: isinstance(v, list) and all(is_number(x) and x > 0 for x in v),
                      "a list of numbers > 0")
    search.get("scores", lambda v: isinstance(v, list) and len(v) == len(grid) and all(is_number(x) for x in v),
               f"a list of {len(grid)} numbers, one per grid value")
    return search.doc


def describe_selection(selection: dict | None) -> str:
    """One line: what was chosen on what, and which split's score is held out."""
    if not selection:
        return "-"
    parts = [f"{c['what']} chosen on {c['on']}" for c in selection["chosen"]] or ["nothing chosen"]
    held = selection.get("score")
    parts.append(f"held-out score: {held}" if held else "no held-out split")
    if selection.get("biased"):
        parts.append(f"{', '.join(selection['biased'])} selection-biased")
    return "; ".join(parts)


def _parse_selection(f: Fields) -> dict | None:
    """What fitting chose on which rows (``chosen``), the biased splits and the held-out one (``score``)."""
    sel = f.obj("selection", optional=True)
    if sel is None:
        return None
    sel.get("chosen", lambda v: isinstance(v, list) and all(
        isinstance(c, dict) and set(c) == {"what", "on"} and all(isinstance(x, str) for x in c.values()) for c in v),
        "a list of {what, on} texts")
    sel.get("biased", lambda v: isinstance(v, list) and all(s in SPLITS for s in v), "a list of split names")
    sel.get("score", lambda v: v is None or v in SPLITS, "a split name or null")
    return sel.doc


def _parse_history(doc: Any, epochs: int, where: str) -> tuple[dict, ...]:
    if not isinstance(doc, list) or len(doc) > epochs:
        raise RunError(f"{where}: history.json must be a list of at most {epochs} epoch rows; the run directory "
                       "is damaged, re-run featcache fit")
    for i, row in enumerate(doc):
        r = Fields(row, where, "history.json", f"[{i}].")
        extra = sorted(set(row) - _HISTORY_KEYS)
        if extra:
            raise r.bad(extra[0], "absent (epoch rows hold " + ", ".join(sorted(_HISTORY_KEYS)) + ")", row[extra[0]])
        if set(row) != set(doc[0]):
            raise RunError(f"{where}: history.json row {i} has other fields than row 0; the run directory is damaged, "
                           "re-run featcache fit")
        r.get("epoch", lambda v: is_int(v) and v == i + 1, f"{i + 1}")  # noqa: B023  (called at once)
        r.number("train_loss", 0, nonfinite=True)
        r.number("train_acc", 0, 1)
        r.number("val_loss", 0, optional=True, nonfinite=True)
        r.number("val_acc", 0, 1, optional=True)
        r.number("seconds", 0, optional=True)
    return tuple(doc)


@dataclass(frozen=True)
class RunRecord:
    """Everything a run directory records: how the head was fitted, on which features, and how well it does."""

    config: FitConfig
    set: str
    store: str
    classes: tuple[str, ...]
    feature_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    backbone: str
    layer: str
    weights: dict
    preprocessing: dict | None
    space_provenance: dict
    extract_config: dict | None
    metrics: dict
    history: tuple[dict, ...]
    head: HeadRecord = field(repr=False)
    views_used: int = 0
    best_epoch: int | None = None
    C: float | None = None
    C_search: dict | None = None
    stopped_early: bool = False
    selection: dict | None = None  # what fitting chose on which rows, which split is held out (fit.selection_of)
    seconds: dict = field(default_factory=dict)
    created_at: str = ""

    @property
    def takes_maps(self) -> bool:
        """Whether the head takes feature maps (the rest of the network) rather than flat vectors."""
        return isinstance(self.head.fitted.get("n_features_in"), list)

    def to_dict(self) -> dict:
        """The content of ``config.json``."""
        return {
            "config": self.config.to_dict(), "set": self.set, "store": self.store, "classes": list(self.classes),
            "feature_shape": list(self.feature_shape), "input_shape": list(self.input_shape),
            "backbone": self.backbone, "layer": self.layer, "weights": self.weights,
            "preprocessing": self.preprocessing, "space_provenance": self.space_provenance,
            "extract_config": self.extract_config, "views_used": self.views_used, "best_epoch": self.best_epoch,
            "C": self.C, "C_search": self.C_search, "stopped_early": self.stopped_early, "selection": self.selection,
            "seconds": self.seconds,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, info: Any, metrics: Any, history: Any, head: HeadRecord, where: str) -> RunRecord:
        """Parse and check the run's documents; each failure is a RunError naming ``where``, the file and the field."""
        f = Fields(info, where, "config.json")
        known = {x.name for x in dataclasses.fields(cls)} - {"metrics", "history", "head"}
        for key in info:
            if key not in known:
                raise f.bad(key, "absent (not a field of a featcache run)", info[key])
        config = _parse_config(FitConfig, f, "config", FitConfig.from_dict)
        classes = tuple(f.get("classes", lambda v: isinstance(v, list) and 0 < len(v) <= MAX_CLASSES and all(
            isinstance(c, str) for c in v) and len(set(v)) == len(v), "a non-empty list of distinct class names"))
        feature_shape, input_shape = f.shape("feature_shape"), f.shape("input_shape")
        weights = f.obj("weights")
        weights.text("id")
        weights.get("sha256", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v), "64 hex digits")
        space = f.obj("space_provenance")
        space.text("dtype", choices=("float16", "float32"))
        if "shape" in space.doc and space.shape("shape") != feature_shape:
            raise space.bad("shape", f"the run's feature_shape {list(feature_shape)}", space.doc["shape"])
        if info.get("extract_config"):  # None or {}: a set that did not record it (predict then says so)
            _parse_config(ExtractConfig, f, "extract_config")
        record = cls(
            config=config,
            set=f.get("set", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9A-Za-z_-]{1,64}", v), "a set key"),
            store=f.text("store"),
            classes=classes,
            feature_shape=feature_shape,
            input_shape=input_shape,
            backbone=f.text("backbone"),
            layer=f.text("layer"),
            weights=weights.doc,
            preprocessing=_doc(f.obj("preprocessing", optional=True)),
            space_provenance=space.doc,
            extract_config=info.get("extract_config") or None,
            metrics=_parse_metrics(metrics, classes, where),
            history=_parse_history(history, config.epochs, where),
            head=head,
            views_used=f.integer("views_used", 0, optional=True) or 0,
            best_epoch=f.integer("best_epoch", -1, optional=True),
            C=f.get("C", lambda v: is_finite(v) and v > 0, "a finite number > 0", optional=True),
            C_search=_parse_c_search(f),
            stopped_early=f.flag("stopped_early", optional=True, default=False),
            selection=_parse_selection(f),
            seconds=f.obj("seconds").doc,
            created_at=f.text("created_at"),
        )
        for key in record.seconds:
            f.obj("seconds").number(key, 0)
        record._cross_check(f, where)
        return record

    def _cross_check(self, f: Fields, where: str) -> None:
        """The fields agree with each other and with the head's arrays."""
        n_in, n_out = check_head(self.head, where)
        if self.head.kind != self.config.head:
            raise f.obj("config").bad("head", f"the kind of head.json ({self.head.kind!r})", self.config.head)
        if self.best_epoch is not None and self.best_epoch > len(self.history):
            raise f.bad("best_epoch", f"at most the {len(self.history)} epochs of history.json", self.best_epoch)
        if n_out != len(self.classes):
            raise RunError(f"{where}: the head has {n_out} outputs but config.json names {len(self.classes)} classes; "
                           "the run directory is damaged, re-run featcache fit")
        rest = isinstance(n_in, tuple)  # a head that takes feature maps, not flat vectors
        want = prepared_shape(self.feature_shape, self.config.pool, keep_shape=rest)
        if self.input_shape != want:
            raise f.bad("input_shape", f"{list(want)} (feature_shape {list(self.feature_shape)} with pool "
                                       f"{self.config.pool})", list(self.input_shape))
        if (tuple(n_in) if rest else (n_in,)) != (self.input_shape if rest else (math.prod(self.input_shape),)):
            raise RunError(f"{where}: the head takes {n_in} inputs but config.json records input_shape "
                           f"{list(self.input_shape)}; the run directory is damaged, re-run featcache fit")
        if "C" in self.head.fitted and self.head.fitted["C"] != self.C:
            raise f.bad("C", f"the C of head.json ({self.head.fitted['C']!r})", self.C)

    @classmethod
    def read(cls, run_dir: str | Path) -> RunRecord:
        """Read and check a run directory; a damaged one is a RunError (``param="run"`` when it is no run at all)."""
        run, where = Path(run_dir), str(run_dir)
        try:
            if not run.is_dir():
                why = "it is a file" if run.exists() else "it does not exist"
                raise RunError(f"{where} is not a featcache run directory ({why})", param="run")
            if not any((run / name).exists() for name in ("config.json", "metrics.json")):
                raise RunError(f"{where} is not a featcache run directory (no metrics.json/config.json)", param="run")
        except OSError as e:
            raise RunError(f"{where} cannot be read as a run directory: {e.strerror or e}", param="run") from None
        info = read_json(run / "config.json", where)
        metrics = read_json(run / "metrics.json", where)
        history = read_json(run / "history.json", where)
        _read_tables(run, where, metrics)
        return cls.from_dict(info, metrics, history, HeadRecord.read(run, where), where)

    def check(self, where: str) -> None:
        """Check this record as ``read`` would check it from disk."""
        info, metrics, history, head = json.loads(json.dumps(
            [self.to_dict(), self.metrics, list(self.history), self.head.to_dict()]))
        type(self).from_dict(info, metrics, history, HeadRecord.from_dict(head, self.head.arrays, where), where)

    def write(self, run_dir: str | Path) -> None:
        """Check, then write the run's files; ``config.json`` last, so a run directory without it is incomplete.
        The confusion matrices go into ``confusion_matrix.SPLIT.npy`` (a table of classes x classes is too
        large for JSON with thousands of classes); a JSON file over the read cap is refused before any file."""
        run = Path(run_dir)
        self.check(str(run))
        metrics = {split: {k: v for k, v in m.items() if k != "confusion_matrix"} for split, m in self.metrics.items()}
        docs = {"metrics.json": metrics, "history.json": list(self.history), "config.json": self.to_dict()}
        texts = {name: json_text(doc, str(run / name)) for name, doc in docs.items()}
        try:
            run.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create run directory {run}: {e.strerror or e}") from None
        self.head.write(run)
        for split, m in self.metrics.items():
            write_table(run / _TABLE.format(split=split), m["confusion_matrix"])
        for name in ("metrics.json", "history.json", "config.json"):
            write_json(run / name, docs[name], texts[name])


_TABLE = "confusion_matrix.{split}.npy"


def _read_tables(run: Path, where: str, metrics: Any) -> None:
    """Put each split's confusion matrix, kept in ``confusion_matrix.SPLIT.npy``, back into ``metrics``
    (runs written before kept it in metrics.json, which stays readable); its size against the classes is
    checked with the rest of the record."""
    if not isinstance(metrics, dict):
        return  # the record's own checks say what is wrong
    for split, m in metrics.items():
        if split in SPLITS and isinstance(m, dict) and "confusion_matrix" not in m:
            m["confusion_matrix"] = read_table(run / _TABLE.format(split=split), where)


def read_run(run_dir: str | Path) -> RunRecord:
    """The checked record of a run directory (``RunRecord.read``)."""
    return RunRecord.read(run_dir)



def run_store(record: RunRecord, run: str | Path, given: str | None = None) -> str:
    """Where the run's store is now: ``given`` (the user's --store) when named; else the URL the run records.

    Runs record a local store as an absolute path. One recorded as typed (relative, by an older featcache)
    is looked for from the current folder, then from the folder that held the run's ``runs/`` folder (where
    ``featcache fit`` ran), so a run keeps working from another folder. A store found nowhere is an error
    that names it and the fix, never a silent recomputation of every row."""
    import os

    from .store import local_path

    if given is not None:
        return str(given)
    recorded = record.store
    path = local_path(recorded)
    if path is None or os.path.isabs(path):
        candidates = [recorded]
    else:
        candidates = list(dict.fromkeys([path, str(Path(run).resolve().parent.parent / path)]))
    for url in candidates:
        if local_path(url) is None or (Path(local_path(url)) / "zarr.json").is_file():
            return url
    raise StoreError(f"the store {recorded} that {run} was fitted from is not here (looked for "
                     f"{' and '.join(candidates)}). Pass --store with where it is now, or --recompute to compute "
                     "every image's features without a store")
