"""The one error family: every user mistake is a FeatcacheError with a message that says
what was expected, what was given and what to do."""

from __future__ import annotations

__all__ = [
    "FeatcacheError",
    "DataError",
    "UnknownBackbone",
    "UnknownLayer",
    "WeightsError",
    "BackboneMismatch",
    "StoreError",
    "SetNotFound",
    "AmbiguousSet",
    "RunError",
    "OutputError",
    "os_error_text",
    "TrainingDiverged",
]


class FeatcacheError(Exception):
    """Base of every error featcache raises for a user's mistake or a bad input.

    ``param`` names the Python parameter whose value caused the error, when one did: the name a
    library function or config takes it by (``"layer"``, ``"split"``, ``"run"``). The command line
    maps it to its own option or argument in one place (``featcache.cli.kit.cli_param``) and
    reports a usage error for that option. ``param="layer"``, a flag, is the older spelling and
    still accepted: it is read as the parameter click would name after that flag.
    """

    param: str | None = None

    def __init__(self, *args: object, param: str | None = None) -> None:
        super().__init__(*args)
        if param is not None:
            self.param = param


class DataError(FeatcacheError, ValueError):
    """The image folder is missing, empty, inconsistent or holds unreadable files."""


class UnknownBackbone(FeatcacheError, ValueError):
    """A backbone name that is neither in the registry nor an importable factory."""

    param = "backbone"


class UnknownLayer(FeatcacheError, ValueError):
    """A layer name that the backbone does not have."""

    param = "layer"


class WeightsError(FeatcacheError, ValueError):
    """Weights that cannot be resolved, downloaded or loaded."""


class BackboneMismatch(FeatcacheError, ValueError):
    """The backbone rebuilt for a run computes another feature space than the run was trained on
    (other preprocessing, config, layer or library version with the same weights)."""


class StoreError(FeatcacheError, OSError):
    """The store is missing, unreadable or of an unknown format."""


class SetNotFound(StoreError, KeyError):
    """No feature set matches the requested key."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AmbiguousSet(StoreError, LookupError):
    """Several feature sets match and the user must choose one."""

    param = "set"


class RunError(FeatcacheError, OSError):
    """A run directory is missing or incomplete."""


class OutputError(FeatcacheError, OSError):
    """A file the user asked for (an export, a CSV) could not be written: a full disk, a read-only place."""


def os_error_text(e: OSError) -> str:
    """What a failed read or write ran into, in words: ``no space left on the device``, ``read-only file system`` ..."""
    import errno

    known = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
             errno.EACCES: "permission denied", errno.EPERM: "operation not permitted", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file too large (a file-size limit or the file system's)"}
    return known.get(e.errno, e.strerror or str(e) or e.__class__.__name__)


class TrainingDiverged(FeatcacheError, FloatingPointError):
    """The training loss became NaN or infinite (usually a learning rate that is too high)."""
