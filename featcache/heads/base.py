"""The torch training loop: ``train_one_epoch`` and ``evaluate``, small callbacks, and the
base class of the torch heads.

The loop is torchvision's reference ``train.py`` shape; early stopping, warm-up freezing and
logging are callbacks in skorch's shape (``on_train_begin``, ``on_epoch_begin``,
``on_epoch_end`` returning True to stop) instead of branches in ``fit``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from numbers import Integral, Real
from typing import ClassVar

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_array, check_is_fitted
from torch import nn

from ..choices import MAX_CLASSES, OPTIMIZERS
from ..errors import TrainingDiverged
from ..stream import Streamed
from ._contract import Head

__all__ = ["train_one_epoch", "evaluate", "logits_of", "Callback", "EarlyStopping", "WarmUp", "FrozenBatchNorm",
           "EpochLog", "FiniteLoss", "TorchHead"]


def train_one_epoch(module: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, loss_fn) -> dict:
    """One pass over ``batches`` of (x, y); the caller sets train mode. Returns train loss and accuracy."""
    total = correct = 0.0
    n = 0
    for xb, yb in batches:
        logits = module(xb)
        loss = loss_fn(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(yb)
        correct += float((logits.argmax(1) == yb).sum())
        n += len(yb)
    return {"train_loss": total / max(n, 1), "train_acc": correct / max(n, 1)}


@torch.no_grad()
def logits_of(module: nn.Module, X, device: torch.device, step: int = 4096) -> torch.Tensor:
    """Logits (N, C) on the CPU for an array, a tensor or a streamed split, in row order (eval mode)."""
    module.eval()

    def run(x) -> torch.Tensor:
        parts = [module(torch.as_tensor(x[i: i + step], dtype=torch.float32, device=device)).cpu()
                 for i in range(0, len(x), step)]
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


def evaluate(module: nn.Module, X, y: torch.Tensor, loss_fn, device: torch.device, step: int = 4096) -> dict:
    """Validation loss and accuracy of ``module`` on (X, y)."""
    logits = logits_of(module, X, device, step)
    return {"val_loss": float(loss_fn(logits, y)), "val_acc": float((logits.argmax(1) == y).float().mean())}


class Callback:
    """Hooks of the loop; ``on_epoch_end`` returns True to stop training."""

    def on_train_begin(self, module: nn.Module) -> None:
        pass

    def on_epoch_begin(self, epoch: int, module: nn.Module) -> None:
        pass

    def on_epoch_end(self, row: dict, module: nn.Module) -> bool:
        return False


class EarlyStopping(Callback):
    """Keep the weights of the epoch with the lowest validation loss (train loss without a
    validation split); stop after ``patience`` epochs without improvement (0: never)."""

    def __init__(self, patience: int):
        self.patience = patience

    def on_train_begin(self, module: nn.Module) -> None:
        self.best_, self.best_epoch_, self.misses_ = math.inf, -1, 0
        self.state_ = copy.deepcopy(module.state_dict())

    def offer(self, epoch: int, score: float, module: nn.Module) -> bool:
        """Keep ``module``'s weights if ``score`` beats the best so far."""
        if score < self.best_:
            self.best_, self.best_epoch_, self.misses_ = score, epoch, 0
            self.state_ = copy.deepcopy(module.state_dict())
            return True
        return False

    def on_epoch_end(self, row: dict, module: nn.Module) -> bool:
        has_val = "val_loss" in row
        if self.offer(row["epoch"], row["val_loss"] if has_val else row["train_loss"], module):
            return False
        self.misses_ += 1
        return has_val and bool(self.patience) and self.misses_ >= self.patience

    def restore(self, module: nn.Module) -> int:
        """Load the kept weights into ``module``; returns their epoch (0: the start, -1: none)."""
        module.load_state_dict(self.state_)
        return self.best_epoch_


class WarmUp(Callback):
    """For the first ``epochs`` epochs only the new layer learns; then ``params`` join."""

    def __init__(self, params: list[nn.Parameter], epochs: int):
        self.params, self.epochs = params, epochs

    def on_epoch_begin(self, epoch: int, module: nn.Module) -> None:
        probing = epoch <= self.epochs and bool(self.params)
        for p in self.params:
            p.requires_grad_(not probing)


