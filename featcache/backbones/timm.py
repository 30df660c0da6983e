"""``timm:NAME``: any ``timm.list_models()`` name (a pretrained tag allowed, ``vit_tiny_patch16_224.augreg_in21k``).

Preprocessing is timm's own: ``resolve_model_data_config`` + ``create_transform``, recorded
in full. The default layer ``pre_logits`` is timm's embedding, ``forward_head(pre_logits=True)``
(what ``num_classes=0`` returns); any other layer is a node or module name, cut with timm's
fx settings (``featcache layers timm:NAME``).
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UnknownBackbone, UnknownLayer, WeightsError
from . import exact
from . import torchvision as tv
from .base import INIT_SEED, Assembled, Backbone, Joint, Separate, load_weights_file, pool_map, seeded, state_digest
from .hub import offline_hint, offline_unless_reachable

__all__ = ["PREFIX", "EMBEDDING", "TimmEmbedding", "EmbeddingJoint", "create", "create_joint", "rest_after", "layer_names",
           "layer_shapes", "check", "tracer_kwargs"]

PREFIX = "timm"
EMBEDDING = "pre_logits"
_VALUES = "(--weights for a timm model takes DEFAULT, none, or a local .safetensors/.pth/.bin file)"


def _timm() -> Any:
    try:
        import timm
        import timm.data
    except ImportError:
        raise UnknownBackbone("timm: backbones need timm: pip install 'featcache[timm]' (or: pip install timm)") from None
    return timm


class TimmEmbedding(nn.Module):
    """timm's documented embedding: ``forward_head(forward_features(x), pre_logits=True)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def check(name: str) -> None:
    """Fail fast on a name timm does not know, listing the closest ones."""
    timm = _timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        raise UnknownBackbone(
            f"Unknown timm model {name!r}{'; closest: ' + ', '.join('timm:' + c for c in close) if close else ''}. "
            "All names: python -c \"import timm; print(timm.list_models('*PATTERN*'))\""
        )
    arch, _, tag = name.partition(".")
    if tag:  # timm knows the architecture; the pretrained tag must be one of its own
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        if tag not in tags:
            raise UnknownBackbone(
                f"timm model {arch} has no pretrained tag {tag!r}; "
                + (f"its tags: {', '.join(tags[:8])}{', ...' if len(tags) > 8 else ''} (timm:{arch}.{tags[0]}), "
                   if tags else "it has no pretrained tags; ")
                + f"or pass timm:{arch} for its default"
            )


def tracer_kwargs() -> dict:
    """timm's own fx settings (the modules and functions it keeps whole when tracing)."""
    from timm.models._features_fx import get_notrace_functions, get_notrace_modules

    return {"leaf_modules": list(get_notrace_modules()), "autowrap_functions": list(get_notrace_functions())}


def _load(name: str, weights: str | None) -> tuple[nn.Module, str]:
    timm = _timm()
    check(name)
    if weights is None or weights != "DEFAULT":
        if weights is not None and not (Path(weights).suffix in (".safetensors", ".pth", ".pt", ".bin")
                                        or Path(weights).is_file()):
            raise WeightsError(f"unknown weights {weights!r} for timm:{name} {_VALUES}", param="weights")
        with seeded():
            model = timm.create_model(name, pretrained=False)
        if weights is None:
            return model, f"none(seed={INIT_SEED})"
        load_weights_file(model, weights, _VALUES)
        return model, f"file:{Path(weights).name}"
    offline = offline_unless_reachable()
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:  # no network, no such tag, a hub error: timm's loader raises many types
        hub = timm.models.get_pretrained_cfg(name.split(".")[0])
        hub_id = getattr(hub, "hf_hub_id", None) if hub is not None else None
        if offline and hub_id:
            raise WeightsError(f"cannot load timm's pretrained weights for {name}: "
                               f"{offline_hint(hub_id, '--weights DIR/model.safetensors')}", param="weights") from None
        raise WeightsError(
            f"could not get timm's pretrained weights for {name} ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). With no network, download "
            f"{'https://huggingface.co/' + hub_id + '/blob/main/model.safetensors' if hub_id else 'the weights'} "
            "elsewhere and pass --weights /path/to/model.safetensors",
            param="weights",
        ) from None
    cfg = model.pretrained_cfg
    return model, f"timm:{cfg.get('architecture', name)}.{cfg.get('tag', '')}".rstrip(".")


def _preprocessing(timm: Any, model: nn.Module) -> tuple[Callable, dict]:
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config, is_training=False)
    size = list(config["input_size"][1:])
    return transform, {
        "transform": "timm.data.create_transform",
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "crop_size": size,
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        "repr": repr(transform),
    }


