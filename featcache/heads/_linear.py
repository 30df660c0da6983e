"""StandardScaler + a linear scikit-learn model; C fixed (1.0 by default) or chosen by cross-validation of train.

No torch here: fitting ``logreg`` or ``svm`` never imports it (``torch_module`` does, for export).
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_array, check_is_fitted

from ._contract import Head, softmax
from .table import C_GRID

__all__ = ["LinearModelHead", "CEdgeWarning"]

_MORE = 3  # grid values tried beyond an edge, while each scores strictly higher


class CEdgeWarning(UserWarning):
    """The chosen C lies at the edge of the grid searched."""


class LinearModelHead(Head):
    """Base of ``logreg`` and ``svm``: standardise, then a linear model with scikit-learn's defaults
    (C = 1.0). C = "auto" picks C from ``C_GRID`` by stratified k-fold cross-validation of the
    training rows (scikit-learn's ``GridSearchCV`` over a scaler + model pipeline), never on a
    validation split, so val and test stay held out; ties go to the smaller C. A C at the edge of
    the grid extends the search a factor of 10 at a time while the score rises, and warns
    (:class:`CEdgeWarning`) when it stays at the edge."""

    _parameter_constraints = {"C": [StrOptions({"auto"}), Interval(Real, 0, None, closed="neither")],
                              "max_iter": [Interval(Integral, 1, None, closed="left")],
                              "seed": [Interval(Integral, 0, 2**32 - 1, closed="both")]}

    def __init__(self, C: float | str = 1.0, max_iter: int = 2000, seed: int = 0):
        self.C = C
        self.max_iter = max_iter
        self.seed = seed

    def _estimator(self, C: float):
        raise NotImplementedError

    def _cv_scores(self, grid: list[float], X: np.ndarray, y: np.ndarray, cv, groups=None) -> list[float]:
        """Mean cross-validated accuracy of each C in ``grid``; the scaler is fitted inside each fold."""
        from sklearn.model_selection import GridSearchCV
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        pipe = Pipeline([("scale", StandardScaler()), ("model", self._estimator(1.0))])
        search = GridSearchCV(pipe, {"model__C": list(grid)}, cv=cv, refit=False).fit(X, y, groups=groups)
        return [float(s) for s in search.cv_results_["mean_test_score"]]

    def _choose_C(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> float:
        """The best C by cross-validation of (X, y); the search (every C tried, its score) is kept in ``C_search_``.

        ``groups``: the image of each row (augmented views of one image stay in one fold)."""
        from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

        counts = np.bincount(y if groups is None else y[np.unique(groups, return_index=True)[1]])
        folds = int(min(5, counts[counts > 0].min()))
        if folds < 2:
            self.C_search_ = {"by": "default (too few images per class to cross-validate)", "grid": [], "scores": []}
            return 1.0
        kind = StratifiedKFold if groups is None else StratifiedGroupKFold
        how, cv = f"{folds}-fold cross-validated accuracy", kind(folds, shuffle=True, random_state=self.seed)
        grid = list(C_GRID)
        scores = self._cv_scores(grid, X, y, cv, groups)
        best = int(np.argmax(scores))
        chosen, top = grid[best], scores[best]
        if best in (0, len(grid) - 1):
            low = best == 0
            for _ in range(_MORE):  # beyond the edge, a factor of 10 at a time while the score rises
                c = grid[0] / 10 if low else grid[-1] * 10
                s = self._cv_scores([c], X, y, cv, groups)[0]
                grid.insert(0 if low else len(grid), c)
                scores.insert(0 if low else len(scores), s)
                if s <= top:
                    break
                chosen, top = c, s
            if chosen in (grid[0], grid[-1]):
                side = "smallest" if chosen == grid[0] else "largest"
                warnings.warn(f"C {chosen:g} is the {side} C tried ({grid[0]:g} to {grid[-1]:g}, {how} {top:.4f}); "
                              "a C beyond it might score higher: pass --C to try one", CEdgeWarning, stacklevel=3)
        self.C_search_ = {"by": how, "grid": grid, "scores": scores}
        return chosen

    def fit(self, X, y, X_val=None, y_val=None, *, classes=None, on_epoch=None, train_views=None) -> LinearModelHead:
        """Fit on (X, y); C = "auto" is chosen by cross-validation of (X, y). (X_val, y_val) are not
        used: they stay held out for the caller's measurement.

        ``train_views`` (N, K, D): every view becomes a training sample with its image's label.
        """
        from sklearn.preprocessing import StandardScaler

        self._validate_params()
        groups = None
        if train_views is not None:
            views = check_array(train_views, dtype=[np.float64, np.float32], allow_nd=True)
            X, y = views.reshape(-1, views.shape[-1]), np.repeat(np.asarray(y), views.shape[1])
            groups = np.repeat(np.arange(views.shape[0]), views.shape[1])
        X, y = self._check_train(X, y, classes, dtype=[np.float64, np.float32])
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes; got 1 class")
        self.scaler_ = StandardScaler().fit(X)
        Xs = self.scaler_.transform(X)
        if self.C == "auto":
            with warnings.catch_warnings():  # a fold's fit that stops at max_iter says nothing of the final fit
                warnings.simplefilter("ignore", ConvergenceWarning)
                self.C_ = self._choose_C(X, y, groups)
        else:
            self.C_, self.C_search_ = float(self.C), None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            self.estimator_ = self._estimator(self.C_).fit(Xs, y)
        self.n_iter_ = self.estimator_.n_iter_
        self.converged_ = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        for w in caught:  # pass on everything but the convergence warnings, recorded in converged_
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        self.history_ = []
        return self

    def _scores(self, X) -> np.ndarray:
        """Scores (N, len(classes_)), a column for every class (those absent in training at -1e9)."""
        X = self._check_predict(X, dtype=[np.float64, np.float32])
        est = self.estimator_
        s = est.decision_function(self.scaler_.transform(X))
        if s.ndim == 1:  # binary: sklearn gives one score for classes_[1]
            s = np.stack([-s, s], axis=1) / 2
        out = np.full((len(X), len(self.classes_)), -1e9, dtype=np.float64)
        out[:, est.classes_] = s
        return out

    def decision_function(self, X) -> np.ndarray:
        """scikit-learn's shape: (N,) for two classes (positive: ``classes_[1]``), else (N, C)."""
        s = self._scores(X)
        return s[:, 1] - s[:, 0] if s.shape[1] == 2 else s

    def predict_proba(self, X) -> np.ndarray:
        """Softmax of the scores (for ``svm`` uncalibrated: ``calibrated`` is False)."""
        return softmax(self._scores(X)).astype(np.float32)

    def torch_module(self):
        """Standardise + linear scores as a torch module: prepared features → logits."""
        check_is_fitted(self)
        from ._linear_torch import LinearScores

        a = self.state_arrays(check=False)
        return LinearScores(a["scaler_mean"], a["scaler_scale"], a["coef"], a["intercept"], a["classes"],
                            len(self.classes_))

    # -- the saved form --------------------------------------------------------------------------
    def state_arrays(self, check: bool = True) -> dict[str, np.ndarray]:
        if check:
            self._check_saved()
        est = self.estimator_
        return {"scaler_mean": self.scaler_.mean_, "scaler_scale": self.scaler_.scale_, "coef": est.coef_,
                "intercept": np.atleast_1d(est.intercept_), "classes": est.classes_}

    def fitted_info(self) -> dict:
        self._check_saved()
        return {"n_features_in": int(self.scaler_.n_features_in_), "n_classes": len(self.classes_),
                "converged": self.converged_, "C": self.C_, "C_search": self.C_search_}

    @classmethod
    def from_state(cls, params: dict, info: dict, arrays: dict[str, np.ndarray], network=None):
        from sklearn.preprocessing import StandardScaler

        head = cls(**cls._init_params(params))
        head.classes_ = np.arange(info["n_classes"])
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_ = arrays["scaler_mean"], arrays["scaler_scale"]
        scaler.var_ = scaler.scale_**2
        scaler.n_features_in_ = len(scaler.mean_)
        head.scaler_ = scaler
        head.n_features_in_ = scaler.n_features_in_
        head.C_, head.C_search_ = info.get("C", params.get("C")), info.get("C_search")
        est = head._estimator(head.C_)
        est.coef_, est.intercept_, est.classes_ = arrays["coef"], arrays["intercept"], arrays["classes"]
        est.n_features_in_ = scaler.n_features_in_
        head.estimator_ = est
        head.converged_ = info.get("converged")
        head.history_ = []
        return head
