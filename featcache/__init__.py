"""featcache: run a frozen CNN once, cache its features in Zarr, fit heads in seconds.

The public names are imported on first use (PEP 562), so ``import featcache`` and the
command line's ``--help`` do not pay for torch; ``featcache.extract`` imports it when used.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from .errors import *  # noqa: F403  (the error family is tiny and always needed)
from .errors import __all__ as _errors_all

__version__ = "0.1.0"

_LAZY = {  # public name -> module that defines it
    "Backbone": "backbones",
    "create_backbone": "backbones",
    "list_backbones": "backbones",
    "list_layers": "backbones",
    "ExtractConfig": "config",
    "ExtractResult": "extracted",
    "LayersResult": "extracted",
    "extract": "extract",
    "FitConfig": "config",
    "FitResult": "fit",
    "fit": "fit",
    "RunRecord": "runs",
    "read_run": "runs",
    "make_head": "heads",
    "load_head": "tails",
    "status": "audit",
    "verify": "audit",
    "gc": "store.maintenance",
    "FeatureSet": "store",
    "Store": "store",
    "open_store": "store",
}

__all__ = ["__version__", *_LAZY, *_errors_all]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:  # a submodule: featcache.store, featcache.persist ...
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module 'featcache' has no attribute {name!r}")
        return importlib.import_module(f".{name}", __name__)
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``featcache.extract`` and ``featcache.fit`` stay the functions after their modules load
    (importing a submodule would otherwise set the package attribute to the module)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
