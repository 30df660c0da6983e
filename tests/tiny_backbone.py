"""A tiny CNN for fast tests, used as ``--backbone tests.tiny_backbone:tiny_cnn``."""

import time

import torch
from torch import nn
from torchvision.transforms._presets import ImageClassification


class TinyCNN(nn.Module):
    transforms = ImageClassification(crop_size=32, resize_size=32)

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()
        )
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def tiny_cnn() -> nn.Module:
    return TinyCNN()


def _pause(x):
    time.sleep(0.1)
    return x


torch.fx.wrap("_pause")  # kept as a call in the traced graph, so it runs on every batch


class SlowTinyCNN(TinyCNN):
    """TinyCNN that takes a while per batch, so a test can interrupt an extract midway."""

    def forward(self, x):
        return super().forward(_pause(x))


def slow_tiny_cnn() -> nn.Module:
    return SlowTinyCNN()


class _Scale(nn.Module):
    def forward(self, x):
        return x * 1e6


class HugeTinyCNN(TinyCNN):
    """TinyCNN whose ``features`` exceed float16's range (65504)."""

    def __init__(self):
        super().__init__()
        self.features.append(_Scale())


def huge_tiny_cnn() -> nn.Module:
    return HugeTinyCNN()


def bare_cnn() -> nn.Module:
    """A network without a ``transforms`` attribute: its preprocessing is unknown."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def _nap(x):
    time.sleep(0.05)
    return x


torch.fx.wrap("_nap")


class _Wait(nn.Module):
    def forward(self, x):
        return _nap(x)


def stepped_tiny_cnn() -> nn.Module:
    """TinyCNN whose forward takes a while, spread over its modules (for progress shown within a batch)."""
    m = TinyCNN()
    m.features = nn.Sequential(*(layer for conv in m.features for layer in (conv, _Wait())))
    return m


class _Shrink(nn.Module):
    def forward(self, x):
        return x * 1e-9


class TinyTinyCNN(TinyCNN):
    """TinyCNN whose ``features`` are about 1e-9: below float16's smallest subnormal (6e-8), so they cast to 0."""

    def __init__(self):
        super().__init__()
        self.features.append(_Shrink())


def tiny_tiny_cnn() -> nn.Module:
    return TinyTinyCNN()
