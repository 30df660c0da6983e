"""``hf:NAME_OR_DIR``: a Hugging Face vision model by hub id or local folder (``AutoModel``).

Preprocessing is the model's own ``AutoImageProcessor``, recorded from its config. Layers are
named after the model's outputs, never found by fx tracing: ``pooler_output`` (the default
when the model has one), ``last_hidden_state``, ``cls`` (its first token, for token models), ``mean`` (its mean
over tokens or positions) and ``hidden_states.N`` (``output_hidden_states``; 0 is the
embedding). Weights load from safetensors only, and no code from the hub is ever run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..errors import UnknownBackbone, UnknownLayer, WeightsError
from .base import INIT_SEED, Backbone, Joint, load_weights_file, pool_map, seeded, state_digest
from .hub import offline_hint, offline_unless_reachable

__all__ = ["PREFIX", "HFCut", "HFJoint", "ProcessorTransform", "create", "create_joint", "layer_names", "layer_shapes", "check", "rebuildable"]

PREFIX = "hf"
_VALUES = "(--weights for a Hugging Face model takes DEFAULT, none, or a local .safetensors file)"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_NAMED = ("pooler_output", "last_hidden_state", "cls", "mean")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UnknownBackbone(
            "hf: backbones need transformers: pip install 'featcache[hf]' (or: pip install transformers)"
        ) from None
    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar would cut through featcache's lines
    transformers.utils.logging.set_verbosity_error()  # and its load report ("UNEXPECTED ... can be ignored") too
    return transformers


def rebuildable(name: str) -> bool:
    """True for a hub id; a local folder (or anything that names one here) is loaded only when the user names it."""
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists() and ".." not in name


class ProcessorTransform:
    """PIL image → the processor's ``pixel_values`` for it, (3, H, W)."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"ProcessorTransform({type(self.processor).__name__})"


def _select(out: Any, layer: str, pool: str) -> torch.Tensor:
    """The output named ``layer`` of one forward pass, pooled if it is a spatial map and ``pool`` asks for it."""
    if layer.startswith("hidden_states."):
        y = out.hidden_states[int(layer.split(".", 1)[1])]
    elif layer == "pooler_output":
        y = out.pooler_output
    else:
        y = out.last_hidden_state
        if layer == "cls":
            y = y[:, 0]
        elif layer == "mean":
            y = y.mean(dim=1) if y.ndim == 3 else y.mean(dim=tuple(range(2, y.ndim)))
    if y.ndim == 4 and tuple(y.shape[2:]) == (1, 1):  # a pooled map (ResNetModel's pooler) is a vector
        y = y.flatten(1)
    return pool_map(y, pool)


class HFCut(nn.Module):
    """The model's output named ``layer``, pooled if it is a spatial map and ``pool`` asks for it."""

    def __init__(self, model: nn.Module, layer: str, pool: str):
        super().__init__()
        self.model, self.layer, self.pool = model, layer, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.layer.startswith("hidden_states.")
        return _select(self.model(pixel_values=x, output_hidden_states=hidden, return_dict=True), self.layer, self.pool)


class HFJoint(nn.Module):
    """Several outputs of one forward pass, each as its own ``HFCut`` returns it."""

    def __init__(self, model: nn.Module, layers: list[str], pools: list[str]):
        super().__init__()
        self.model, self.layers, self.pools = model, layers, pools

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = any(n.startswith("hidden_states.") for n in self.layers)
        out = self.model(pixel_values=x, output_hidden_states=hidden, return_dict=True)
        return tuple(_select(out, n, p) for n, p in zip(self.layers, self.pools))


def check(name: str) -> None:
    """Fail fast when transformers is missing."""
    _transformers()


