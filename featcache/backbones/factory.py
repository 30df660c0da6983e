"""A user's own network: ``package.module:factory`` on the command line, or an ``nn.Module`` in Python.

Code is imported only from a name the user typed (or passed in Python), never from one read
from a store or a run. The current folder is not put on ``sys.path``: ``PYTHONPATH=.`` says so.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..errors import UnknownBackbone
from .base import load_weights_file, seeded

__all__ = ["PYTHON", "load", "import_factory", "from_module", "module_name"]

PYTHON = "python"  # the prefix of a module passed in Python: python:package.module.ClassName
_HOW = ("a callable from a PIL image to the model's input tensor, e.g. torchvision's "
        "ResNet18_Weights.DEFAULT.transforms() or timm.data.create_transform(...)")


def import_factory(spec: str) -> Callable:
    """The callable named by ``package.module:factory``; an error that says how to make it importable."""
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise UnknownBackbone(
            f"cannot import backbone factory {spec!r}: {e}. The module must be installed or on PYTHONPATH "
            "(for a module in the current folder: PYTHONPATH=. featcache ...)"
        ) from None


def load(spec: str, weights: str | None) -> tuple[nn.Module, str, Callable]:
    """(model, weights id, transform) from the factory; its ``transforms`` attribute is the preprocessing."""
    factory = import_factory(spec)
    with seeded():
        model = factory()
    if not isinstance(model, nn.Module):
        raise UnknownBackbone(f"factory {spec!r} returned {type(model).__name__}, expected a torch.nn.Module")
    weights_id = f"{spec}()"
    if weights not in (None, "DEFAULT"):
        load_weights_file(model, weights)
        weights_id = f"file:{Path(weights).name}"
    transform = getattr(model, "transforms", None)
    if not callable(transform):
        raise UnknownBackbone(
            f"factory {spec!r} returned a {type(model).__name__} without a transforms attribute, so its preprocessing "
            f"is unknown (featcache assumes none). Set model.transforms to {_HOW}"
        )
    return model, weights_id, transform


def module_name(module: nn.Module) -> str:
    """The recorded name of a module passed in Python: its class, fully qualified."""
    cls = type(module)
    return f"{PYTHON}:{cls.__module__}.{cls.__qualname__}"


def from_module(module: nn.Module, transform: Callable | None, weights: str | None) -> tuple[nn.Module, str, Callable]:
    """(model, weights id, transform) for a module passed in Python; its weights are its own (or a file's)."""
    transform = transform if transform is not None else getattr(module, "transforms", None)
    if not callable(transform):
        raise UnknownBackbone(
            f"featcache.extract(backbone=<{type(module).__name__}>) needs the model's preprocessing: pass "
            f"transform=..., {_HOW} (or set the module's transforms attribute)"
        )
    weights_id = f"{module_name(module)} (its own weights)"
    if weights is None:
        raise UnknownBackbone("a module passed in Python brings its own weights; leave weights at DEFAULT "
                              "or pass a state-dict file")
    if weights != "DEFAULT":
        import copy

        module = copy.deepcopy(module)  # the caller's module keeps its weights
        load_weights_file(module, weights)
        weights_id = f"file:{Path(weights).name}"
    return module, weights_id, transform
