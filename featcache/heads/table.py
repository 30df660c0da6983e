"""The head table: one row per ``--head`` name (its class, what it can do, its parameters) and the
check of a saved head, without importing torch, scikit-learn or NumPy.

``choices.HEADS`` (the names the command line offers) and this table are checked against each
other when this module is imported, so the two cannot disagree; each head class takes its
capabilities (``takes_maps``, ``streams``, ``calibrated``, ``key_params``) from its row and is
checked against the row's parameters when the class is defined. A run's ``head.json`` and
``head.npz`` are checked here against the kind they name, so listing runs (``featcache runs``)
checks every head in a process that never loads a network, nor NumPy (the arrays are checked as
stored, ``persist.Arrays.raw``): ``import torch`` is ~16x ``import click`` on the 2-core machine of
benchmarks/README.md, scikit-learn several times more, NumPy about 2x.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..choices import HEADS, MAX_CLASSES
from ..errors import RunError
from ..fields import Fields, is_finite
from ..persist import Arrays, HeadRecord

__all__ = ["C_GRID", "HeadKind", "KINDS", "kind_of", "check_arrays"]

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)  # C = "auto" searches these (logreg, svm)

Shape = int | tuple[int, ...]


@dataclass(frozen=True)
class HeadKind:
    """One row of the table: where the class is, what it can do, its parameters and how its saved form is checked."""

    name: str  # the --head name, and ``kind`` in head.json
    module: str  # featcache.heads.<module> defines the class
    cls: str
    params: dict[str, Any]  # __init__ parameters and their defaults (the class is checked against them)
    check: Callable[[HeadKind, HeadRecord, str], tuple[Shape, int]] = field(repr=False)
    key_params: tuple[str, ...] = ()  # shown by ``featcache runs`` and sweep tables
    takes_maps: bool = False  # feature maps (the rest of the network), not flat vectors
    streams: bool = False  # trains on a split larger than memory
    calibrated: bool = True  # predict_proba are probabilities, so a log loss means something
    unsaved: tuple[str, ...] = ()  # parameters never written to a run (chosen by the user each time)
    legacy: dict[str, Any] = field(default_factory=dict)  # written by older runs: accepted, checked, unused
    more_options: tuple[str, ...] = ()  # fit options that reach the head other than as a parameter
    unused_with: dict[tuple[str, Any], tuple[str, ...]] = field(default_factory=dict)  # (param, value) -> unused

    @property
    def param_names(self) -> tuple[str, ...]:
        """The parameters, sorted (scikit-learn's ``_get_param_names`` order)."""
        return tuple(sorted(self.params))

    @property
    def options(self) -> tuple[str, ...]:
        """The fit options (FitConfig fields) this head takes, sorted: its saved parameters and ``more_options``
        (rest: --backbone, which its network builder may import)."""
        return tuple(sorted({p for p in self.params if p not in self.unsaved} | set(self.more_options)))

    def params_in_effect(self, params: dict) -> dict:
        """The saved ``params`` that shaped this head's fit, in parameter order: this kind's only (no ``kind``,
        nothing an older featcache wrote for every head), less those its other settings left unused
        (SGD's momentum, step size and gamma under Adam)."""
        used = {k: params[k] for k in self.param_names if k in params}
        for (name, value), unused in self.unused_with.items():
            if used.get(name) == value:
                used = {k: v for k, v in used.items() if k not in unused}
        return used

    def check_state(self, record: HeadRecord, where: str) -> tuple[Shape, int]:
        """(inputs, classes) of a saved head whose parameters and arrays fit this kind; else a RunError."""
        return self.check(self, record, where)


def kind_of(name: str) -> HeadKind:
    """The row of ``--head name``; an unknown name is a ValueError listing the known ones."""
    if name not in KINDS:
        raise ValueError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}")
    return KINDS[name]


# -- the saved form --------------------------------------------------------------------------------

