"""Classifier heads: one scikit-learn estimator class per ``--head`` name, behind a registry.

``head_class("mlp")`` is :class:`MLPHead`; callers ask the class for what it can do
(``takes_maps``, ``streams``, ``calibrated``) instead of comparing names. Classes are imported
on first use, so fitting ``logreg`` or ``svm`` never imports torch. Saved heads are
``head.json`` + ``head.npz`` (arrays, loaded without pickle), checked by the class on read.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RunError
from ..persist import HeadRecord
from ._contract import C_GRID, INITS, MAX_CLASSES, OPTIMIZERS, Head

if TYPE_CHECKING:
    from .linear import LinearHead
    from .logreg import LogRegHead
    from .mlp import MLPHead
    from .rest import RestHead
    from .svm import SVMHead

__all__ = ["HEADS", "C_GRID", "INITS", "OPTIMIZERS", "MAX_CLASSES", "Head", "MLPHead", "LinearHead", "RestHead",
           "LogRegHead", "SVMHead", "head_class", "head_params", "make_head", "check_head", "head_from_record",
           "save_head", "load_head"]

_REGISTRY = {"mlp": ("mlp", "MLPHead"), "linear": ("linear", "LinearHead"), "rest": ("rest", "RestHead"),
             "logreg": ("logreg", "LogRegHead"), "svm": ("svm", "SVMHead")}
HEADS = tuple(_REGISTRY)
_CLASSES = {cls: (module, name) for name, (module, cls) in _REGISTRY.items()}


def head_class(name: str) -> type[Head]:
    """The class registered for ``--head name``; an unknown name is a ValueError listing the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def head_params(name: str) -> tuple[str, ...]:
    """The parameters of the head registered as ``name`` (its ``__init__`` arguments)."""
    return tuple(head_class(name)._get_param_names())


def __getattr__(attr: str) -> Any:  # MLPHead & co., imported on first use
    if attr in _CLASSES:
        module, _ = _CLASSES[attr]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def make_head(name: str, **params) -> Head:
    """A head by registry name; a parameter that head does not take is a TypeError naming the ones it takes."""
    cls = head_class(name)
    unknown = sorted(set(params) - set(cls._get_param_names()))
    if unknown:
        raise TypeError(f"the {name} head takes no parameter {unknown[0]!r}; it takes {', '.join(cls._get_param_names())}")
    return cls(**params)


def check_head(record: HeadRecord, where: str) -> tuple[int | tuple[int, ...], int]:
    """(inputs, classes) of a saved head, checked by its class; a RunError names what does not fit."""
    if record.kind not in _REGISTRY:
        raise RunError(f"{where}: head.json field 'kind' must be one of {', '.join(HEADS)}; got {record.kind!r}. "
                       "The run directory is damaged; re-run featcache fit")
    return head_class(record.kind).check_state(record, where)


def head_from_record(record: HeadRecord, where: str, backbone: str | None = None) -> Head:
    """The fitted head a checked record describes (``backbone``: see :func:`load_head`)."""
    check_head(record, where)
    try:
        return head_class(record.kind).from_state(record.params, record.fitted, record.arrays, backbone)
    except RuntimeError as e:  # load_state_dict: the rest head's arrays do not fit its network
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise RunError(f"{where}: head.npz does not fit the {record.kind} head's network ({first}); "
                       "the run directory is damaged, re-run featcache fit") from None


def save_head(head: Head, folder: Path) -> None:
    """Write ``head.json`` and ``head.npz`` into ``folder``."""
    HeadRecord.of(head).write(Path(folder))


def load_head(folder: Path, backbone: str | None = None) -> Head:
    """The head saved in ``folder``; a damaged or hostile ``head.json``/``head.npz`` is a RunError.

    ``backbone`` is the user's --backbone, needed to rebuild a rest head that continues a
    ``module:factory`` network (never imported because a run names it)."""
    return head_from_record(HeadRecord.read(Path(folder)), str(folder), backbone)
