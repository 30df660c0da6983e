"""Classifier heads behind one small interface, following the scikit-learn contract.

``__init__`` stores parameters; ``fit`` validates, learns state ending in ``_`` and returns
self; ``predict_proba``/``predict`` check that the head was fitted. ``save``/``load`` use
arrays (``.npz``, loaded with ``allow_pickle=False``) plus JSON: nothing executable.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from .config import HEADS, INITS, OPTIMIZERS, SKLEARN_HEADS, TORCH_HEADS
from .errors import RunError
from .persist import Fields, HeadRecord
from .stream import Streamed

if TYPE_CHECKING:  # torch is imported only where a torch head trains or predicts
    import torch
    from torch import nn

__all__ = ["HEADS", "TORCH_HEADS", "SKLEARN_HEADS", "TorchHead", "SklearnHead", "make_head", "save_head", "load_head",
           "check_head", "head_from_record"]

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
MAX_CLASSES = 1_000_000


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _check_xy(X: np.ndarray, y: np.ndarray | None = None, any_rank: bool = False) -> None:
    if X.ndim != 2 and not any_rank:
        raise ValueError(f"heads take 2-D features (N, D); got shape {X.shape}")
    if y is not None and len(X) != len(y):
        raise ValueError(f"{len(X)} feature rows but {len(y)} labels")


def _home(dev: torch.device, nbytes: int) -> torch.device:
    """Where the training tensors live: on the GPU when they fit in 80% of its free memory,
    else in host memory, each batch copied over."""
    import torch

    if dev.type != "cuda":
        return dev
    free, _ = torch.cuda.mem_get_info(dev)
    return dev if nbytes <= 0.8 * free else torch.device("cpu")


class TorchHead:
    """``mlp`` = Linear(D, hidden)-ReLU-Dropout-Linear(hidden, C); ``linear`` = Linear(D, C).

    Trained with cross-entropy from in-memory tensors; early stopping on validation loss
    keeps the best epoch's weights.
    """

    def __init__(
        self,
        kind: str = "mlp",
        hidden: int = 256,
        dropout: float = 0.4,
        lr: float = 1e-3,
        optimizer: str = "adam",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        step_size: int = 10,
        gamma: float = 0.1,
        epochs: int = 30,
        batch_size: int = 64,
        patience: int = 10,
        seed: int = 0,
        device: str = "auto",
        rest_of: dict | None = None,
        pretrained_lr_scale: float = 0.1,
        freeze: tuple[str, ...] = (),
        warmup_epochs: int = 0,
        init: str = "probe",
    ):
        self.kind = kind
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
        self.rest_of = rest_of
        self.pretrained_lr_scale = pretrained_lr_scale
        self.freeze = tuple(freeze)
        self.warmup_epochs = warmup_epochs
        self.init = init

    def get_params(self) -> dict:
        params = {k: getattr(self, k) for k in (
            "kind", "hidden", "dropout", "lr", "optimizer", "momentum", "weight_decay",
            "step_size", "gamma", "epochs", "batch_size", "patience", "seed", "device",
            "rest_of", "pretrained_lr_scale", "warmup_epochs", "init",
        )}
        return {**params, "freeze": list(self.freeze)}

    def _build(self, d: int, c: int, weights: str | None = None) -> nn.Module:
        from torch import nn

        if self.kind == "rest":
            from .backbones import create_rest, trusted_only

            spec = self.rest_of or {}
            if not {"backbone", "layer", "weights"} <= set(spec):
                raise ValueError("the rest head needs rest_of={'backbone', 'layer', 'weights'} of the feature set")
            # A module:factory name comes from a store or a run: it is imported only when the
            # user named it too (``trusted_backbone``, from --backbone; never saved with the head).
            name = spec["backbone"]
            if not isinstance(name, str) or (trusted_only(name) and name != getattr(self, "trusted_backbone", None)):
                from .errors import UnknownBackbone

                raise UnknownBackbone(
                    f"the rest head continues the user module {name!r}; featcache never imports code named by a "
                    f"store or a run. Pass --backbone {name} to import it (installed or on PYTHONPATH)."
                )
            model, self.new_layer_ = create_rest(name, spec["layer"], weights or spec["weights"], c)
            return model
        if self.kind == "linear":
            return nn.Sequential(nn.Linear(d, c))
        return nn.Sequential(nn.Linear(d, self.hidden), nn.ReLU(), nn.Dropout(self.dropout), nn.Linear(self.hidden, c))

    def _param_groups(self, model: nn.Module) -> list[dict]:
        """All parameters at ``lr``; for ``rest``, pretrained ones at ``lr * pretrained_lr_scale``, frozen ones left out."""
        if self.kind != "rest":
            return [{"params": list(model.parameters())}]
        names = [n for n, _ in model.named_parameters()]
        for f in self.freeze:
            if not any(n == f or n.startswith(f + ".") for n in names):
                from .errors import UnknownLayer

                layers = sorted({n.rsplit(".", 1)[0] for n in names})
                raise UnknownLayer(
                    f"--freeze {f!r} matches no layer after the cut. Layers: {', '.join(layers)}", option="--freeze"
                )
        new, old = [], []
        for name, p in model.named_parameters():
            if any(name == f or name.startswith(f + ".") for f in self.freeze):
                p.requires_grad_(False)
            elif name.startswith(self.new_layer_ + "."):
                new.append(p)
            else:
                old.append(p)
        groups = [{"params": new}]
        if old:
            groups.append({"params": old, "lr": self.lr * self.pretrained_lr_scale})
        return groups

    def _device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        X_val: np.ndarray | None = None,
        y_val: np.ndarray | None = None,
        n_classes: int | None = None,
        on_epoch: Callable[[dict], None] | None = None,
        train_views: np.ndarray | None = None,
    ) -> "TorchHead":
        """``train_views`` (N, K, ...): each epoch trains on one randomly drawn view per image.

        ``X`` (and ``X_val``) may be a :class:`featcache.stream.Streamed` split, read from the
        store a window of chunks at a time; ``y`` is then its labels.
        """
        import torch
        from torch import nn

        if self.kind not in TORCH_HEADS:
            raise ValueError(f"kind must be one of {', '.join(TORCH_HEADS)}; got {self.kind!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        _check_xy(X, y, any_rank=self.kind == "rest")
        dev = self._device()
        c = int(n_classes if n_classes is not None else y.max() + 1)
        gen = torch.Generator().manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)  # chunk and window order of a streamed split
        torch.manual_seed(self.seed)
        model = self._build(X.shape[1], c).to(dev)
        groups = self._param_groups(model)
        pretrained = [p for g in groups[1:] for p in g["params"]]  # rest: the layers that keep their weights
        streamed = isinstance(X, Streamed)
        if not streamed:
            home = _home(dev, (X.size + (train_views.size if train_views is not None else 0)) * 4)
            xt = torch.as_tensor(X, dtype=torch.float32, device=home)
            yt = torch.as_tensor(y, dtype=torch.long, device=home)
            views = torch.as_tensor(train_views, dtype=torch.float32, device=home) if train_views is not None else None

        def batches():
            if streamed:
                for xb, yb in X.epoch(rng, self.batch_size):
                    yield torch.from_numpy(xb).to(dev), torch.from_numpy(yb).to(dev)
                return
            order = torch.randperm(len(xt), generator=gen).to(xt.device)
            if views is not None:  # one augmented view per image this epoch
                picks = torch.randint(views.shape[1], (len(views),), generator=gen).to(xt.device)
                xe = views[torch.arange(len(views), device=xt.device), picks]
            else:
                xe = xt
            for idx in order.split(self.batch_size):
                yield xe[idx].to(dev, non_blocking=True), yt[idx].to(dev, non_blocking=True)

        has_val = X_val is not None and y_val is not None and len(y_val) > 0
        if has_val:
            xv = X_val if isinstance(X_val, Streamed) else torch.as_tensor(
                X_val, dtype=torch.float32, device=_home(dev, X_val.size * 4))
            yv = torch.as_tensor(y_val, dtype=torch.long)
        if self.optimizer == "adam":
            opt = torch.optim.Adam(groups, lr=self.lr, weight_decay=self.weight_decay)
            sched = None
        else:
            opt = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.step_size, gamma=self.gamma)
        loss_fn = nn.CrossEntropyLoss()
        best = (float("inf"), -1, copy.deepcopy(model.state_dict()))
        self.probe_ = None
        if self.kind == "rest" and self.init == "probe":
            self.probe_ = self._probe_init(model, X, y, dev, c)
            if has_val:  # the probe itself is the first candidate for the best epoch
                logits = self._logits(model, xv, dev)
                best = (float(loss_fn(logits, yv)), 0, copy.deepcopy(model.state_dict()))
                self.probe_["val_acc"] = float((logits.argmax(1) == yv).float().mean())
        history: list[dict] = []
        waited = 0
        for epoch in range(1, self.epochs + 1):
            t = time.perf_counter()
            probing = epoch <= self.warmup_epochs and bool(pretrained)
            for p in pretrained:  # warm-up: the new layer learns on fixed features first (linear probe, then fine-tune)
                p.requires_grad_(not probing)
            model.train()
            if self.kind == "rest":  # pretrained batch-norm statistics stay as they are
                for m in model.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
            total = correct = 0.0
            for xb, yb in batches():
                logits = model(xb)
                loss = loss_fn(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(yb)
                correct += float((logits.argmax(1) == yb).sum())
            if sched is not None:
                sched.step()
            row = {"epoch": epoch, "train_loss": total / len(X), "train_acc": correct / len(X)}
            if has_val:
                logits = self._logits(model, xv, dev)
                row.update(val_loss=float(loss_fn(logits, yv)), val_acc=float((logits.argmax(1) == yv).float().mean()))
            row["seconds"] = time.perf_counter() - t
            history.append(row)
            if on_epoch:
                on_epoch(row)
            score = row["val_loss"] if has_val else row["train_loss"]
            if score < best[0]:
                best = (score, epoch, copy.deepcopy(model.state_dict()))
                waited = 0
            else:
                waited += 1
                if has_val and self.patience and waited >= self.patience:
                    break
        model.load_state_dict(best[2])
        self.module_ = model.eval()
        # the rest head records the shape it continues from, a vector's too (the default layer)
        self.n_features_in_ = X.shape[1] if X.ndim == 2 and self.kind != "rest" else list(X.shape[1:])
        self.n_classes_ = c
        self.history_ = history
        self.best_epoch_ = best[1]
        self.stopped_early_ = len(history) < self.epochs
        return self

    def _probe_init(self, model: nn.Module, X, y, dev: torch.device, c: int) -> dict:
        """Set the new layer to a logistic regression (C = 1, on standardised inputs, folded back
        into the layer) fitted on what the pretrained layers feed it: fine-tuning then starts
        from a linear probe instead of random weights."""
        import torch

        with torch.no_grad():
            return self._probe_init_no_grad(model, X, y, dev, c)

    def _probe_init_no_grad(self, model: nn.Module, X, y, dev: torch.device, c: int) -> dict:
        import torch

        layer = model.get_submodule(self.new_layer_)
        inputs: list[torch.Tensor] = []
        hook = layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().float().cpu()))
        try:
            if isinstance(X, Streamed):
                labels = []
                for x, dest in X.ordered():
                    self._logits(model, x, dev)
                    labels.append(X.labels[dest])
                y = np.concatenate(labels)
            else:
                self._logits(model, X, dev)
        finally:
            hook.remove()
        z = torch.cat(inputs).numpy()
        probe = SklearnHead(kind="logreg", C=1.0, seed=self.seed).fit(z, np.asarray(y), n_classes=c)
        est, scaler = probe.estimator_, probe.scaler_
        coef, intercept = est.coef_, est.intercept_
        if len(est.classes_) == 2 and coef.shape[0] == 1:  # sklearn's binary form: one score for class 1
            coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
        weight = np.zeros((c, z.shape[1]))
        bias = np.full(c, -1e4 if len(est.classes_) < c else 0.0)  # classes absent from training stay unlikely
        weight[est.classes_] = coef / scaler.scale_
        bias[est.classes_] = intercept - (coef * scaler.mean_ / scaler.scale_).sum(1)
        layer.weight.copy_(torch.as_tensor(weight, dtype=layer.weight.dtype))
        layer.bias.copy_(torch.as_tensor(bias, dtype=layer.bias.dtype))
        return {"C": 1.0, "train_acc": float((probe.predict(z) == np.asarray(y)).mean()), "converged": probe.converged_}

    def _logits(self, model: nn.Module, X, dev: torch.device) -> torch.Tensor:
        """Logits (N, C) on the CPU for an array, a tensor or a streamed split, in row order."""
        import torch

        with torch.no_grad():
            return self._logits_no_grad(model, X, dev)

    def _logits_no_grad(self, model: nn.Module, X, dev: torch.device) -> torch.Tensor:
        import torch

        model.eval()
        step = 256 if self.kind == "rest" else 4096

        def run(x) -> torch.Tensor:
            parts = [model(torch.as_tensor(x[i : i + step], dtype=torch.float32, device=dev)).cpu() for i in range(0, len(x), step)]
            return torch.cat(parts) if parts else torch.zeros((0, 0))

        if not isinstance(X, Streamed):
            return run(X)
        out = None
        for x, dest in X.ordered():
            part = run(x)
            if out is None:
                out = torch.empty((len(X), part.shape[1]))
            out[torch.from_numpy(dest)] = part
        return out if out is not None else torch.zeros((0, 0))

    def _check_fitted(self) -> None:
        from sklearn.exceptions import NotFittedError

        if not hasattr(self, "module_"):
            raise NotFittedError("this head is not fitted yet; call fit first")

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities for an array or a streamed split."""
        import torch

        self._check_fitted()
        _check_xy(X, any_rank=self.kind == "rest")
        logits = self._logits(self.module_, X, next(self.module_.parameters()).device)
        return torch.softmax(logits, 1).numpy() if len(logits) else np.zeros((0, self.n_classes_), dtype=np.float32)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.predict_proba(X).argmax(1)

    def state_arrays(self) -> dict[str, np.ndarray]:
        self._check_fitted()
        return {k: v.detach().cpu().numpy() for k, v in self.module_.state_dict().items()}

    def fitted_info(self) -> dict:
        info = {"n_features_in": self.n_features_in_, "n_classes": self.n_classes_, "best_epoch": self.best_epoch_}
        if self.kind == "rest":
            info["new_layer"] = self.new_layer_
        if getattr(self, "probe_", None):
            info["probe"] = self.probe_
        return info

    @classmethod
    def check_state(cls, record: HeadRecord, where: str) -> tuple[int | tuple[int, ...], int]:
        """(inputs, classes) of a saved head whose parameters and arrays fit this class; else a RunError."""
        p, info = _check_params(cls(), record, where)
        if record.kind not in TORCH_HEADS:
            raise p.bad("kind", f"one of {', '.join(TORCH_HEADS)}", record.kind)
        p.get("freeze", lambda v: isinstance(v, list) and all(isinstance(f, str) for f in v), "a list of layer names",
              optional=True)
        c = info.integer("n_classes", 1, MAX_CLASSES)
        info.integer("best_epoch", -1, 2**31, optional=True)
        if record.kind == "rest":
            d = info.shape("n_features_in")
            new = info.text("new_layer")
            rest_of = p.obj("rest_of")
            for key in ("backbone", "layer", "weights"):
                rest_of.text(key)
            _check_arrays(record.arrays, {f"{new}.weight": (c, None), f"{new}.bias": (c,)}, where, exact=False)
            return d, c
        d = info.integer("n_features_in", 1, 2**31)
        if record.kind == "linear":
            _check_arrays(record.arrays, {"0.weight": (c, d), "0.bias": (c,)}, where)
        else:
            h = p.integer("hidden", 1, 2**31)
            p.number("dropout", 0, 1)
            _check_arrays(record.arrays, {"0.weight": (h, d), "0.bias": (h,), "3.weight": (c, h), "3.bias": (c,)}, where)
        return d, c

    @classmethod
    def from_state(cls, params: dict, info: dict, arrays: dict[str, np.ndarray], backbone: str | None = None) -> "TorchHead":
        import torch

        head = cls(**{**params, "device": "cpu"})
        head.trusted_backbone = backbone
        d = info["n_features_in"]
        model = head._build(d if isinstance(d, int) else d[0], info["n_classes"], weights="none")
        model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
        head.module_ = model.eval()
        head.n_features_in_ = info["n_features_in"]
        head.n_classes_ = info["n_classes"]
        head.best_epoch_ = info.get("best_epoch")
        return head


