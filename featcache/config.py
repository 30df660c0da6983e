"""The values options take, and the extract config: importable without torch or numpy.

The command line builds its ``--help`` from these names, so this module imports nothing
heavy; the library modules take their vocabularies from here (one source for both).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from .errors import FeatcacheError, UnknownLayer  # the error family imports nothing

__all__ = ["POOLS", "PRECISIONS", "DTYPES", "HEADS", "INITS", "OPTIMIZERS", "FIT_POOLS",
           "DEVICES", "ENGINES", "RUN_SORTS", "TRACKERS", "DEFAULT_NAME_PATTERN", "ExtractConfig", "default_store_url",
           "parse_layers"]

POOLS = ("none", "avg", "max")  # store-time pooling of spatial maps (extract --pool)
PRECISIONS = ("auto", "float32", "tf32", "bfloat16", "float16")
DTYPES = ("float16", "float32")
HEADS = ("mlp", "linear", "rest", "logreg", "svm")  # --head names; featcache.heads maps each to its class
INITS = ("random", "probe")
OPTIMIZERS = ("adam", "sgd")
FIT_POOLS = ("none", "avg", "max")  # train-time pooling of stored maps (fit --fit-pool)
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("local", "ray")  # extract --engine
RUN_SORTS = ("time", "val", "test", "head", "run")  # featcache runs --sort
TRACKERS = ("mlflow", "tensorboard")  # fit --tracker; featcache.tracking has one adapter each
DEFAULT_NAME_PATTERN = r"^([^._]+)[._]"


def default_store_url() -> str:
    """``$FEATCACHE_STORE`` or ``featcache.zarr`` (an empty variable counts as unset)."""
    return os.environ.get("FEATCACHE_STORE") or "featcache.zarr"


def parse_layers(value: str | list[str] | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
    """``--layer``: None (the default layer), one name, or several, ``"layer3,layer4"`` or a list (one set each)."""
    if value is None:
        return None
    several = not isinstance(value, str) or "," in value
    if isinstance(value, str):
        names = [n.strip() for n in value.split(",")] if several else [value.strip()]
    elif isinstance(value, (list, tuple)) and all(isinstance(n, str) for n in value):
        names = [n.strip() for n in value]
    else:
        raise UnknownLayer(f"--layer takes a layer name or several, e.g. layer3,layer4; got {value!r}")
    if not names or not all(names):
        raise UnknownLayer(f"--layer takes a layer name or several, e.g. layer3,layer4; got {value!r}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UnknownLayer(f"--layer names {', '.join(twice)} more than once; name each layer once")
    return tuple(names) if several else names[0]


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that decides what ``extract`` does; stored with the set it makes."""

    backbone: str
    data: str = "data"
    store: str = field(default_factory=default_store_url)
    layer: str | tuple[str, ...] | None = None  # several: one set per layer, from one pass (layer3,layer4)
    weights: str = "DEFAULT"
    pool: str | None = None
    dtype: str = "float16"
    split: tuple[float, ...] | None = None
    seed: int = 0
    batch_size: int = 64
    workers: int | None = None
    device: str = "auto"
    strict: bool = False
    checkpoint_s: float = 30.0
    views: int = 0
    compile: bool = False
    precision: str = "auto"
    labels: str | None = None
    labels_from_name: str | None = None
    classes: tuple[str, ...] | None = None
    exclude_class: tuple[str, ...] = ()
    # how the rows are computed, not what they are: recorded with the set, never part of a space's provenance
    engine: str = "local"  # local: the one-process pipeline; ray: Ray Data (featcache.ray_engine)
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a local instance on 127.0.0.1
    ray_gpus_per_actor: float = 0.0
    ray_decode_cpus: float | None = None  # CPUs per decode task (None: 1)
    ray_max_actors: int | None = None  # that many actors; None: a pool growing from one to one per CPU (or GPUs)

    def __post_init__(self) -> None:
        from .data import parse_classes, parse_name_pattern, parse_split

        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.pool is not None and self.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}; got {self.pool!r}")
        if self.views < 0:
            raise ValueError(f"views must be >= 0; got {self.views}")
        if not self.checkpoint_s > 0:
            raise ValueError(f"checkpoint_s must be > 0; got {self.checkpoint_s}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0; got {self.workers}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N]; got {self.device!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {self.engine!r}")
        given = [name for name, value in (("--ray-address", self.ray_address), ("--ray-gpus-per-actor",
                 self.ray_gpus_per_actor), ("--ray-decode-cpus", self.ray_decode_cpus),
                 ("--ray-max-actors", self.ray_max_actors)) if value]
        if self.engine != "ray" and given:
            raise FeatcacheError(f"{given[0]} needs --engine ray", option=given[0])
        if self.ray_gpus_per_actor < 0:
            raise ValueError(f"ray_gpus_per_actor must be >= 0; got {self.ray_gpus_per_actor}")
        if self.ray_decode_cpus is not None and not self.ray_decode_cpus > 0:
            raise ValueError(f"ray_decode_cpus must be > 0; got {self.ray_decode_cpus}")
        if self.ray_max_actors is not None and self.ray_max_actors < 1:
            raise ValueError(f"ray_max_actors must be >= 1; got {self.ray_max_actors}")
        if not str(self.store):
            raise ValueError("store must be a path or URL; got ''")
        object.__setattr__(self, "layer", parse_layers(self.layer))
        object.__setattr__(self, "split", parse_split(self.split))
        object.__setattr__(self, "labels_from_name", parse_name_pattern(self.labels_from_name))
        object.__setattr__(self, "classes", parse_classes(self.classes))
        object.__setattr__(self, "exclude_class", parse_classes(self.exclude_class or None, "--exclude-class") or ())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layer"] = list(self.layer) if isinstance(self.layer, tuple) else self.layer
        d["split"] = list(self.split) if self.split else None
        d["classes"] = list(self.classes) if self.classes is not None else None
        d["exclude_class"] = list(self.exclude_class)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ExtractConfig":
        return cls(**d)
