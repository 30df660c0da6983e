"""``rest``: the pretrained remainder of the backbone after the cached layer, its last Linear
replaced for the set's classes, fine-tuned on cached feature maps.

The network is built by the ``network`` it is handed (``featcache.tails.RestNetwork`` in fit,
evaluate, predict and report), so this wing imports no backbone code and nothing read from a run
chooses code to run: the builder carries the user's own ``--backbone``."""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions
from torch import nn

from ..choices import INITS
from ..errors import UnknownLayer
from ..stream import Streamed
from .base import Callback, FrozenBatchNorm, TorchHead, WarmUp, logits_of

__all__ = ["RestHead"]


class RestHead(TorchHead):
    """The network after the cut, pretrained layers at ``lr * pretrained_lr_scale``, ``freeze``
    layers fixed, batch-norm statistics kept; the new layer starts as a logistic-regression
    probe (``init="probe"``) or random, and ``warmup_epochs`` train it alone first.

    ``rest_of`` names the set's backbone, layer and weights. ``network(rest_of, weights, n_classes)``
    builds the network after the cut with a new last layer and returns ``(module, name of the new
    layer)``; it is never saved with the head (``featcache.tails.RestNetwork(backbone)`` imports a
    ``module:factory`` network only when it is the user's own ``--backbone``).
    """

    name = "rest"
    _eval_step = 256
    _parameter_constraints = {**TorchHead._parameter_constraints,
                              "rest_of": [dict, None],
                              "pretrained_lr_scale": [Interval(Real, 0, None, closed="left")],
                              "freeze": [tuple, list],
                              "warmup_epochs": [Interval(Integral, 0, None, closed="left")],
                              "init": [StrOptions(set(INITS))],
                              "network": [callable, None]}

    def __init__(self, rest_of: dict | None = None, pretrained_lr_scale: float = 0.1, freeze: tuple[str, ...] = (),
                 warmup_epochs: int = 0, init: str = "probe", network=None, lr: float = 1e-3,
                 optimizer: str = "adam", momentum: float = 0.9, weight_decay: float = 0.0, step_size: int = 10,
                 gamma: float = 0.1, epochs: int = 30, batch_size: int = 64, patience: int = 10, seed: int = 0,
                 device: str = "auto"):
        self.rest_of = rest_of
        self.pretrained_lr_scale = pretrained_lr_scale
        self.freeze = freeze
        self.warmup_epochs = warmup_epochs
        self.init = init
        self.network = network
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

    def _build_module(self, n_features, n_classes: int, weights: str | None = None) -> nn.Module:
        spec = self.rest_of or {}
        if not {"backbone", "layer", "weights"} <= set(spec):
            raise ValueError("the rest head needs rest_of={'backbone', 'layer', 'weights'} of the feature set")
        if self.network is None:
            raise ValueError("the rest head needs network=, a builder of the network after the cut "
                             "(featcache.tails.RestNetwork(backbone))")
        name = spec["backbone"]
        module, new_layer = self.network(spec, weights or spec["weights"], n_classes)
        if not new_layer:
            raise UnknownLayer(f"nothing after {spec['layer']!r} in {name} is left to train; cut at an earlier layer "
                               "or use --head linear")
        self.new_layer_ = new_layer
        return module

    def _param_groups(self, module: nn.Module) -> list[dict]:
        """The new layer at ``lr``, pretrained layers at ``lr * pretrained_lr_scale``, frozen ones left out."""
        names = [n for n, _ in module.named_parameters()]
        for f in self.freeze:
            if not any(n == f or n.startswith(f + ".") for n in names):
                layers = sorted({n.rsplit(".", 1)[0] for n in names})
                raise UnknownLayer(
                    f"--freeze {f!r} matches no layer after the cut. Layers: {', '.join(layers)}", param="freeze"
                )
        new, old = [], []
        for name, p in module.named_parameters():
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

    def _callbacks(self, groups: list[dict]) -> list[Callback]:
        pretrained = [p for g in groups[1:] for p in g["params"]]
        return [WarmUp(pretrained, self.warmup_epochs), FrozenBatchNorm()]

    @torch.no_grad()
    def _start(self, module: nn.Module, X, y, dev: torch.device, n_classes: int) -> None:
        """With ``init="probe"``, set the new layer to a logistic regression (C = 1, on standardised
        inputs, folded back into the layer) fitted on what the pretrained layers feed it."""
        from .logreg import LogRegHead

        self.probe_ = None
        if self.init != "probe":
            return
        layer = module.get_submodule(self.new_layer_)
        inputs: list[torch.Tensor] = []
        hook = layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().float().cpu()))
        try:
            if isinstance(X, Streamed):
                labels = []
                for x, dest in X.ordered():
                    logits_of(module, x, dev, self._eval_step)
                    labels.append(X.labels[dest])
                y = np.concatenate(labels)
            else:
                logits_of(module, X, dev, self._eval_step)
        finally:
            hook.remove()
        z = torch.cat(inputs).numpy()
        probe = LogRegHead(C=1.0, seed=self.seed).fit(z, np.asarray(y), classes=np.arange(n_classes))
        est, scaler = probe.estimator_, probe.scaler_
        coef, intercept = est.coef_, est.intercept_
        if len(est.classes_) == 2 and coef.shape[0] == 1:  # sklearn's binary form: one score for class 1
            coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
        weight = np.zeros((n_classes, z.shape[1]))
        bias = np.full(n_classes, -1e4 if len(est.classes_) < n_classes else 0.0)  # absent classes stay unlikely
        weight[est.classes_] = coef / scaler.scale_
        bias[est.classes_] = intercept - (coef * scaler.mean_ / scaler.scale_).sum(1)
        layer.weight.copy_(torch.as_tensor(weight, dtype=layer.weight.dtype))
        layer.bias.copy_(torch.as_tensor(bias, dtype=layer.bias.dtype))
        self.probe_ = {"C": 1.0, "train_acc": float((probe.predict(z) == np.asarray(y)).mean()),
                       "converged": probe.converged_}

    def fitted_info(self) -> dict:
        info = {**super().fitted_info(), "new_layer": self.new_layer_}
        if getattr(self, "probe_", None):
            info["probe"] = self.probe_
        return info

    @classmethod
    def from_state(cls, params: dict, info: dict, arrays: dict, network=None) -> RestHead:
        head = super().from_state(params, info, arrays, network)
        head.probe_ = info.get("probe")
        return head