def _cut(full: str, model: nn.Module, weights_id: str, transform: Callable, preprocessing: dict, layer: str | None,
         pool: str | None, digest: str) -> Backbone:
    if layer not in (None, EMBEDDING):
        return tv.traced_backbone(full, model, weights_id, transform, layer, pool, tracer_kwargs(), preprocessing,
                                  extra=(EMBEDDING,), digest=digest)
    cut = TimmEmbedding(model).eval().requires_grad_(False)
    with torch.no_grad():
        out = cut(torch.zeros(1, 3, *preprocessing["crop_size"]))
    return Backbone(name=full, layer=EMBEDDING, pool="none", model=cut, transform=transform, weights_id=weights_id,
                    weights_sha256=digest, preprocessing=preprocessing, shape=tuple(out.shape[1:]))


def create(name: str, layer: str | None, weights: str | None, pool: str | None) -> Backbone:
    """The timm model ``name`` cut at ``layer`` (default: its pooled embedding)."""
    timm = _timm()
    model, weights_id = _load(name, weights)
    model.eval()
    transform, preprocessing = _preprocessing(timm, model)
    return _cut(f"{PREFIX}:{name}", model, weights_id, transform, preprocessing, layer, pool, state_digest(model))


class EmbeddingJoint(nn.Module):
    """The embedding and the outputs of module calls, from one forward pass (forward hooks).

    ``calls`` names, for each layer but the embedding, the module and which of its calls (0: the first)
    gives that layer's node; the output is copied in the hook, before any later in-place op reaches it.
    """

    def __init__(self, model: nn.Module, layers: list[str], calls: list[tuple[str, int] | None], pools: list[str]):
        super().__init__()
        self.model, self.layers, self.calls, self.pools = model, layers, calls, pools

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        embedding, seen = self.run(x)
        return tuple(embedding if c is None else pool_map(seen[c], p) for c, p in zip(self.calls, self.pools))

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[tuple[str, int], torch.Tensor]]:
        """(the embedding, a copy of each wanted call's output that took place)."""
        wanted = {c for c in self.calls if c is not None}
        seen: dict[tuple[str, int], torch.Tensor] = {}
        count: dict[str, int] = {}

        def hook(name: str, out: Any) -> None:
            k = count[name] = count.get(name, -1) + 1
            if (name, k) in wanted and isinstance(out, torch.Tensor):
                seen[(name, k)] = out.clone()

        hooks = [self.model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: hook(n, o))
                 for n in dict.fromkeys(name for name, _ in wanted)]
        try:
            embedding = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        finally:
            for h in hooks:
                h.remove()
        return embedding, seen


def _module_call(node: str, modules: dict) -> tuple[str, int] | None:
    """(module, call) whose output is the traced node ``node`` (``act_1`` is the second call of ``act``), or None."""
    if node in modules:
        return node, 0
    base, _, k = node.rpartition("_")
    return (base, int(k)) if k.isdigit() and base in modules else None


def _embedding_pass(model: nn.Module, parts: tuple[Backbone, ...], size: list[int]) -> nn.Module:
    """The embedding's own forward, with hooks on the module calls that give the other parts' nodes. A part
    with no such call, one that an in-place write of a node it does not run alone reaches, or one whose hooked
    value differs from its own cut on a random probe is computed in one traced pass of those parts."""
    kw = tracer_kwargs()
    emb = [i for i, p in enumerate(parts) if p.layer == EMBEDDING]
    inner = [i for i, p in enumerate(parts) if p.layer != EMBEDDING]
    nodes = tv._node_names(model, kw)
    qual = exact.resolve_all(nodes, [parts[i].layer for i in inner])
    modules = dict(model.named_modules())
    calls = {i: _module_call(q, modules) for i, q in zip(inner, qual)}
    whole = tv._graph(model, nodes, kw)  # every node returned: the network as the eager pass runs it
    writes, _ = exact.written(whole, torch.zeros(1, 3, *size))
    own = exact.needs_own_pass(whole.graph, [exact.alone_graph(parts[i].model) for i in inner], writes)
    hooked = [i for i, o in zip(inner, own) if not o and calls[i] is not None]
    key = dict(zip(inner, qual))
    if hooked:  # each hooked value against the traced nodes (what each part alone computes) on a random probe
        with seeded(), torch.no_grad():
            probe = torch.rand(1, 3, *size)
            _, seen = EmbeddingJoint(model, [], [calls[i] for i in hooked], []).run(probe)
            traced = exact.snapshot(tv._graph(model, [key[i] for i in hooked], kw))(probe)
        hooked = [i for i in hooked if calls[i] in seen  # a module the embedding's forward never calls: no hook
                  and torch.equal(seen[calls[i]], traced[key[i]])]
    places = emb + hooked
    joint = EmbeddingJoint(model, [parts[i].layer for i in places], [None] * len(emb) + [calls[i] for i in hooked],
                           [parts[i].pool for i in places]).eval().requires_grad_(False)
    rest = [i for i in inner if i not in hooked]
    if not rest:
        return Assembled([joint], [places]).eval()
    return Assembled([joint, tv.traced_pass(model, tuple(parts[i] for i in rest), kw, nodes)], [places, rest]).eval()


