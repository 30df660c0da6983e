"""``linear``: one Linear(D, C) layer on flat features (softmax regression trained by SGD/Adam)."""

from __future__ import annotations

from torch import nn

from .base import TorchHead

__all__ = ["LinearHead"]


class LinearHead(TorchHead):
    """Linear(D, C), started at zeros and trained with cross-entropy; streams sets larger than memory."""

    name = "linear"

    def __init__(self, lr: float = 1e-3, optimizer: str = "adam", momentum: float = 0.9, weight_decay: float = 0.0,
                 step_size: int = 10, gamma: float = 0.1, epochs: int = 30, batch_size: int = 64, patience: int = 10,
                 seed: int = 0, device: str = "auto"):
        self.lr = lr
        self.optimizer = optimizer
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.step_size = step_size
        self.gamma = gamma
        self.epochs = epochs
        self.batch_size = batch_size
        self.patience = patience
        self.seed = seed
        self.device = device

    def _build_module(self, n_features: int, n_classes: int, weights: str | None = None) -> nn.Module:
        # zeros, as scikit-learn's LogisticRegression starts: the loss is convex, so a random start only
        # adds noise, and from zeros even a few small steps point every class the right way
        layer = nn.Linear(n_features, n_classes)
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
        return nn.Sequential(layer)