def check_arrays(arrays: Arrays, want: dict[str, tuple], where: str, exact: bool = True) -> None:
    """``arrays`` has each name in ``want`` with that shape (None: any size); with ``exact``, nothing else."""
    missing = [n for n in want if n not in arrays]
    extra = sorted(set(arrays) - set(want)) if exact else []
    if missing or extra:
        what = f"lacks array {missing[0]!r}" if missing else f"has an unexpected array {extra[0]!r}"
        raise RunError(f"{where}: head.npz {what}; the run directory is damaged, re-run featcache fit")
    for name, shape in want.items():
        a = arrays.raw(name)
        fits = a.ndim == len(shape) and all(s is None or s == n for s, n in zip(shape, a.shape))
        if not fits:
            shown = "x".join("N" if s is None else str(s) for s in shape)
            raise RunError(f"{where}: head.npz array {name!r} has shape {'x'.join(map(str, a.shape)) or 'scalar'}, "
                           f"expected {shown}; the run directory is damaged, re-run featcache fit")
        if name != "classes" and a.kind != "f":
            raise RunError(f"{where}: head.npz array {name!r} has dtype {a.dtype}, expected floats; "
                           "the run directory is damaged")


def _check_params(kind: HeadKind, record: HeadRecord, where: str) -> tuple[Fields, Fields]:
    """Every saved parameter is one the kind takes (or took), of the type of its default."""
    p = Fields(record.params, where, "head.json", "params.")
    own = {k: v for k, v in kind.params.items() if k not in kind.unsaved}
    defaults = {**kind.legacy, **own, "kind": kind.name}
    for name, value in record.params.items():
        if name not in defaults:
            raise p.bad(name, f"absent (not a parameter of a {record.kind} head)", value)
        default = defaults[name]
        if name == "C":
            ok = value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)
        elif isinstance(default, bool) or default is None or isinstance(default, (list, tuple)):
            ok = True  # checked by the kind where it matters
        elif isinstance(default, float):
            ok = is_finite(value)
        else:
            ok = type(value) is type(default)
        if not ok:
            raise p.bad(name, f"of the type of {default!r}", value)
    if p.doc.get("kind", record.kind) != record.kind:
        raise p.bad("kind", f"the head's kind {record.kind!r}", p.doc["kind"])
    return p, Fields(record.fitted, where, "head.json", "fitted.")


def _torch_state(arrays: Callable[[HeadRecord, Fields, Fields, int, str], Shape]):
    """The check of a head trained by the torch loop (``heads.base``), with the kind's own array check."""

    def check(kind: HeadKind, record: HeadRecord, where: str) -> tuple[Shape, int]:
        p, info = _check_params(kind, record, where)
        p.get("freeze", lambda v: isinstance(v, list) and all(isinstance(f, str) for f in v),
              "a list of layer names", optional=True)
        c = info.integer("n_classes", 1, MAX_CLASSES)
        info.integer("best_epoch", -1, 2**31, optional=True)
        return arrays(record, p, info, c, where), c

    return check


def _mlp_arrays(record: HeadRecord, p: Fields, info: Fields, c: int, where: str) -> int:
    d = info.integer("n_features_in", 1, 2**31)
    h = p.integer("hidden", 1, 2**31)
    p.number("dropout", 0, 1)
    check_arrays(record.arrays, {"0.weight": (h, d), "0.bias": (h,), "3.weight": (c, h), "3.bias": (c,)}, where)
    return d


def _linear_arrays(record: HeadRecord, p: Fields, info: Fields, c: int, where: str) -> int:
    d = info.integer("n_features_in", 1, 2**31)
    check_arrays(record.arrays, {"0.weight": (c, d), "0.bias": (c,)}, where)
    return d


def _rest_arrays(record: HeadRecord, p: Fields, info: Fields, c: int, where: str) -> tuple[int, ...]:
    """The new layer's arrays; the rest of the network is only known once it is built (``from_state``)."""
    d = info.shape("n_features_in")
    new = info.text("new_layer")
    rest_of = p.obj("rest_of")
    for key in ("backbone", "layer", "weights"):
        rest_of.text(key)
    check_arrays(record.arrays, {f"{new}.weight": (c, None), f"{new}.bias": (c,)}, where, exact=False)
    return d