def _load(name: str, weights: str | None) -> tuple[nn.Module, Any, str]:
    tf = _transformers()
    local = Path(name).expanduser().is_dir()
    where = f"hf:{name}"
    if not local and not _HUB_ID.match(name):
        raise UnknownBackbone(f"{where} is neither a folder here nor a Hugging Face hub id (owner/name): "
                              "pass --backbone hf:FOLDER with config.json, preprocessor_config.json and "
                              "model.safetensors, or hf:OWNER/NAME")
    offline = not local and offline_unless_reachable()
    missing: list[str] = []
    try:
        processor = tf.AutoImageProcessor.from_pretrained(name, trust_remote_code=False)
        if weights == "DEFAULT":
            model, info = tf.AutoModel.from_pretrained(name, use_safetensors=True, trust_remote_code=False,
                                                       dtype=torch.float32, output_loading_info=True)
            missing = sorted(info.get("missing_keys") or ())  # transformers starts them at random
            if missing and all(k.startswith("pooler.") for k in missing):
                # a classifier's checkpoint (ViTForImageClassification, ...) holds no pooler: the model
                # without one gives the same hidden states, and its default layer is the first token
                try:
                    model, info = tf.AutoModel.from_pretrained(name, use_safetensors=True, trust_remote_code=False,
                                                               dtype=torch.float32, output_loading_info=True,
                                                               add_pooling_layer=False)
                    missing = sorted(info.get("missing_keys") or ())
                except TypeError:  # a model class without that switch: refused below
                    pass
            weights_id = f"hf-dir:{Path(name).name}" if local else f"hf:{name}"
        else:
            config = tf.AutoConfig.from_pretrained(name, trust_remote_code=False)
            with seeded():
                model = tf.AutoModel.from_config(config, trust_remote_code=False)
            model = model.float()
            weights_id = f"none(seed={INIT_SEED})"
    except RuntimeError as e:  # transformers refuses weights whose shapes are not those of the config
        text = " ".join(str(e).split())
        first = "the shapes of its layers differ" if "mismatch" in text.lower() else text[:300]
        raise WeightsError(f"the weights of {where} do not fit its config.json ({first}); use the config.json "
                           "saved with these weights (save_pretrained writes both)") from None
    except (OSError, ValueError, KeyError) as e:  # no such id or folder, no network, no safetensors, unknown type
        first = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        hint = ("it must hold config.json, preprocessor_config.json and model.safetensors (featcache loads no "
                "pickled .bin weights)" if local else offline_hint(name, "--backbone hf:DIR") if offline else
                f"with no network, download it elsewhere (hf download {name} --local-dir DIR) and pass --backbone hf:DIR")
        if offline:  # the client's own text (a missing preprocessor_config.json, ...) would mislead here
            raise UnknownBackbone(f"cannot load the Hugging Face model {where}: {hint}") from None
        raise UnknownBackbone(f"cannot load the Hugging Face model {where}: {first}; {hint}") from None
    if missing:  # rows from randomly started parameters: nobody could compute them again
        raise WeightsError(f"the weights of {where} do not fit its config.json: {len(missing)} parameters are not in "
                           f"them ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); use the config.json "
                           "saved with these weights (save_pretrained writes both)")
    _check_sizes(processor, where)
    if weights not in (None, "DEFAULT"):
        if Path(weights).suffix != ".safetensors":
            raise WeightsError(f"unknown weights {weights!r} for {where} {_VALUES}", param="weights")
        load_weights_file(model, weights, _VALUES)
        weights_id = f"file:{Path(weights).name}"
    return model.eval(), processor, weights_id


MAX_SIDE = 4096  # pixels: above any vision model's input (SAM: 1024); a bigger size is a damaged config


def _check_sizes(processor: Any, where: str) -> None:
    """Refuse a processor whose image size is not a plausible one (it would allocate gigabytes per image)."""
    config = processor.to_dict()
    for key in ("size", "crop_size"):
        value = config.get(key)
        sides = value.values() if isinstance(value, dict) else [value]
        for side in sides:
            if side is not None and (not isinstance(side, int) or isinstance(side, bool) or not 0 < side <= MAX_SIDE):
                raise UnknownBackbone(f"{where}: its image processor's {key} {value!r} is not an image size of 1 to "
                                      f"{MAX_SIDE} pixels; fix preprocessor_config.json (the model's own is saved with "
                                      "it by save_pretrained)")


def _plain(value: Any) -> Any:
    """The processor's config as JSON values (tuples as lists, anything else by its repr)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _backend(processor: Any) -> str:
    """Which library resizes and normalises: ``torchvision`` or ``pil`` (they differ at float16-rounding level)."""
    backend = getattr(processor, "backend", None)
    if isinstance(backend, str):
        return backend
    return "torchvision" if type(processor).__name__.endswith("Fast") else "pil"


def _preprocessing(processor: Any, size: list[int]) -> dict:
    config = _plain(processor.to_dict())
    cls = type(processor)
    return {"transform": cls.__name__, "processor": config, "crop_size": size,
            "mean": _plain(config.get("image_mean")), "std": _plain(config.get("image_std")),
            "backend": _backend(processor), "processor_class": f"{cls.__module__}.{cls.__qualname__}"}


# config fields that name or label the model but never change what its base model computes: where it was
# read from, which transformers wrote the file, the task heads' classes, the dtype on disk (featcache
# always computes in float32)
_NAMING = frozenset({"_name_or_path", "transformers_version", "architectures", "id2label", "label2id", "dtype",
                     "torch_dtype", "_commit_hash"})


def _effective(config: Any) -> Any:
    """The config as loaded, without the naming fields, at every level (vision sub-configs too)."""
    if isinstance(config, dict):
        return {k: _effective(v) for k, v in config.items() if k not in _NAMING}
    if isinstance(config, (list, tuple)):
        return [_effective(v) for v in config]
    return config


def _network(model: nn.Module) -> dict:
    """What fixes the network besides its weights: the effective config (an edited activation or layer-norm
    eps changes every row), the attention implementation in use, and the transformers version that holds the
    model's code and its image processors."""
    config = model.config
    return {"library": "transformers", "version": _transformers().__version__,
            "config": _plain(_effective(config.to_dict())),
            "attn_implementation": _plain(getattr(config, "_attn_implementation", None))}


