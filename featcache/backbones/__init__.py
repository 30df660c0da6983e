"""Name → frozen model cut at a layer, with its preprocessing and a weights identity.

One file per source behind one registry (``registry.py``): torchvision models
(``torchvision.py``), the offline ``efficientnet_lite0`` (``lite.py``), a user's own
``package.module:factory`` or ``nn.Module`` (``factory.py``), ``timm:NAME`` (``timm.py``) and
``hf:NAME_OR_DIR`` (``hf.py``). ``base.py`` holds what they share.
"""

from ..config import parse_layers
from .base import POOLS, PRECISIONS, Backbone, Joint, autocast, resolve_precision
from .factory import module_name
from .registry import (
                       _build,  # noqa: F401  (tests patch the builder through the package)
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
)

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
]