class FrozenBatchNorm(Callback):
    """Pretrained batch-norm statistics stay as they are (eval mode inside a training epoch)."""

    def on_epoch_begin(self, epoch: int, module: nn.Module) -> None:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


class EpochLog(Callback):
    """Hands each epoch's row to ``show`` (the CLI prints it; trackers log it)."""

    def __init__(self, show: Callable[[dict], None]):
        self.show = show

    def on_epoch_end(self, row: dict, module: nn.Module) -> bool:
        self.show(row)
        return False


class FiniteLoss(Callback):
    """A loss that becomes NaN or infinite ends the run with an error that says what to do."""

    def on_epoch_end(self, row: dict, module: nn.Module) -> bool:
        if not all(math.isfinite(row[k]) for k in ("train_loss", "val_loss") if k in row):
            raise TrainingDiverged(f"loss is not finite at epoch {row['epoch']}; lower --lr")
        return False


def _home(dev: torch.device, nbytes: int) -> torch.device:
    """Where the training tensors live: on the GPU when they fit in 80% of its free memory,
    else in host memory, each batch copied over."""
    if dev.type != "cuda":
        return dev
    free, _ = torch.cuda.mem_get_info(dev)
    return dev if nbytes <= 0.8 * free else torch.device("cpu")


_TORCH_CONSTRAINTS = {
    "lr": [Interval(Real, 0, None, closed="neither")],
    "optimizer": [StrOptions(set(OPTIMIZERS))],
    "momentum": [Interval(Real, 0, 1, closed="both")],
    "weight_decay": [Interval(Real, 0, None, closed="left")],
    "step_size": [Interval(Integral, 1, None, closed="left")],
    "gamma": [Interval(Real, 0, None, closed="neither")],
    "epochs": [Interval(Integral, 1, None, closed="left")],
    "batch_size": [Interval(Integral, 1, None, closed="left")],
    "patience": [Interval(Integral, 0, None, closed="left")],
    "seed": [Interval(Integral, 0, 2**32 - 1, closed="both")],
    "device": [StrOptions({"auto", "cpu", "cuda"}), str],
}


