"""``svm``: StandardScaler + scikit-learn's LinearSVC."""

from __future__ import annotations

from ._linear import LinearModelHead

__all__ = ["SVMHead"]


class SVMHead(LinearModelHead):
    """A linear SVM on standardised features. Its probabilities are a softmax of its decision
    scores, not calibrated, so no log loss is reported for it."""

    name = "svm"

    def __init__(self, C: float | str = 1.0, max_iter: int = 2000, seed: int = 0):
        self.C = C
        self.max_iter = max_iter
        self.seed = seed

    def _estimator(self, C: float):
        from sklearn.svm import LinearSVC

        return LinearSVC(C=C, max_iter=self.max_iter, random_state=self.seed)
