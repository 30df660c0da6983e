"""Classifier heads: one scikit-learn estimator class per ``--head`` name, behind one table.

``heads.table.KINDS`` is the head table (checked against ``choices.HEADS`` on import): each row
names its class, what it can do (``takes_maps``, ``streams``, ``calibrated``) and its parameters.
``head_class("mlp")`` is :class:`MLPHead`; callers resolve a name once and ask the class instead
of comparing names. Classes are imported on first use, so fitting ``logreg`` or ``svm`` never
imports torch, and checking a saved head (``check_head``) imports neither torch nor scikit-learn.
Saved heads are ``head.json`` + ``head.npz`` (arrays, loaded without pickle), checked on read.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..choices import HEADS, INITS, MAX_CLASSES, OPTIMIZERS
from ..errors import RunError
from ..persist import HeadRecord
from .table import C_GRID, KINDS, HeadKind, kind_of

if TYPE_CHECKING:
    from ._contract import Head
    from .linear import LinearHead
    from .logreg import LogRegHead
    from .mlp import MLPHead
    from .rest import RestHead
    from .svm import SVMHead

__all__ = ["HEADS", "KINDS", "HeadKind", "C_GRID", "INITS", "OPTIMIZERS", "MAX_CLASSES", "Head", "MLPHead",
           "LinearHead", "RestHead", "LogRegHead", "SVMHead", "head_class", "kind_of", "head_params", "make_head",
           "check_head", "head_from_record", "save_head", "read_head"]

_CLASSES = {k.cls: k.module for k in KINDS.values()} | {"Head": "_contract"}


def head_class(name: str) -> type[Head]:
    """The class of ``--head name`` (imported now); an unknown name is a ValueError listing the known ones."""
    kind = kind_of(name)
    return getattr(importlib.import_module(f".{kind.module}", __name__), kind.cls)


def head_params(name: str) -> tuple[str, ...]:
    """The fit options the head ``name`` takes (its parameters, and rest's --backbone), sorted, from the table."""
    return kind_of(name).options


def __getattr__(attr: str) -> Any:  # MLPHead & co., imported on first use
    if attr in _CLASSES:
        return getattr(importlib.import_module(f".{_CLASSES[attr]}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def make_head(name: str, **params) -> Head:
    """A head by name; a parameter that head does not take is a TypeError naming the ones it takes."""
    kind = kind_of(name)
    unknown = sorted(set(params) - set(kind.params))
    if unknown:
        raise TypeError(f"the {name} head takes no parameter {unknown[0]!r}; it takes {', '.join(kind.param_names)}")
    return head_class(name)(**params)


def check_head(record: HeadRecord, where: str) -> tuple[int | tuple[int, ...], int]:
    """(inputs, classes) of a saved head, checked against its row of the table; a RunError names what does not fit."""
    if record.kind not in KINDS:
        raise RunError(f"{where}: head.json field 'kind' must be one of {', '.join(HEADS)}; got {record.kind!r}. "
                       "The run directory is damaged; re-run featcache fit")
    return KINDS[record.kind].check_state(record, where)


def head_from_record(record: HeadRecord, where: str, network=None) -> Head:
    """The fitted head a checked record describes (``network``: the builder a rest head needs, see :class:`RestHead`)."""
    check_head(record, where)
    try:
        return head_class(record.kind).from_state(record.params, record.fitted, record.arrays, network)
    except RuntimeError as e:  # load_state_dict: the rest head's arrays do not fit its network
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise RunError(f"{where}: head.npz does not fit the {record.kind} head's network ({first}); "
                       "the run directory is damaged, re-run featcache fit") from None


def save_head(head: Head, folder: Path) -> None:
    """Write ``head.json`` and ``head.npz`` into ``folder``."""
    HeadRecord.of(head).write(Path(folder))


def read_head(folder: Path, network=None) -> Head:
    """The head saved in ``folder``; a damaged or hostile ``head.json``/``head.npz`` is a RunError.
    (``featcache.load_head(folder, backbone)`` passes the builder of a rest head's network.)"""
    return head_from_record(HeadRecord.read(Path(folder)), str(folder), network)