class TorchHead(Head):
    """A head trained with cross-entropy by the loop above; subclasses build the module."""

    _eval_step: ClassVar[int] = 4096
    _parameter_constraints: ClassVar[dict] = _TORCH_CONSTRAINTS

    def _build_module(self, n_features: int | tuple[int, ...], n_classes: int, weights: str | None = None) -> nn.Module:
        raise NotImplementedError

    def _param_groups(self, module: nn.Module) -> list[dict]:
        """Optimizer parameter groups: all parameters at ``lr``."""
        return [{"params": list(module.parameters())}]

    def _callbacks(self, groups: list[dict]) -> list[Callback]:
        """Extra callbacks of this kind of head, run before the others each epoch."""
        return []

    def _start(self, module: nn.Module, X, y, dev: torch.device, n_classes: int) -> None:
        """Set the module's starting weights before the first epoch (a hook for the rest head's probe)."""

    def _device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def fit(self, X, y, X_val=None, y_val=None, *, classes=None, on_epoch: Callable[[dict], None] | None = None,
            train_views=None) -> TorchHead:
        """Train on (X, y); with (X_val, y_val), early stopping on validation loss keeps the best epoch.

        ``classes``: every label to have an output for; ``on_epoch`` gets each epoch's row;
        ``train_views`` (N, K, ...): each epoch trains on one randomly drawn view per image.
        ``X`` and ``X_val`` may be :class:`featcache.stream.Streamed` splits.
        """
        self._validate_params()
        X, y = self._check_train(X, y, classes)
        c = len(self.classes_)
        if c > MAX_CLASSES:
            raise ValueError(f"at most {MAX_CLASSES} classes; got {c}")
        self.input_shape_ = tuple(X.shape[1:])
        if train_views is not None:
            train_views = check_array(train_views, dtype=np.float32, allow_nd=True)
            if train_views.shape[0] != len(X) or train_views.shape[2:] != tuple(X.shape[1:]):
                raise ValueError(f"train_views must be (N, K) + the rows' shape; got {train_views.shape}")
        dev = self._device()
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(self.seed)
            self._fit(X, y, X_val, y_val, train_views, dev, c, on_epoch)
        return self

    def _fit(self, X, y, X_val, y_val, train_views, dev, c, on_epoch) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)  # chunk and window order of a streamed split
        shape = tuple(X.shape[1:])
        module = self._build_module(shape if self.takes_maps else shape[0], c).to(dev)
        groups = self._param_groups(module)
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
            if not isinstance(X_val, Streamed):
                X_val = self._check_predict_shape(X_val)
            xv = X_val if isinstance(X_val, Streamed) else torch.as_tensor(
                X_val, dtype=torch.float32, device=_home(dev, X_val.size * 4))
            yv = torch.as_tensor(self._encode(y_val), dtype=torch.long)
        if self.optimizer == "adam":
            opt = torch.optim.Adam(groups, lr=self.lr, weight_decay=self.weight_decay)
            sched = None
        else:
            opt = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.step_size, gamma=self.gamma)
        loss_fn = nn.CrossEntropyLoss()
        stopping = EarlyStopping(self.patience)
        callbacks = [*self._callbacks(groups), *([EpochLog(on_epoch)] if on_epoch else []), FiniteLoss(), stopping]
        for cb in callbacks:
            cb.on_train_begin(module)
        self._start(module, X, y, dev, c)
        if has_val and getattr(self, "probe_", None):  # the probe itself is the first candidate for the best epoch
            first = evaluate(module, xv, yv, loss_fn, dev, self._eval_step)
            stopping.offer(0, first["val_loss"], module)
            self.probe_["val_acc"] = first["val_acc"]
        history: list[dict] = []
        for epoch in range(1, self.epochs + 1):
            t = time.perf_counter()
            module.train()
            for cb in callbacks:
                cb.on_epoch_begin(epoch, module)
            row = {"epoch": epoch, **train_one_epoch(module, batches(), opt, loss_fn)}
            if sched is not None:
                sched.step()
            if has_val:
                row.update(evaluate(module, xv, yv, loss_fn, dev, self._eval_step))
            row["seconds"] = time.perf_counter() - t
            history.append(row)
            if any([cb.on_epoch_end(row, module) for cb in callbacks]):  # noqa: C419  (every callback runs)
                break
        self.best_epoch_ = stopping.restore(module)
        self.module_ = module.eval()
        self.history_ = history
        self.stopped_early_ = len(history) < self.epochs

    def _check_predict_shape(self, X):
        X = check_array(X, dtype=np.float32, allow_nd=self.takes_maps)
        if tuple(X.shape[1:]) != tuple(self.input_shape_):
            raise ValueError(f"X_val rows have shape {X.shape[1:]}, but the training rows {tuple(self.input_shape_)}")
        return X

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (N, len(classes_)) for an array or a streamed split."""
        X = self._check_predict(X)
        logits = logits_of(self.module_, X, next(self.module_.parameters()).device, self._eval_step)
        if not len(logits):
            return np.zeros((0, len(self.classes_)), dtype=np.float32)
        return torch.softmax(logits, 1).numpy()

    def torch_module(self) -> nn.Module:
        """The fitted network: prepared features → logits."""
        check_is_fitted(self)
        return self.module_

    # -- the saved form --------------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        self._check_saved()
        return {k: v.detach().cpu().numpy() for k, v in self.module_.state_dict().items()}

    def fitted_info(self) -> dict:
        self._check_saved()
        shape = list(self.input_shape_)
        return {"n_features_in": shape if self.takes_maps else shape[0], "n_classes": len(self.classes_),
                "best_epoch": self.best_epoch_}

    @classmethod
    def from_state(cls, params: dict, info: dict, arrays: dict[str, np.ndarray], network=None) -> TorchHead:
        """The fitted head of a checked record (on the CPU); ``network``: see :class:`~featcache.heads.rest.RestHead`."""
        kwargs = {**cls._init_params(params), "device": "cpu"}
        if "network" in cls.kind.unsaved:
            kwargs["network"] = network
        head = cls(**kwargs)
        d = info["n_features_in"]
        shape = tuple(d) if isinstance(d, list) else (d,)
        module = head._build_module(shape if cls.takes_maps else shape[0], info["n_classes"], weights="none")
        module.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
        head.module_ = module.eval()
        head.input_shape_ = shape
        head.n_features_in_ = shape[0]
        head.classes_ = np.arange(info["n_classes"])
        head.best_epoch_ = info.get("best_epoch")
        head.history_ = []
        return head
