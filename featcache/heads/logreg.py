"""``logreg``: StandardScaler + scikit-learn's LogisticRegression."""

from __future__ import annotations

from ._linear import LinearModelHead

__all__ = ["LogRegHead"]


class LogRegHead(LinearModelHead):
    """Multinomial logistic regression on standardised features; calibrated probabilities."""

    name = "logreg"

    def __init__(self, C: float | str = 1.0, max_iter: int = 2000, seed: int = 0):
        self.C = C
        self.max_iter = max_iter
        self.seed = seed

    def _estimator(self, C: float):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=C, max_iter=self.max_iter, random_state=self.seed)