def _linear_model_state(kind: HeadKind, record: HeadRecord, where: str) -> tuple[int, int]:
    """StandardScaler + a scikit-learn linear model (``heads._linear``)."""
    _, info = _check_params(kind, record, where)
    d = info.integer("n_features_in", 1, 2**31)
    c = info.integer("n_classes", 2, MAX_CLASSES)
    info.get("C", lambda v: is_finite(v) and v > 0,
             "a finite number > 0")
    info.flag("converged", optional=True)
    info.obj("C_search", optional=True)
    k = 1 if c == 2 else c  # scikit-learn's binary form: one score for class 1
    check_arrays(record.arrays, {"scaler_mean": (d,), "scaler_scale": (d,), "coef": (k, d), "intercept": (k,),
                                 "classes": (c,)}, where)
    if not min(record.arrays.raw("scaler_scale").values(), default=1) > 0:
        raise RunError(f"{where}: head.npz array 'scaler_scale' must be positive; the run directory is damaged")
    if list(record.arrays.raw("classes").values()) != list(range(c)):
        raise RunError(f"{where}: head.npz array 'classes' must be 0..{c - 1}, one per class of the run; "
                       "the run directory is damaged")
    return d, c


# -- the rows --------------------------------------------------------------------------------------

_TORCH = {"lr": 1e-3, "optimizer": "adam", "momentum": 0.9, "weight_decay": 0.0, "step_size": 10, "gamma": 0.1,
          "epochs": 30, "batch_size": 64, "patience": 10, "seed": 0, "device": "auto"}
# parameters every torch head wrote before the heads were split into classes
_TORCH_LEGACY = {"kind": "", "hidden": 256, "dropout": 0.4, "lr": 1e-3, "optimizer": "adam", "momentum": 0.9,
                 "weight_decay": 0.0, "step_size": 10, "gamma": 0.1, "epochs": 30, "batch_size": 64, "patience": 10,
                 "seed": 0, "device": "auto", "rest_of": None, "pretrained_lr_scale": 0.1, "freeze": [],
                 "warmup_epochs": 0, "init": "probe"}
_ADAM = {("optimizer", "adam"): ("momentum", "step_size", "gamma")}  # torch.optim.Adam takes none of these (base._fit)
_LINEAR_MODEL = {"C": 1.0, "max_iter": 2000, "seed": 0}

KINDS: dict[str, HeadKind] = {k.name: k for k in (
    HeadKind("mlp", "mlp", "MLPHead", {"hidden": 256, "dropout": 0.4, **_TORCH}, _torch_state(_mlp_arrays),
             key_params=("lr", "hidden", "dropout"), streams=True, legacy=_TORCH_LEGACY, unused_with=_ADAM),
    HeadKind("linear", "linear", "LinearHead", dict(_TORCH), _torch_state(_linear_arrays), key_params=("lr",),
             streams=True, legacy=_TORCH_LEGACY, unused_with=_ADAM),
    HeadKind("rest", "rest", "RestHead",
             {"rest_of": None, "pretrained_lr_scale": 0.1, "freeze": (), "warmup_epochs": 0, "init": "probe",
              "network": None, **_TORCH}, _torch_state(_rest_arrays),
             key_params=("lr", "init", "warmup_epochs"), takes_maps=True, streams=True, unsaved=("network",),
             legacy=_TORCH_LEGACY, more_options=("backbone",), unused_with=_ADAM),
    HeadKind("logreg", "logreg", "LogRegHead", dict(_LINEAR_MODEL), _linear_model_state, key_params=("C",),
             legacy={"kind": ""}),
    HeadKind("svm", "svm", "SVMHead", dict(_LINEAR_MODEL), _linear_model_state, key_params=("C",), calibrated=False,
             legacy={"kind": ""}),
)}

if tuple(KINDS) != HEADS:  # one list of heads: the command line's choices and this table
    raise ImportError(f"featcache.heads.table names the heads {', '.join(KINDS)} but featcache.choices.HEADS "
                      f"names {', '.join(HEADS)}; they must be the same list")
