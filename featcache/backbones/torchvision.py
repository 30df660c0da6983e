"""torchvision classification models, and the fx cut every traceable ``nn.Module`` shares.

The cut is made with ``torchvision.models.feature_extraction``: a layer is any traced node
or module prefix of one; preprocessing comes from the weights' own ``transforms()``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from ..errors import UnknownLayer, WeightsError
from . import exact
from .base import (
    INIT_SEED,
    Assembled,
    Backbone,
    Joint,
    Separate,
    describe_transform,
    load_weights_file,
    pool_map,
    seeded,
    state_digest,
)

__all__ = ["load", "weights_files", "traced_backbone", "traced_joint", "traced_parts", "traced_pass", "traced_layers",
           "traced_shapes", "rest_after", "FxCut", "FxJoint", "crop_of"]


class FxCut(nn.Module):
    """The traced graph up to ``layer``, returning that one tensor, pooled if asked."""

    def __init__(self, graph: nn.Module, layer: str, pool: str):
        super().__init__()
        self.graph = graph
        self.layer = layer
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_map(self.graph(x)[self.layer], self.pool)


class FxJoint(nn.Module):
    """One traced graph returning several nodes (by their qualified names): a tuple with each one as its own
    ``FxCut`` returns it."""

    def __init__(self, graph: nn.Module, nodes: list[str], pools: list[str]):
        super().__init__()
        self.graph = graph
        self.nodes = nodes
        self.pools = pools

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.graph(x)
        return tuple(pool_map(out[node], pool) for node, pool in zip(self.nodes, self.pools))


def _weights_enum(name: str):
    try:
        return torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None


def _checkpoint(weights: Any) -> Path:
    """Where torch hub keeps (and looks for) the file of torchvision weights."""
    url = getattr(weights, "url", "")
    return Path(torch.hub.get_dir()) / "checkpoints" / (url.rsplit("/", 1)[-1] if url else "<file>.pth")


def _download_hint(weights: Any) -> str:
    url = getattr(weights, "url", "")
    cache = _checkpoint(weights)
    return (
        f"With no network, download {url or 'the weights'} elsewhere and pass --weights /path/to/{cache.name}, "
        f"or place it at {cache}."
    )


def _names_a_file(enum: Any, weights: str | None) -> bool:
    """Whether ``weights`` is a state-dict file rather than DEFAULT or a weights name (a name wins over a file)."""
    named = enum is not None and weights in enum.__members__
    return weights not in (None, "DEFAULT") and not named and (
        Path(weights).suffix in (".pth", ".pt", ".bin", ".safetensors") or Path(weights).is_file())


def weights_files(name: str, weights: str | None) -> list[Path] | None:
    """The files :func:`load` reads for these weights: none for a seeded init, the state-dict file, or the
    checkpoint torch hub keeps for named weights (whose hash torchvision checks only when it downloads it);
    ``None`` for weights :func:`load` refuses."""
    if weights is None:
        return []
    enum = _weights_enum(name)
    if _names_a_file(enum, weights):
        return [Path(weights)]
    chosen = None if enum is None else enum.DEFAULT if weights == "DEFAULT" else enum.__members__.get(weights)
    return None if chosen is None else [_checkpoint(chosen)]


def load(name: str, weights: str | None) -> tuple[nn.Module, str, Callable]:
    """(model, weights id, transform) for a torchvision model name."""
    from torchvision.transforms._presets import ImageClassification

    enum = _weights_enum(name)
    default = enum.DEFAULT if enum is not None else None
    is_file = _names_a_file(enum, weights)  # a weights name, even where a file has that name, is the name
    if weights is None or is_file:
        with seeded():
            model = torchvision.models.get_model(name, weights=None)
        weights_id = f"none(seed={INIT_SEED})"
        if weights is not None:
            load_weights_file(model, weights)
            weights_id = f"file:{Path(weights).name}"
        chosen = default
    else:
        if enum is None:
            raise WeightsError(
                f"{name} has no pretrained weights in torchvision; use --weights none or a .pth file", param="weights"
            )
        choices = ["DEFAULT"] + [w.name for w in enum]
        if weights != "DEFAULT" and weights not in enum.__members__:
            raise WeightsError(
                f"unknown weights {weights!r} for {name}. Choose one of: {', '.join(choices)}, none, "
                "or a path to a .pth file",
                param="weights",
            )
        chosen = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
        model = torchvision.models.get_model(name, weights=None)
        try:
            state = chosen.get_state_dict(progress=True, check_hash=True)
        except Exception as e:  # URLError, HTTPError, hash mismatch, ...
            raise WeightsError(
                f"could not download {chosen} ({e.__class__.__name__}: {e}). {_download_hint(chosen)}"
            ) from None
        model.load_state_dict(state)
        weights_id = str(chosen)
    transform = chosen.transforms() if chosen is not None else ImageClassification(crop_size=224)
    return model, weights_id, transform


def _node_names(model: nn.Module, tracer_kwargs: dict) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, nodes = get_graph_node_names(model.eval(), tracer_kwargs=tracer_kwargs)
    return [n for n in nodes if n != "x"]


def _default_layer(model: nn.Module, nodes: list[str]) -> str:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears and linears[-1] in nodes:
        i = nodes.index(linears[-1])
        if i > 0:
            return nodes[i - 1]
    features = [n for n in nodes if n == "features" or n.startswith("features.")]
    if features:
        return "features"
    raise UnknownLayer("cannot tell this model's penultimate layer; pass --layer (see: featcache layers NAME)")


def _prefixes(nodes: list[str]) -> list[str]:
    """Node names plus every module prefix of them, in first-seen order."""
    seen: dict[str, None] = {}
    for n in nodes:
        parts = n.split(".")
        for k in range(1, len(parts) + 1):
            seen.setdefault(".".join(parts[:k]), None)
    return list(seen)


def traced_layers(model: nn.Module, tracer_kwargs: dict | None = None) -> tuple[list[str], str | None]:
    """(every layer name ``--layer`` accepts, in network order; the default layer or None)."""
    nodes = _node_names(model, tracer_kwargs or {})
    try:
        default = _default_layer(model, nodes)
    except UnknownLayer:
        default = None
    return _prefixes(nodes), default


def traced_shapes(model: nn.Module, size: tuple[int, int],
                  tracer_kwargs: dict | None = None) -> dict[str, tuple[int, ...] | None]:
    """Each layer's output shape (batch dimension left out) for one input of ``size``, in one pass.

    A module prefix has the shape of its last node, as the cut at that prefix returns it.
    """
    nodes = _node_names(model, tracer_kwargs or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = create_feature_extractor(model.eval(), return_nodes=nodes, tracer_kwargs=tracer_kwargs or {})
    with torch.no_grad():
        out = graph(torch.zeros(1, 3, *size))
    shapes = {k: tuple(v.shape[1:]) if isinstance(v, torch.Tensor) else None for k, v in out.items()}
    for n in nodes:  # in network order, so each prefix ends with its last node's shape
        parts = n.split(".")
        for k in range(1, len(parts)):
            shapes[".".join(parts[:k])] = shapes.get(n)
    return shapes


def crop_of(preprocessing: dict) -> int:
    """The side of the square input the model is fed (for shapes and the layer listing)."""
    crop = preprocessing.get("crop_size") or [224]
    return int(crop[0] if isinstance(crop, (list, tuple)) else crop)


def traced_backbone(name: str, model: nn.Module, weights_id: str, transform: Callable, layer: str | None,
                    pool: str | None, tracer_kwargs: dict | None = None, preprocessing: dict | None = None,
                    extra: tuple[str, ...] = (), digest: str | None = None, nodes: list[str] | None = None,
                    raw: Any = None) -> Backbone:
    """Cut a traceable ``model`` at ``layer`` (default: the pooled penultimate output).

    ``preprocessing`` is the record of ``transform`` when the source describes it itself;
    ``extra`` names layers the source serves itself (listed in the error for an unknown layer);
    ``digest`` is the model's ``state_digest``, ``nodes`` its traced node names and ``raw`` the layer's
    output for a zero input, when the caller has them already.
    """
    tracer_kwargs = tracer_kwargs or {}
    model.eval()
    nodes = nodes or _traced_nodes(name, model, tracer_kwargs, extra)
    layer, pool = _checked(name, model, nodes, layer, pool, extra)
    digest = digest or state_digest(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = exact.snapshot(create_feature_extractor(model, return_nodes=[layer], tracer_kwargs=tracer_kwargs))
    preprocessing = preprocessing or describe_transform(transform)
    crop = crop_of(preprocessing)
    if raw is None:
        with torch.no_grad():
            raw = graph(torch.zeros(1, 3, crop, crop))[layer]
    if not isinstance(raw, torch.Tensor):
        raise UnknownLayer(f"layer {layer!r} of {name} does not output a single tensor; choose another --layer")
    if raw.ndim != 4:
        pool = "none"  # only spatial maps are pooled
    shape = (raw.shape[1],) if pool != "none" else tuple(raw.shape[1:])
    cut = FxCut(graph, layer, pool).eval().requires_grad_(False)
    return Backbone(name=name, layer=layer, pool=pool, model=cut, transform=transform, weights_id=weights_id,
                    weights_sha256=digest, preprocessing=preprocessing, shape=shape)


def _traced_nodes(name: str, model: nn.Module, tracer_kwargs: dict, extra: tuple[str, ...]) -> list[str]:
    try:
        return _node_names(model, tracer_kwargs)
    except Exception as e:  # fx cannot trace every model; say so instead of a long traceback
        raise UnknownLayer(f"{name} cannot be cut at an inner layer ({e.__class__.__name__} while tracing it); "
                           f"use {' or '.join(extra) or 'the default layer'}") from None


def _checked(name: str, model: nn.Module, nodes: list[str], layer: str | None, pool: str | None,
             extra: tuple[str, ...]) -> tuple[str, str]:
    """(the layer, its pool before the output is seen): the default layer pooled ``avg``, else ``layer`` checked."""
    if layer is None:
        return _default_layer(model, nodes), pool or "avg"
    if layer not in set(_prefixes(nodes)):
        top = list(extra) + [n for n in _prefixes(nodes) if "." not in n]
        raise UnknownLayer(
            f"Unknown layer {layer!r} for {name}. Layers: {', '.join(top)} "
            f"(and their sub-layers, e.g. {nodes[len(nodes) // 2]}). See: featcache layers {name}"
        )
    return layer, pool or "none"


def traced_parts(name: str, model: nn.Module, weights_id: str, transform: Callable, layers: list[str | None],
                 pool: str | None, tracer_kwargs: dict | None = None, preprocessing: dict | None = None,
                 extra: tuple[str, ...] = (), digest: str | None = None):
    """(the ``traced_backbone`` of each layer, the model's traced node names, the graph returning every layer's
    node with its in-place writes): one trace and one probe for all the parts' shapes."""
    tracer_kwargs = tracer_kwargs or {}
    model.eval()
    digest = digest or state_digest(model)
    nodes = _traced_nodes(name, model, tracer_kwargs, extra)
    checked = [_checked(name, model, nodes, layer, pool, extra) for layer in layers]
    keys = exact.resolve_all(nodes, [layer for layer, _ in checked])
    graph = _graph(model, keys, tracer_kwargs)
    crop = crop_of(preprocessing or describe_transform(transform))
    writes, out = exact.written(graph, torch.zeros(1, 3, crop, crop))
    parts = tuple(traced_backbone(name, model, weights_id, transform, layer, p, tracer_kwargs, preprocessing, extra,
                                  digest, nodes=nodes, raw=out[key]) for (layer, p), key in zip(checked, keys))
    return parts, nodes, (graph, writes)


