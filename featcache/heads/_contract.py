"""What every head shares, without importing torch: the scikit-learn contract and the saved form.

A head is a scikit-learn classifier: ``__init__`` stores its parameters unchanged, ``fit``
validates its inputs with scikit-learn's helpers and returns self, learned state ends in
``_``, labels are any hashable values (``classes_``). Capabilities are class attributes that
callers ask instead of comparing names: ``takes_maps`` (feature maps, not flat vectors),
``streams`` (trains on a split larger than memory), ``calibrated`` (``predict_proba`` are
probabilities, so a log loss means something).
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from ..stream import Streamed
from .table import HeadKind, kind_of

__all__ = ["Head", "softmax"]


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Head(ClassifierMixin, BaseEstimator):
    """Base of every head: label encoding, input validation, and the head's saved form."""

    name: ClassVar[str] = ""  # the --head name, and ``kind`` in head.json
    kind: ClassVar[HeadKind | None] = None  # its row of the head table (``heads.table``), set from ``name``
    # capabilities, copied from the row when the class is defined
    takes_maps: ClassVar[bool] = False
    streams: ClassVar[bool] = False
    calibrated: ClassVar[bool] = True
    key_params: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        """A class that names its ``--head`` takes its row of the head table; its ``__init__`` parameters and
        defaults must be the row's (one head table: a class and its row cannot disagree)."""
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if not name:
            return
        kind = kind_of(name)
        cls.kind = kind
        cls.takes_maps, cls.streams, cls.calibrated, cls.key_params = (kind.takes_maps, kind.streams,
                                                                       kind.calibrated, kind.key_params)
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        got = {p.name: p.default for p in params}
        if got != kind.params:
            raise TypeError(f"{cls.__name__}.__init__ takes {got}, but the head table's row {name!r} says "
                            f"{kind.params}; change both together")

    # -- fitting -------------------------------------------------------------------------------
    def _check_train(self, X, y, classes=None, dtype=np.float32):
        """Validated (X, encoded y); sets ``classes_`` and ``n_features_in_``.

        ``classes``: every label the head must have an output for, also those absent from ``y``.
        A :class:`~featcache.stream.Streamed` split is taken as is, with labels 0..C-1.
        """
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None")
        if isinstance(X, Streamed):
            y = column_or_1d(np.asarray(y))
            self.n_features_in_ = X.shape[1]
        else:
            X, y = validate_data(self, X, y, dtype=dtype, allow_nd=self.takes_maps,
                                 ensure_min_features=1, ensure_min_samples=1)
            if not self.takes_maps and X.ndim != 2:
                raise ValueError(f"{type(self).__name__} takes 2-D features (N, D); got shape {X.shape}")
        check_classification_targets(y)
        if classes is None:
            self.classes_, encoded = np.unique(y, return_inverse=True)
        else:
            self.classes_ = np.unique(np.asarray(classes))
            if len(self.classes_) != len(classes):
                raise ValueError("classes must not repeat a label")
            encoded = self._encode(y)
        if isinstance(X, Streamed) and not np.array_equal(self.classes_, np.arange(len(self.classes_))):
            raise ValueError("a streamed split needs labels 0..C-1")
        return X, encoded.astype(np.int64)

    def _encode(self, y) -> np.ndarray:
        """Labels → output indices; a label the head has no output for is a ValueError."""
        y = column_or_1d(np.asarray(y))
        known = np.isin(y, self.classes_)
        if not known.all():
            raise ValueError(f"y holds labels the head has no output for: {np.unique(y[~known])[:5].tolist()}; "
                             f"classes: {self.classes_[:10].tolist()}")
        return np.searchsorted(self.classes_, y)

    def _check_predict(self, X, dtype=np.float32):
        check_is_fitted(self)
        if isinstance(X, Streamed):
            return X
        X = validate_data(self, X, reset=False, dtype=dtype, allow_nd=self.takes_maps)
        shape = getattr(self, "input_shape_", None)
        if self.takes_maps and shape is not None and tuple(X.shape[1:]) != tuple(shape):
            raise ValueError(f"X has rows of shape {X.shape[1:]}, but {type(self).__name__} takes {tuple(shape)}")
        return X

    def predict(self, X) -> np.ndarray:
        """The most likely label of each row (one of ``classes_``)."""
        check_is_fitted(self)
        return self.classes_[np.asarray(self.predict_proba(X)).argmax(1)]

    # -- the saved form (head.json + head.npz) -------------------------------------------------
    def saved_params(self) -> dict:
        """The parameters written to head.json: ``kind`` and every parameter but the unsaved ones."""
        params = {k: v for k, v in self.get_params(deep=False).items() if k not in self.kind.unsaved}
        return {"kind": self.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}}

    def _check_saved(self) -> None:
        check_is_fitted(self)
        if not np.array_equal(self.classes_, np.arange(len(self.classes_))):
            raise ValueError("only a head fitted on class indices 0..C-1 can be saved as a run; "
                             "encode the labels first (featcache.fit does)")

    @classmethod
    def _init_params(cls, params: dict) -> dict:
        """The saved parameters this class takes (legacy ones and ``kind`` dropped; JSON lists back to tuples)."""
        defaults = cls().get_params(deep=False)
        return {k: tuple(v) if isinstance(defaults[k], tuple) and isinstance(v, list) else v
                for k, v in params.items() if k in defaults}

