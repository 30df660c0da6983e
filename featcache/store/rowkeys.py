"""Row keys as fixed-width byte strings: what the row index sorts and searches.

numpy compares ``S`` items bytewise, as unsigned bytes, over their whole width, so one sorted
``S32`` array and ``np.searchsorted`` find N keys among R rows in O(N log R), with 32 bytes per row
and no Python object per row (a ``dict`` of hex strings held about 240 bytes per row). A plain
space's keys are the 32 digest bytes; where any segment holds augmented views, every key is 37
bytes: the digest, a flag (0: plain row, 1: view) and the view number (int32, big-endian), so
``<hex>`` and ``<hex>:<k>`` never meet, as their strings never do.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from ..keys import row_key

__all__ = ["key_width", "encode_keys", "decode_keys", "query_keys", "sort_keys"]

_PLAIN, _VIEWED = 32, 37
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-f]*")


def key_width(views: Iterable[np.ndarray | None]) -> int:
    """The key width of a space whose segments have these ``view`` arrays (None: plain rows)."""
    return _VIEWED if any(v is not None for v in views) else _PLAIN


def encode_keys(digests: np.ndarray, views: np.ndarray | None, width: int) -> np.ndarray:
    """Row keys as an (N,) ``S<width>`` array (see :func:`key_width`)."""
    n = len(digests)
    if width == _PLAIN:
        if views is not None:
            raise ValueError("augmented views need keys of width 37")
        return np.ascontiguousarray(digests, dtype=np.uint8).reshape(n, 32).view(f"S{_PLAIN}").reshape(n)
    buf = np.zeros((n, width), dtype=np.uint8)
    buf[:, :32] = digests
    if views is not None:
        buf[:, 32] = 1
        buf[:, 33:] = np.asarray(views, dtype=">i4").reshape(n, 1).view(np.uint8)
    return buf.view(f"S{width}").reshape(n)


def decode_keys(keys: np.ndarray) -> list[str]:
    """The inverse of :func:`encode_keys`: ``<hex>`` or ``<hex>:<view>`` strings."""
    width = keys.dtype.itemsize
    raw = np.ascontiguousarray(keys).view(np.uint8).reshape(len(keys), width)
    text = np.ascontiguousarray(raw[:, :32]).tobytes().hex()
    base = [text[i : i + 64] for i in range(0, len(text), 64)]
    if width == _PLAIN:
        return base
    views = np.ascontiguousarray(raw[:, 33:]).view(">i4").reshape(len(keys)).tolist()
    return [b if not flag else row_key(b, v) for b, flag, v in zip(base, raw[:, 32].tolist(), views)]


def query_keys(keys: Sequence[str], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row keys to look up → (their :func:`encode_keys` form, which of them are well formed). A key that is not
    exactly what :func:`~featcache.keys.row_key` writes (64 lowercase hex digits, ``:<int32>`` for a view) can
    match no stored row: it is marked not well formed, never read loosely (``ABC…`` or ``<hex>:01``)."""
    n = len(keys)
    ok = np.ones(n, dtype=bool)
    try:  # the common case, plain well-formed keys, without a Python step per key
        joined = "".join(keys)
        plain = len(joined) == 64 * n and set(map(len, keys)) <= {64} and _HEX.fullmatch(joined) is not None
    except TypeError:
        plain = False
    if plain:
        digests = np.frombuffer(bytes.fromhex(joined), dtype=np.uint8).reshape(n, 32)
        return encode_keys(digests, None, width), ok
    hexes: list[str] = []
    views: list[int] = []
    viewed = np.zeros(n, dtype=bool)
    for i, k in enumerate(keys):
        h, sep, v = k.partition(":") if isinstance(k, str) else ("", "", "")
        good = _HEX64.fullmatch(h) is not None
        if good and sep:
            view = _int32(v)
            if view is not None and row_key(h, view) == k and width == _VIEWED:
                views.append(view)
                viewed[i] = True
            else:
                good = False
        ok[i] = good
        hexes.append(h if good else "0" * 64)
    digests = np.frombuffer(bytes.fromhex("".join(hexes)), dtype=np.uint8).reshape(n, 32)
    if width == _PLAIN:
        return encode_keys(digests, None, width), ok
    out = encode_keys(digests, None, width)
    raw = out.view(np.uint8).reshape(n, width)
    raw[viewed, 32] = 1
    raw[viewed, 33:] = np.array(views, dtype=">i4").reshape(-1, 1).view(np.uint8)
    return out, ok


def _int32(text: str) -> int | None:
    try:
        value = int(text)
    except ValueError:
        return None
    return value if -(2**31) <= value < 2**31 else None


def sort_keys(keys: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """The stable sort permutation of ``keys`` (``S<width>``; ``raw`` the same bytes as (N, width) uint8).

    Sorted by their first 8 bytes as big-endian integers (SHA-256 digests: distinct keys differ there but
    for a chance of about R^2 / 2^65), 3x faster than comparing 32-byte strings; where two neighbours
    share those bytes but not the whole key (possible in a crafted store), by the whole keys instead."""
    n = len(keys)
    if n < 2 or raw.shape[1] != 32:  # keys of views share their digest: compared whole
        return np.argsort(keys, kind="stable")
    prefix = np.ascontiguousarray(raw[:, :8]).view(">u8").reshape(n)
    order = np.argsort(prefix, kind="stable")
    ordered = prefix[order]
    tied = np.flatnonzero(ordered[1:] == ordered[:-1])
    if len(tied) and (keys[order[tied]] != keys[order[tied + 1]]).any():
        return np.argsort(keys, kind="stable")
    return order
