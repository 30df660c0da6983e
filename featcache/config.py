"""What a command is asked to do, validated: the extract and fit configs and their option parsers.

Importable without torch or numpy (the command line builds ``--help`` and checks options from
here); the vocabularies come from :mod:`.choices`. A config is stored with what it made (a set
record, a run's ``config.json``) and read back through ``from_dict``.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from .choices import (
    DEFAULT_NAME_PATTERN,
    DTYPES,
    ENGINES,
    FIT_POOLS,
    HEADS,
    INITS,
    OPTIMIZERS,
    POOLS,
    PRECISIONS,
    TRACKERS,
    default_store_url,
)
from .errors import DataError, FeatcacheError, UnknownLayer
from .units import parse_size

__all__ = ["ExtractConfig", "FitConfig", "parse_layers", "parse_split", "parse_classes", "parse_name_pattern"]


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
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a `ray start` cluster here, else "local" (127.0.0.1)
    ray_gpus_per_actor: float = 0.0
    ray_decode_cpus: float | None = None  # CPUs per decode task (None: 1)
    ray_max_actors: int | None = None  # that many actors; None: a pool growing from one to one per CPU (or GPUs)

    def __post_init__(self) -> None:
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
        given = [name for name in ("ray_address", "ray_gpus_per_actor", "ray_decode_cpus", "ray_max_actors")
                 if getattr(self, name)]
        if self.engine != "ray" and given:
            raise FeatcacheError(f"--{given[0].replace('_', '-')} needs --engine ray", param=given[0])
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
        object.__setattr__(self, "exclude_class", parse_classes(self.exclude_class or None, "exclude_class") or ())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layer"] = list(self.layer) if isinstance(self.layer, tuple) else self.layer
        d["split"] = list(self.split) if self.split else None
        d["classes"] = list(self.classes) if self.classes is not None else None
        d["exclude_class"] = list(self.exclude_class)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ExtractConfig:
        return cls(**d)


@dataclass(frozen=True)
class FitConfig:
    """How to train a head; written to the run directory as ``config.json``."""

    head: str = "mlp"
    set: str | None = None
    store: str = field(default_factory=default_store_url)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    step_size: int = 10
    gamma: float = 0.1
    hidden: int = 256
    dropout: float = 0.4
    patience: int = 10
    seed: int = 0
    C: float | str = "auto"
    max_iter: int = 2000
    pool: str = "none"
    device: str = "auto"
    runs: str = "runs"
    out: str | None = None
    plots: bool = True
    use_views: bool = True
    pretrained_lr_scale: float = 0.1
    freeze: tuple[str, ...] = ()
    warmup_epochs: int = 0
    init: str = "probe"
    max_memory: str | int = "auto"
    backbone: str | None = None  # rest head on a module:factory set: the user names the module to import
    data: str | None = None  # the set's image folder, for the misclassified plot (no folder a store names)
    tracker: str | None = None  # also record the run in mlflow or tensorboard (featcache.tracking)
    tracking_uri: str | None = None  # where the tracker records (default: its own, see featcache.tracking)

    def __post_init__(self) -> None:
        checks = [
            (self.head in HEADS, f"head must be one of {', '.join(HEADS)}; got {self.head!r}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}"),
            (self.pool in FIT_POOLS, f"pool must be one of {', '.join(FIT_POOLS)}; got {self.pool!r}"),
            (self.init in INITS, f"init must be one of {', '.join(INITS)}; got {self.init!r}"),
            (self.epochs >= 1, f"epochs must be >= 1; got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1; got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0; got {self.lr}"),
            (self.hidden >= 1, f"hidden must be >= 1; got {self.hidden}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1); got {self.dropout}"),
            (self.patience >= 0, f"patience must be >= 0 (0 turns early stopping off); got {self.patience}"),
            (self.pretrained_lr_scale >= 0, f"pretrained_lr_scale must be >= 0; got {self.pretrained_lr_scale}"),
            (self.C == "auto" or (isinstance(self.C, (int, float)) and self.C > 0), f"C must be > 0 or 'auto'; got {self.C!r}"),
            (self.tracker is None or self.tracker in TRACKERS,
             f"tracker must be one of {', '.join(TRACKERS)} or None; got {self.tracker!r}"),
            (self.tracking_uri is None or self.tracker is not None,
             f"tracking_uri needs a tracker ({' or '.join(TRACKERS)}); got tracking_uri {self.tracking_uri!r} alone"),
            (self.max_memory == "auto" or _is_size(self.max_memory),
             f"max_memory must be 'auto' or a size like 4GB; got {self.max_memory!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict:
        return {**asdict(self), "freeze": list(self.freeze)}

    @classmethod
    def from_dict(cls, d: dict) -> FitConfig:
        return cls(**{**d, "freeze": tuple(d.get("freeze", ()))})


def _is_size(value) -> bool:
    try:
        parse_size(value)
        return True
    except ValueError:
        return False


def parse_name_pattern(text: str | None) -> str | None:
    """Check a ``--labels-from-name`` regular expression: it must compile and have one group."""
    if text is None:
        return None
    try:
        groups = re.compile(text).groups
    except re.error as e:
        raise DataError(f"--labels-from-name takes a regular expression with one group like {DEFAULT_NAME_PATTERN!r}; "
                        f"{text!r} does not compile ({e})", param="labels_from_name") from None
    if groups != 1:
        raise DataError(f"--labels-from-name takes a regular expression with exactly one group (the label), like "
                        f"{DEFAULT_NAME_PATTERN!r}; {text!r} has {groups}", param="labels_from_name")
    return text


def parse_classes(value: str | Sequence[str] | None, param: str = "classes") -> tuple[str, ...] | None:
    """``"cats,dogs"`` → ``("cats", "dogs")``; None stays None; an empty list is refused (``param``: classes or
    exclude_class)."""
    option = "--" + param.replace("_", "-")
    if value is None:
        return None
    names = [unicodedata.normalize("NFC", n.strip()) for n in (value.split(",") if isinstance(value, str) else value)]
    if not names or not all(names):
        raise DataError(f"{option} takes class names like cats,dogs; got {value!r}", param=param)
    return tuple(dict.fromkeys(names))


def parse_split(text: str | Sequence[float] | None) -> tuple[float, ...] | None:
    """``"0.8,0.2"`` → ``(0.8, 0.2)``; two or three positive fractions summing to 1."""
    if text is None or text == "":
        return None
    try:
        parts = tuple(float(p) for p in (text.split(",") if isinstance(text, str) else text))
    except ValueError:
        raise DataError(f"split takes two or three fractions like 0.8,0.2 or 0.7,0.15,0.15; got {text!r}", param="split") from None
    if len(parts) not in (2, 3) or not all(math.isfinite(p) and p > 0 for p in parts) or not abs(sum(parts) - 1.0) <= 1e-6:
        raise DataError(
            f"split takes two or three positive fractions that sum to 1 (train,val[,test]); got {text!r}",
            param="split",
        )
    return parts