def traced_joint(name: str, model: nn.Module, weights_id: str, transform: Callable, layers: list[str | None],
                 pool: str | None, tracer_kwargs: dict | None = None, preprocessing: dict | None = None,
                 extra: tuple[str, ...] = ()) -> Joint:
    """``layers`` of a traceable ``model``, each cut as ``traced_backbone`` cuts it, all in one traced pass."""
    parts, nodes, probed = traced_parts(name, model, weights_id, transform, layers, pool, tracer_kwargs,
                                        preprocessing, extra)
    return Joint(parts, traced_pass(model, parts, tracer_kwargs or {}, nodes, probed))


def _graph(model: nn.Module, nodes: list[str], tracer_kwargs: dict) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_feature_extractor(model.eval(), return_nodes=list(dict.fromkeys(nodes)),
                                        tracer_kwargs=tracer_kwargs)


def traced_pass(model: nn.Module, parts: tuple[Backbone, ...], tracer_kwargs: dict, nodes: list[str] | None = None,
                probed: tuple[nn.Module, dict] | None = None) -> nn.Module:
    """The model that computes ``parts`` (traced cuts of ``model``) together, each exactly as its own cut does.

    ``nodes``: the model's traced node names; ``probed``: the graph that returns every part's node and the
    writes ``exact.written`` found in it, when the caller has them. One traced graph returns every part's
    node, copied right after it runs; a part that an in-place
    write of a node it does not run alone would reach is computed on its own (see ``exact``).
    """
    nodes = exact.resolve_all(nodes or _node_names(model, tracer_kwargs), [p.layer for p in parts])
    if probed is None:
        graph = _graph(model, nodes, tracer_kwargs)
        crop = crop_of(parts[0].preprocessing)
        writes, _ = exact.written(graph, torch.zeros(1, 3, crop, crop))
    else:  # the graph of these parts' nodes and its writes, from the caller's probe
        graph, writes = probed
    own = exact.needs_own_pass(graph.graph, [exact.alone_graph(p.model) for p in parts], writes)
    shared = [i for i, o in enumerate(own) if not o]
    if not shared:
        return Separate([p.model for p in parts]).eval()
    if len(shared) < len(parts):  # fewer outputs, fewer nodes: no new write can reach the rest
        graph = _graph(model, [nodes[i] for i in shared], tracer_kwargs)
    one = FxJoint(exact.snapshot(graph), [nodes[i] for i in shared], [parts[i].pool for i in shared])
    one = one.eval().requires_grad_(False)
    if len(shared) == len(parts):
        return one
    alone = [i for i, o in enumerate(own) if o]
    return Assembled([one] + [Separate([parts[i].model]) for i in alone], [shared] + [[i] for i in alone]).eval()


