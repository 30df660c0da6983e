"""What every backbone source shares: the ``Backbone`` record, weights files, digests, precision.

A source (``torchvision.py``, ``lite.py``, ``factory.py``, ``timm.py``, ``hf.py``) turns a
name into a ``Backbone``; ``registry.py`` picks the source from the name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError

__all__ = [
    "POOLS",
    "PRECISIONS",
    "INIT_SEED",
    "Backbone",
    "Joint",
    "Separate",
    "Assembled",
    "autocast",
    "resolve_precision",
    "seeded",
    "state_digest",
    "load_weights_file",
    "pool_map",
    "describe_transform",
]

from ..choices import POOLS, PRECISIONS

INIT_SEED = 0  # random-init ("none") weights are seeded so the same name means the same network
WEIGHTS_VALUES = "(--weights takes DEFAULT, a torchvision weights name, none, or a state-dict file)"


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
    network: dict | None = None

    def provenance(self) -> dict:
        """What makes two feature sets comparable; its hash keys the feature space.

        Besides the name, layer, weights digest, preprocessing as applied, pool and shape, a
        source whose network is not fixed by its name and weights records what else fixes it
        under ``network`` (a Hugging Face model: its effective config, attention implementation
        and the transformers version, whose model code and image processors the network *is*).
        The versions of torch, torchvision, timm and Pillow are recorded with each set
        (``versions``) but not keyed: for a fixed name, weights digest and recorded preprocessing,
        their releases change values at rounding level (kernels, decoders), which verify's
        tolerance covers, and keying them would make every upgrade re-extract every shared store;
        a release that changed a model's semantics is what ``verify --data`` reports. ``network``
        is left out when a source has none, so those spaces keep the keys they always had.
        """
        prov = {
            "backbone": self.name,
            "layer": self.layer,
            "weights": {"id": self.weights_id, "sha256": self.weights_sha256},
            "preprocessing": self.preprocessing,
            "pool": self.pool,
            "shape": list(self.shape),
        }
        if self.network is not None:
            prov["network"] = self.network
        return prov


@dataclass
class Joint:
    """Several cuts of one network computed in one forward pass: ``model(batch)`` returns a tuple
    with one tensor per part, in order, each exactly what that part's own ``model`` returns."""

    parts: tuple[Backbone, ...]
    model: nn.Module

    @property
    def transform(self) -> Callable:
        return self.parts[0].transform


class Separate(nn.Module):
    """Each cut on its own, one after the other: for layers that one pass cannot serve together."""

    def __init__(self, cuts: list[nn.Module]):
        super().__init__()
        self.cuts = nn.ModuleList(cuts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(cut(x) for cut in self.cuts)


class Assembled(nn.Module):
    """Parts computed by several passes, put back in the order asked: each pass returns a tuple with its
    parts' outputs, ``places`` says which parts those are."""

    def __init__(self, passes: list[nn.Module], places: list[list[int]]):
        super().__init__()
        self.passes = nn.ModuleList(passes)
        self.places = [list(p) for p in places]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out: dict[int, torch.Tensor] = {}
        for one, places in zip(self.passes, self.places):
            out.update(zip(places, one(x)))
        return tuple(out[i] for i in range(len(out)))


@contextmanager
def seeded(seed: int = INIT_SEED) -> Iterator[None]:
    """Random init under a fixed seed, without disturbing the caller's generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def pool_map(out: torch.Tensor, pool: str) -> torch.Tensor:
    """Pool a spatial map (N, C, H, W) to (N, C); anything else is returned as it is."""
    if out.ndim == 4 and pool == "avg":
        return torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
    if out.ndim == 4 and pool == "max":
        return torch.flatten(nn.functional.adaptive_max_pool2d(out, 1), 1)
    return out


def state_digest(model: nn.Module) -> str:
    """SHA-256 over the state dict's names, dtypes, shapes and bytes (what the network computes)."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_state_file(path: str | Path, values: str = WEIGHTS_VALUES) -> dict:
    """A plain state dict from a ``.safetensors`` file or a torch file (``weights_only=True``); never pickle."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist {values}", param="weights")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise several types for a bad or unsafe file
        raise WeightsError(
            f"cannot load weights from {str(path)!r}: {e.__class__.__name__}: {str(e).splitlines()[0]}. "
            "featcache loads only plain state dicts (safetensors, or torch.load with weights_only=True).",
            param="weights",
        ) from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict", param="weights")
    return state


def load_weights_file(model: nn.Module, path: str | Path, values: str = WEIGHTS_VALUES) -> None:
    """Load a state-dict file into ``model``; every key must fit."""
    state = read_state_file(path, values)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise WeightsError(
            f"weights in {str(path)!r} do not fit this architecture: {str(e).splitlines()[0]}", param="weights"
        ) from None


def describe_transform(transform: Callable) -> dict:
    """The recorded preprocessing of a torchvision preset, or of any callable by its repr."""
    from torchvision.transforms._presets import ImageClassification  # here: torchvision takes 1.5 s to import

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
