"""Several cuts of one traced network in one pass, each exactly the value that cut computes alone.

A cut alone runs its node's ancestors and stops; a joint pass runs the ancestors of every cut,
in network order. Two things can then differ, and both are handled here:

* **a later in-place op on the returned value** (``ReLU(inplace=True)`` after a batch norm,
  ``x += shortcut`` in a residual block, a view of a tensor written later): every returned node
  is copied right after it runs (``snapshot``), before any later node, so the pass returns the
  value the node computed;
* **an in-place write by a node the cut alone never runs**, on a tensor the cut reads after that
  write. ``written`` runs the graph once on a probe and records, from the tensors' version
  counters, which node wrote to which node's tensor (views share their base's counter);
  ``needs_own_pass`` names the cuts such a write reaches. Those are computed on their own.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

__all__ = ["resolve_node", "resolve_all", "snapshot", "written", "needs_own_pass", "graphs_of", "alone_graph"]

_COPY = "featcache_copy"  # marks the copies snapshot inserts


def resolve_node(nodes: list[str], layer: str) -> str:
    """The node a cut at ``layer`` returns: ``layer`` itself, or the last node inside that module,
    as ``create_feature_extractor`` picks it (``nodes``: qualified node names in network order)."""
    parts = layer.split(".")
    inside = [n for n in nodes if n.split(".")[: len(parts)] == parts]
    return inside[-1] if inside else layer


def resolve_all(nodes: list[str], layers: list[str]) -> list[str]:
    """``resolve_node`` for each layer: two names of one node (``layer1`` and ``layer1.1``) become one query."""
    return [resolve_node(nodes, layer) for layer in layers]


def graphs_of(module: fx.GraphModule) -> list[fx.Graph]:
    """The graphs of a traced module (a torchvision ``DualGraphModule`` keeps one per mode)."""
    found = [getattr(module, "train_graph", None), getattr(module, "eval_graph", None), module.graph]
    return list({id(g): g for g in found if g is not None}.values())


def snapshot(module: fx.GraphModule) -> fx.GraphModule:
    """Return, for each output of ``module``, a copy taken right after its node ran (in place)."""
    for graph in graphs_of(module):
        out = next(n for n in graph.nodes if n.op == "output")
        copies: dict[fx.Node, fx.Node] = {}
        for node in out.all_input_nodes:
            if node.op == "placeholder" or node in copies:
                continue
            with graph.inserting_after(node):
                copies[node] = graph.call_function(torch.clone, (node,))
                copies[node].meta[_COPY] = True
        out.args = fx.node.map_arg(out.args, lambda n: copies.get(n, n))  # noqa: B023  (called here, at once)
    module.recompile()
    return module


class _Writes(fx.Interpreter):
    """Runs a graph and records which node wrote in place to the tensor of which earlier node."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module, garbage_collect_values=False)
        self.versions: dict[str, tuple[torch.Tensor, int]] = {}
        self.writes: dict[str, set[str]] = {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        for name, (t, v) in self.versions.items():
            if t._version != v:
                self.writes.setdefault(n.name, set()).add(name)
                self.versions[name] = (t, t._version)
        if isinstance(result, torch.Tensor):
            self.versions[n.name] = (result, result._version)
        return result


def written(module: fx.GraphModule, x: torch.Tensor) -> tuple[dict[str, set[str]], object]:
    """({node name: names of the earlier nodes whose tensors it wrote to in place}, the module's output),
    for one run on ``x``."""
    runner = _Writes(module)
    with torch.no_grad():
        out = runner.run(x)
    return runner.writes, out


def needs_own_pass(joint: fx.Graph, alone: list[fx.Graph | None], writes: dict[str, set[str]]) -> list[bool]:
    """For each cut (its own graph in ``alone``; None when it has none): True when, in ``joint``, a node the
    cut alone does not run writes in place to a tensor that the cut reads afterwards."""
    order = {n.name: i for i, n in enumerate(joint.nodes)}
    reads = {n.name: {m.name for m in n.all_input_nodes} for n in joint.nodes}
    flags = []
    for graph in alone:
        if graph is None:
            flags.append(True)
            continue
        own = {n.name for n in graph.nodes if n.op not in ("placeholder", "output") and not n.meta.get(_COPY)}
        if not own <= order.keys():  # the two traces differ: no claim can be made about one pass
            flags.append(True)
            continue
        hit = False
        for writer, targets in writes.items():
            if writer in own or writer not in order:
                continue
            hit = any(order[k] > order[writer] and reads[k] & targets for k in own)
            if hit:
                break
        flags.append(hit)
    return flags


def alone_graph(cut: nn.Module) -> fx.Graph | None:
    """The graph a single cut runs, when it is a traced one."""
    graph = getattr(cut, "graph", None)
    return graph.graph if isinstance(graph, fx.GraphModule) else None