class SklearnHead:
    """``logreg`` = StandardScaler + LogisticRegression; ``svm`` = StandardScaler + LinearSVC.

    The SVM's probabilities are a softmax of its decision scores (uncalibrated), so no log
    loss is reported for it.
    """

    def __init__(self, kind: str = "logreg", C: float | str = "auto", max_iter: int = 2000, seed: int = 0):
        self.kind = kind
        self.C = C
        self.max_iter = max_iter
        self.seed = seed

    def get_params(self) -> dict:
        return {"kind": self.kind, "C": self.C, "max_iter": self.max_iter, "seed": self.seed}

    @property
    def calibrated(self) -> bool:
        return self.kind == "logreg"

    def _estimator(self, C: float):
        from sklearn.linear_model import LogisticRegression
        from sklearn.svm import LinearSVC

        if self.kind == "logreg":
            return LogisticRegression(C=C, max_iter=self.max_iter, random_state=self.seed)
        return LinearSVC(C=C, max_iter=self.max_iter, random_state=self.seed)

    def _choose_C(self, Xs: np.ndarray, y: np.ndarray, Xv: np.ndarray | None, yv: np.ndarray | None) -> float:
        """Best accuracy over ``C_GRID`` on the validation split, or by stratified k-fold CV without one.

        Ties go to the smaller C (stronger regularisation). The search is kept in ``C_search_``.
        """
        from sklearn.model_selection import StratifiedKFold, cross_val_score

        scores = []
        if Xv is not None and len(Xv):
            how = "validation accuracy"
            for c in C_GRID:
                scores.append(float((self._estimator(c).fit(Xs, y).predict(Xv) == yv).mean()))
        else:
            folds = int(min(5, np.bincount(y).min()))
            if folds < 2:
                self.C_search_ = {"by": "default (too few images per class to cross-validate)", "grid": [], "scores": []}
                return 1.0
            how = f"{folds}-fold cross-validated accuracy"
            cv = StratifiedKFold(folds, shuffle=True, random_state=self.seed)
            for c in C_GRID:
                scores.append(float(cross_val_score(self._estimator(c), Xs, y, cv=cv).mean()))
        best = C_GRID[int(np.argmax(scores))]
        self.C_search_ = {"by": how, "grid": list(C_GRID), "scores": scores}
        return best

    def fit(self, X: np.ndarray, y: np.ndarray, X_val=None, y_val=None, n_classes=None, on_epoch=None,
            train_views=None) -> "SklearnHead":
        """``train_views`` (N, K, D): every view becomes a training sample with its image's label."""
        if train_views is not None:
            X = train_views.reshape(-1, train_views.shape[-1])
            y = np.repeat(y, train_views.shape[1])
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.preprocessing import StandardScaler

        if self.kind not in SKLEARN_HEADS:
            raise ValueError(f"kind must be one of {', '.join(SKLEARN_HEADS)}; got {self.kind!r}")
        if self.C != "auto" and not (isinstance(self.C, (int, float)) and self.C > 0):
            raise ValueError(f"C must be > 0 or 'auto'; got {self.C!r}")
        _check_xy(X, y)
        self.n_classes_ = int(n_classes if n_classes is not None else y.max() + 1)
        self.scaler_ = StandardScaler().fit(X)
        Xs = self.scaler_.transform(X)
        Xv = self.scaler_.transform(X_val) if X_val is not None and len(X_val) else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            if self.C == "auto":
                self.C_ = self._choose_C(Xs, y, Xv, y_val)
            else:
                self.C_, self.C_search_ = float(self.C), None
            self.estimator_ = self._estimator(self.C_).fit(Xs, y)
        self.converged_ = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        self.history_ = []
        return self

    def _check_fitted(self) -> None:
        from sklearn.exceptions import NotFittedError

        if not hasattr(self, "estimator_"):
            raise NotFittedError("this head is not fitted yet; call fit first")

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Scores (N, n_classes) with a column for every class, also those absent in training."""
        self._check_fitted()
        _check_xy(X)
        est = self.estimator_
        s = est.decision_function(self.scaler_.transform(X))
        if s.ndim == 1:  # binary: sklearn gives one score for classes_[1]
            s = np.stack([-s, s], axis=1) / 2
        out = np.full((len(X), self.n_classes_), -1e9, dtype=np.float64)
        out[:, est.classes_] = s
        return out

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return _softmax(self.decision_function(X)).astype(np.float32)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.decision_function(X).argmax(1)

    def state_arrays(self) -> dict[str, np.ndarray]:
        self._check_fitted()
        est = self.estimator_
        return {
            "scaler_mean": self.scaler_.mean_,
            "scaler_scale": self.scaler_.scale_,
            "coef": est.coef_,
            "intercept": np.atleast_1d(est.intercept_),
            "classes": est.classes_,
        }

    def fitted_info(self) -> dict:
        return {
            "n_features_in": int(self.scaler_.n_features_in_),
            "n_classes": self.n_classes_,
            "converged": self.converged_,
            "C": self.C_,
            "C_search": self.C_search_,
        }

    @classmethod
    def check_state(cls, record: HeadRecord, where: str) -> tuple[int, int]:
        """(inputs, classes) of a saved head whose parameters and arrays fit this class; else a RunError."""
        p, info = _check_params(cls(), record, where)
        if record.kind not in SKLEARN_HEADS:
            raise p.bad("kind", f"one of {', '.join(SKLEARN_HEADS)}", record.kind)
        d = info.integer("n_features_in", 1, 2**31)
        c = info.integer("n_classes", 2, MAX_CLASSES)
        info.get("C", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < np.inf,
                 "a finite number > 0")
        info.flag("converged", optional=True)
        info.obj("C_search", optional=True)
        k = 1 if c == 2 else c  # scikit-learn's binary form: one score for class 1
        _check_arrays(record.arrays, {"scaler_mean": (d,), "scaler_scale": (d,), "coef": (k, d), "intercept": (k,),
                                      "classes": (c,)}, where)
        if not (record.arrays["scaler_scale"] > 0).all():
            raise RunError(f"{where}: head.npz array 'scaler_scale' must be positive; the run directory is damaged")
        if not np.array_equal(record.arrays["classes"], np.arange(c)):
            raise RunError(f"{where}: head.npz array 'classes' must be 0..{c - 1}, one per class of the run; "
                           "the run directory is damaged")
        return d, c

    @classmethod
    def from_state(cls, params: dict, info: dict, arrays: dict[str, np.ndarray]) -> "SklearnHead":
        from sklearn.preprocessing import StandardScaler

        head = cls(**params)
        head.n_classes_ = info["n_classes"]
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_ = arrays["scaler_mean"], arrays["scaler_scale"]
        scaler.var_ = scaler.scale_**2
        scaler.n_features_in_ = len(scaler.mean_)
        head.scaler_ = scaler
        head.C_, head.C_search_ = info.get("C", params.get("C")), info.get("C_search")
        est = head._estimator(head.C_)
        est.coef_, est.intercept_, est.classes_ = arrays["coef"], arrays["intercept"], arrays["classes"]
        est.n_features_in_ = scaler.n_features_in_
        head.estimator_ = est
        head.converged_ = info.get("converged")
        return head


def make_head(kind: str, **params) -> TorchHead | SklearnHead:
    """A head by name; ``params`` not used by that kind of head are ignored."""
    if kind in TORCH_HEADS:
        names = set(TorchHead().get_params())
        return TorchHead(kind=kind, **{k: v for k, v in params.items() if k in names and k != "kind"})
    if kind in SKLEARN_HEADS:
        names = set(SklearnHead().get_params())
        return SklearnHead(kind=kind, **{k: v for k, v in params.items() if k in names and k != "kind"})
    raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")


def _check_params(blank, record: HeadRecord, where: str) -> tuple[Fields, Fields]:
    """Every saved parameter is one the class takes, of the type of its default."""
    p = Fields(record.params, where, "head.json", "params.")
    for name, value in record.params.items():
        if name not in blank.get_params():
            raise p.bad(name, f"absent (not a parameter of a {record.kind} head)", value)
        default = blank.get_params()[name]
        if name == "C":
            ok = value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)
        elif isinstance(default, bool) or default is None or isinstance(default, list):
            ok = True  # checked by the class where it matters
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
        else:
            ok = type(value) is type(default)
        if not ok:
            raise p.bad(name, f"of the type of {default!r}", value)
    if p.doc.get("kind", record.kind) != record.kind:
        raise p.bad("kind", f"the head's kind {record.kind!r}", p.doc["kind"])
    return p, Fields(record.fitted, where, "head.json", "fitted.")


def _check_arrays(arrays: dict[str, np.ndarray], want: dict[str, tuple], where: str, exact: bool = True) -> None:
    """``arrays`` has each name in ``want`` with that shape (None: any size); with ``exact``, nothing else."""
    missing = [n for n in want if n not in arrays]
    extra = sorted(set(arrays) - set(want)) if exact else []
    if missing or extra:
        what = f"lacks array {missing[0]!r}" if missing else f"has an unexpected array {extra[0]!r}"
        raise RunError(f"{where}: head.npz {what}; the run directory is damaged, re-run featcache fit")
    for name, shape in want.items():
        a = arrays[name]
        fits = a.ndim == len(shape) and all(s is None or s == n for s, n in zip(shape, a.shape))
        if not fits:
            shown = "x".join("N" if s is None else str(s) for s in shape)
            raise RunError(f"{where}: head.npz array {name!r} has shape {'x'.join(map(str, a.shape)) or 'scalar'}, "
                           f"expected {shown}; the run directory is damaged, re-run featcache fit")
        if name != "classes" and a.dtype.kind != "f":
            raise RunError(f"{where}: head.npz array {name!r} has dtype {a.dtype}, expected floats; "
                           "the run directory is damaged")


def head_class(kind: str) -> type[TorchHead] | type[SklearnHead]:
    return TorchHead if kind in TORCH_HEADS else SklearnHead


def check_head(record: HeadRecord, where: str) -> tuple[int | tuple[int, ...], int]:
    """(inputs, classes) of a saved head, checked against its kind; a RunError names what does not fit."""
    if record.kind not in HEADS:
        raise RunError(f"{where}: head.json field 'kind' must be one of {', '.join(HEADS)}; got {record.kind!r}. "
                       "The run directory is damaged; re-run featcache fit")
    return head_class(record.kind).check_state(record, where)


def head_from_record(record: HeadRecord, where: str, backbone: str | None = None) -> TorchHead | SklearnHead:
    """The fitted head a checked record describes (``backbone``: see :func:`load_head`)."""
    check_head(record, where)
    try:
        if record.kind in TORCH_HEADS:
            return TorchHead.from_state(record.params, record.fitted, record.arrays, backbone)
        return head_class(record.kind).from_state(record.params, record.fitted, record.arrays)
    except RuntimeError as e:  # load_state_dict: the rest head's arrays do not fit its network
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise RunError(f"{where}: head.npz does not fit the {record.kind} head's network ({first}); "
                       "the run directory is damaged, re-run featcache fit") from None


def save_head(head: TorchHead | SklearnHead, folder: Path) -> None:
    """Write ``head.json`` and ``head.npz`` into ``folder``."""
    HeadRecord.of(head).write(Path(folder))


def load_head(folder: Path, backbone: str | None = None) -> TorchHead | SklearnHead:
    """The head saved in ``folder``; a damaged or hostile ``head.json``/``head.npz`` is a RunError.

    ``backbone`` is the user's --backbone, needed to rebuild a rest head that continues a
    ``module:factory`` network (never imported because a run names it)."""
    return head_from_record(HeadRecord.read(Path(folder)), str(folder), backbone)
