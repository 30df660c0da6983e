"""A fitted ``logreg``/``svm`` as a torch module (imported only to export or predict images)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["LinearScores"]


class LinearScores(nn.Module):
    """(x - mean) / scale → Linear → one column per class (scikit-learn's binary form expanded)."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, intercept: np.ndarray,
                 present: np.ndarray, n_classes: int):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
        self.linear = nn.Linear(coef.shape[1], coef.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(torch.as_tensor(coef, dtype=torch.float32))
            self.linear.bias.copy_(torch.as_tensor(intercept, dtype=torch.float32))
        self.binary = coef.shape[0] == 1
        self.complete = len(present) == n_classes
        fill = torch.full((n_classes,), -1e9)
        self.register_buffer("fill", fill)
        self.register_buffer("present", torch.as_tensor(np.asarray(present), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear((x - self.mean) / self.scale)
        if self.binary:  # one score for class 1, as scikit-learn gives it
            z = torch.cat([-z, z], dim=1) / 2
        if self.complete:
            return z
        out = self.fill.expand(len(x), -1).clone()
        out[:, self.present] = z
        return out
