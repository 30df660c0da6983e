"""Name → frozen model cut at a layer, with its preprocessing and a weights identity.

One file per source behind one registry (``registry.py``): torchvision models
(``torchvision.py``), the offline ``efficientnet_lite0`` (``lite.py``), a user's own
``package.module:factory`` or ``nn.Module`` (``factory.py``), ``timm:NAME`` (``timm.py``) and
``hf:NAME_OR_DIR`` (``hf.py``). ``base.py`` holds what they share.

The names are imported on first use (PEP 562): ``Backbone``, ``Joint`` and the precision helpers
need torch only, while the registry imports torchvision (whose own import pulls in
``torch._dynamo``, about 1.5 s), so a command that never builds a model does not pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import parse_layers
    from .base import POOLS, PRECISIONS, Backbone, Joint, autocast, resolve_precision
    from .factory import module_name
    from .registry import (
        _build,  # noqa: F401  (tests import the builder through the package)
        check_rest,
        check_user_backbone,
        create_backbone,
        create_joint,
        create_rest,
        default_layer,
        layer_shapes,
        list_backbones,
        list_layers,
        rebuild_backbone,
        trusted_only,
        weights_files,
    )

_LAZY = {  # name -> the module that defines it
    "parse_layers": "..config",
    **dict.fromkeys(("POOLS", "PRECISIONS", "Backbone", "Joint", "autocast", "resolve_precision"), ".base"),
    "module_name": ".factory",
    **dict.fromkeys(("_build", "check_rest", "check_user_backbone", "create_backbone", "create_joint", "create_rest",
                     "default_layer", "layer_shapes", "list_backbones", "list_layers", "rebuild_backbone",
                     "trusted_only", "weights_files"), ".registry"),
}

__all__ = [
    "POOLS",
    "PRECISIONS",
    "autocast",
    "resolve_precision",
    "rebuild_backbone",
    "check_user_backbone",
    "Backbone",
    "Joint",
    "parse_layers",
    "create_backbone",
    "create_joint",
    "create_rest",
    "check_rest",
    "trusted_only",
    "list_backbones",
    "list_layers",
    "layer_shapes",
    "default_layer",
    "module_name",
    "weights_files",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
