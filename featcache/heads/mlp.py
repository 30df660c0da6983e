"""``mlp``: Linear(D, hidden)-ReLU-Dropout-Linear(hidden, C) on flat features."""

from __future__ import annotations

from numbers import Integral, Real

from sklearn.utils._param_validation import Interval
from torch import nn

from .base import TorchHead

__all__ = ["MLPHead"]


class MLPHead(TorchHead):
    """Two layers with ReLU and dropout between, trained with cross-entropy (Adam or SGD + StepLR)."""

    name = "mlp"
    _parameter_constraints = {**TorchHead._parameter_constraints,
                              "hidden": [Interval(Integral, 1, None, closed="left")],
                              "dropout": [Interval(Real, 0, 1, closed="left")]}

    def __init__(self, hidden: int = 256, dropout: float = 0.4, lr: float = 1e-3, optimizer: str = "adam",
                 momentum: float = 0.9, weight_decay: float = 0.0, step_size: int = 10, gamma: float = 0.1,
                 epochs: int = 30, batch_size: int = 64, patience: int = 10, seed: int = 0, device: str = "auto"):
        self.hidden = hidden
        self.dropout = dropout
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
        return nn.Sequential(nn.Linear(n_features, self.hidden), nn.ReLU(), nn.Dropout(self.dropout),
                             nn.Linear(self.hidden, n_classes))
