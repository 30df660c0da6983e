"""The network after the cut, for a ``rest`` head: the builder fit, evaluate, predict and report
hand to :class:`~featcache.heads.rest.RestHead`, so the heads wing imports no backbone code.

The trust rule lives here: a ``module:factory`` network (or a local ``hf:FOLDER``) named by a
store or a run is imported only when it is the user's own ``--backbone``; nothing read from a
run chooses code to run. ``featcache.load_head(folder, backbone)`` is the public way to load a
saved head with that builder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UnknownBackbone
from .heads import read_head

__all__ = ["RestNetwork", "load_head"]


@dataclass(frozen=True)
class RestNetwork:
    """Builds the pretrained network after ``rest_of``'s layer with a new last layer for ``n_classes``.

    ``backbone``: the user's ``--backbone``, the only ``module:factory`` network it may import."""

    backbone: str | None = None

    def __call__(self, rest_of: dict, weights: str | None, n_classes: int):
        from .backbones import create_rest, trusted_only

        name = rest_of["backbone"]
        if not isinstance(name, str) or (trusted_only(name) and name != self.backbone):
            raise UnknownBackbone(
                f"the rest head continues the user module {name!r}; featcache never imports code named by a "
                f"store or a run. Pass --backbone {name} to import it (installed or on PYTHONPATH)."
            )
        return create_rest(name, rest_of["layer"], weights, n_classes)


def load_head(folder: str | Path, backbone: str | None = None):
    """The head saved in ``folder``; a damaged or hostile ``head.json``/``head.npz`` is a RunError.

    ``backbone`` is the user's --backbone, needed to rebuild a rest head that continues a
    ``module:factory`` network (never imported because a run names it)."""
    return read_head(Path(folder), RestNetwork(backbone))