def _probe(model: nn.Module, processor: Any) -> tuple[torch.Tensor, Any]:
    x = ProcessorTransform(processor)(Image.new("RGB", (256, 256), (128, 128, 128)))[None]
    with torch.no_grad():
        return x, model(pixel_values=x, output_hidden_states=True, return_dict=True)


def _layers(out: Any) -> list[str]:
    names = [n for n in _NAMED if (n != "pooler_output" or getattr(out, "pooler_output", None) is not None)
             and (n != "cls" or out.last_hidden_state.ndim == 3)]  # a first token only where there are tokens
    return names + [f"hidden_states.{i}" for i in range(len(out.hidden_states or ()))]


def _cut(name: str, model: nn.Module, processor: Any, weights_id: str, x: torch.Tensor, out: Any, layer: str | None,
         pool: str | None, digest: str) -> Backbone:
    layers = _layers(out)
    if layer is None:
        layer = layers[0] if layers[0] == "pooler_output" else ("cls" if out.last_hidden_state.ndim == 3 else "mean")
        pool = pool or "avg"
    elif layer not in layers:
        raise UnknownLayer(f"Unknown layer {layer!r} for hf:{name}. Layers: {', '.join(layers)}. "
                           f"See: featcache layers hf:{name}")
    cut = HFCut(model, layer, "none").eval().requires_grad_(False)
    with torch.no_grad():
        raw = cut(x)
    pool = (pool or "none") if raw.ndim == 4 else "none"
    cut.pool = pool
    shape = (raw.shape[1],) if pool != "none" else tuple(raw.shape[1:])
    return Backbone(name=f"{PREFIX}:{name}", layer=layer, pool=pool, model=cut, transform=ProcessorTransform(processor),
                    weights_id=weights_id, weights_sha256=digest,
                    preprocessing=_preprocessing(processor, list(x.shape[-2:])), shape=shape, network=_network(model))


def create(name: str, layer: str | None, weights: str | None, pool: str | None) -> Backbone:
    """The Hugging Face model ``name`` cut at the output ``layer`` (default: its pooled output)."""
    model, processor, weights_id = _load(name, weights)
    x, out = _probe(model, processor)
    return _cut(name, model, processor, weights_id, x, out, layer, pool, state_digest(model))


def create_joint(name: str, layers: list[str | None], weights: str | None, pool: str | None) -> Joint:
    """Several outputs of the Hugging Face model ``name`` from one forward pass."""
    model, processor, weights_id = _load(name, weights)
    x, out = _probe(model, processor)
    digest = state_digest(model)
    parts = tuple(_cut(name, model, processor, weights_id, x, out, layer, pool, digest) for layer in layers)
    joint = HFJoint(model, [p.layer for p in parts], [p.pool for p in parts])
    return Joint(parts, joint.eval().requires_grad_(False))


def layer_names(name: str) -> tuple[list[str], str]:
    """(every layer ``--layer`` accepts, the default) for ``hf:NAME``."""
    model, processor, _ = _load(name, None)
    _, out = _probe(model, processor)
    layers = _layers(out)
    return layers, layers[0] if layers[0] == "pooler_output" else ("cls" if out.last_hidden_state.ndim == 3 else "mean")


def layer_shapes(name: str) -> tuple[list[tuple[str, tuple[int, ...] | None]], str]:
    """(each layer with its output shape for the processor's input size, the default)."""
    model, processor, _ = _load(name, None)
    x, _ = _probe(model, processor)
    layers, default = layer_names(name)
    with torch.no_grad():
        return [(n, tuple(HFCut(model, n, "none")(x).shape[1:])) for n in layers], default
