"""A user's own network: ``package.module:factory`` on the command line, or an ``nn.Module`` in Python.

Code is imported only from a name the user typed (or passed in Python), never from one read
from a store or a run. The current folder is not put on ``sys.path``: ``PYTHONPATH=.`` says so.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from torch import nn

from ..errors import UnknownBackbone
from .base import load_weights_file, seeded

__all__ = ["load", "import_factory"]


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
    from torchvision.transforms._presets import ImageClassification

    transform = getattr(model, "transforms", None)
    if not isinstance(transform, ImageClassification):
        transform = ImageClassification(crop_size=224)
    return model, weights_id, transform
