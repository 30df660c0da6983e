"""Sizes and time stamps as people write and read them: ``4GB`` in, ``1.2 MB`` and ISO times out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

__all__ = ["human_bytes", "parse_size", "now_iso", "parse_time"]


def human_bytes(n: float) -> str:
    """1234567 → '1.2 MB' (decimal units)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def parse_time(value: Any) -> datetime | None:
    """An ISO time stamp written by ``now_iso``, or None when it is not one."""
    try:
        stamp = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=UTC)


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int | float) -> int:
    """``"4GB"``, ``"512MiB"``, ``"1.5g"``, ``2_000_000`` → bytes (> 0)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        number, unit = float(text), ""
    else:
        s = str(text).strip().lower().replace(" ", "")
        digits = s.rstrip("abcdefghijklmnopqrstuvwxyz")
        number, unit = (float(digits) if digits else float("nan")), s[len(digits):]
    size = number * _UNITS.get(unit, float("nan"))
    if not 1 <= size < 2**63:  # also NaN, a size that rounds to 0 bytes and one that overflows
        raise ValueError(f"expected a size like 4GB, 512MiB or 2000000 (bytes), at least 1 byte; got {text!r}")
    return int(size)
