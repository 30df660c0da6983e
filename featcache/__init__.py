"""featcache: run a frozen CNN once, cache its features in Zarr, fit heads in seconds."""

__version__ = "0.1.0"

from .backbones import Backbone, create_backbone, list_backbones, list_layers  # noqa: E402
from .errors import *  # noqa: E402,F401,F403
from .errors import __all__ as _errors_all  # noqa: E402
from .extract import ExtractConfig, ExtractResult, extract  # noqa: E402
from .fit import FitConfig, FitResult, fit  # noqa: E402
from .heads import load_head, make_head  # noqa: E402
from .store.maintenance import gc, status, verify  # noqa: E402
from .runs import RunRecord, read_run  # noqa: E402
from .store import FeatureSet, Store, open_store  # noqa: E402

__all__ = [
    "__version__",
    "Backbone",
    "create_backbone",
    "list_backbones",
    "list_layers",
    "ExtractConfig",
    "ExtractResult",
    "extract",
    "FitConfig",
    "FitResult",
    "fit",
    "RunRecord",
    "read_run",
    "make_head",
    "load_head",
    "status",
    "verify",
    "gc",
    "FeatureSet",
    "Store",
    "open_store",
    *_errors_all,
]