def rest_after(model: nn.Module, name: str, layer: str, n_classes: int,
               tracer_kwargs: dict | None = None) -> tuple[nn.Module, str]:
    """The network after ``layer`` with its pretrained weights, its last Linear replaced for ``n_classes``.

    Returns the module (cached features → logits) and the qualified name of the new layer.
    vgg16 cut at ``features`` gives the classifier block; resnet cut at ``layer3`` gives
    ``layer4`` + pooling + a new ``fc``.
    """
    import torch.fx as fx
    from torchvision.models.feature_extraction import NodePathTracer

    model.eval()
    tracer = NodePathTracer(**(tracer_kwargs or {}))
    graph = tracer.trace(model)
    qual = tracer.node_to_qualname
    nodes = list(graph.nodes)
    cut = [i for i, n in enumerate(nodes) if qual.get(n) == layer or str(qual.get(n, "")).startswith(layer + ".")]
    if not cut:
        raise UnknownLayer(f"Unknown layer {layer!r} for {name}. See: featcache layers {name}")
    cut_at = cut[-1]
    new = fx.Graph()
    env: dict = {nodes[cut_at]: new.placeholder("features")}
    for node in nodes[cut_at + 1 :]:
        for inp in node.all_input_nodes:
            if inp in env:
                continue
            if inp.op == "get_attr":
                env[inp] = new.node_copy(inp)
            else:
                raise UnknownLayer(
                    f"the network after {layer!r} also reads {qual.get(inp, inp.name)!r}, so it cannot be trained "
                    f"from features cut at {layer!r} alone; cut at a block boundary (see: featcache layers {name})"
                )
        if node.op == "output":
            new.output(env[node.args[0]] if isinstance(node.args[0], fx.Node) else node.args[0])
            break
        env[node] = new.node_copy(node, lambda a: env[a])
    rest = fx.GraphModule(model, new)
    linears = [n.target for n in rest.graph.nodes if n.op == "call_module" and isinstance(rest.get_submodule(n.target), nn.Linear)]
    if not linears:
        raise UnknownLayer(f"nothing after {layer!r} in {name} ends in a Linear layer to replace")
    last = linears[-1]
    old = rest.get_submodule(last)
    parent, _, attr = last.rpartition(".")
    with seeded():
        setattr(rest.get_submodule(parent) if parent else rest, attr, nn.Linear(old.in_features, n_classes))
    rest.delete_all_unused_submodules()
    return rest, last