def create_joint(name: str, layers: list[str | None], weights: str | None, pool: str | None) -> Joint:
    """Several layers of one timm model in one pass: one traced graph for inner layers; the embedding
    with hooks on the module calls asked for beside it (what no hook can serve exactly: one more traced pass)."""
    timm = _timm()
    model, weights_id = _load(name, weights)
    model.eval()
    transform, preprocessing = _preprocessing(timm, model)
    full = f"{PREFIX}:{name}"
    if all(layer not in (None, EMBEDDING) for layer in layers):
        return tv.traced_joint(full, model, weights_id, transform, layers, pool, tracer_kwargs(), preprocessing,
                               extra=(EMBEDDING,))
    digest = state_digest(model)
    inner = [layer for layer in layers if layer not in (None, EMBEDDING)]
    if not inner:
        parts = tuple(_cut(full, model, weights_id, transform, preprocessing, layer, pool, digest) for layer in layers)
        return Joint(parts, Separate([p.model for p in parts]).eval())
    cuts = iter(tv.traced_parts(full, model, weights_id, transform, inner, pool, tracer_kwargs(), preprocessing,
                                (EMBEDDING,), digest)[0])
    parts = tuple(_cut(full, model, weights_id, transform, preprocessing, layer, pool, digest)
                  if layer in (None, EMBEDDING) else next(cuts) for layer in layers)
    return Joint(parts, _embedding_pass(model, parts, preprocessing["crop_size"]))


def rest_after(name: str, layer: str | None, weights: str | None, n_classes: int) -> tuple[nn.Module, str]:
    """What comes after ``layer`` in the timm model, pretrained, its last Linear replaced for ``n_classes``:
    after ``pre_logits`` (the default) a new classifier alone; after an inner layer the traced rest."""
    _timm()
    model, _ = _load(name, weights)
    model.eval()
    if layer not in (None, EMBEDDING):
        return tv.rest_after(model, f"{PREFIX}:{name}", layer, n_classes, tracer_kwargs())
    size = _preprocessing(_timm(), model)[1]["crop_size"]
    with torch.no_grad():
        out = TimmEmbedding(model)(torch.zeros(1, 3, *size))
    if out.ndim != 2:
        raise UnknownLayer(f"timm:{name}'s {EMBEDDING} is not a vector ({tuple(out.shape[1:])}), so no classifier "
                           f"follows it; extract with --layer LAYER --pool none (see: featcache layers timm:{name})")
    with seeded():
        fc = nn.Linear(out.shape[1], n_classes)
    return nn.Sequential(OrderedDict(fc=fc)), "fc"


def layer_names(name: str) -> tuple[list[str], str]:
    """(every layer ``--layer`` accepts, the default) for ``timm:NAME``."""
    model, _ = _load(name, None)
    try:
        layers, _ = tv.traced_layers(model, tracer_kwargs())
    except Exception:  # not traceable: only the embedding
        layers = []
    return [EMBEDDING] + layers, EMBEDDING




def layer_shapes(name: str) -> tuple[list[tuple[str, tuple[int, ...] | None]], str]:
    """(each layer with its output shape for the model's own input size, the default)."""
    timm = _timm()
    model, _ = _load(name, None)
    model.eval()
    _, preprocessing = _preprocessing(timm, model)
    size = tuple(preprocessing["crop_size"])
    with torch.no_grad():
        embedding = tuple(TimmEmbedding(model)(torch.zeros(1, 3, *size)).shape[1:])
    try:
        layers, _ = tv.traced_layers(model, tracer_kwargs())
        shapes = tv.traced_shapes(model, size, tracer_kwargs())
    except Exception:  # not traceable: only the embedding
        layers, shapes = [], {}
    # what a timm user looks for first: the embedding, then the stages timm itself names (feature_info, the
    # outputs features_only returns), then every other node; nodes that are no image's output (parameters,
    # constants) are left out of the listing
    stages = [info.get("module") for info in getattr(model, "feature_info", None) or [] if isinstance(info, dict)]
    image = lambda n: bool(shapes.get(n))
    stages = [n for n in dict.fromkeys(stages) if image(n)]
    rest = [n for n in layers if n not in stages and image(n)]
    return [(EMBEDDING, embedding)] + [(n, shapes[n]) for n in stages + rest], EMBEDDING
