"""The built-in sample: scikit-learn's bundled handwritten digits as a PNG ImageFolder.

No download: the 1,797 8x8 digits ship inside scikit-learn. They are written as
``OUT/{train,val,test}/<digit>/<index>.png`` (60/20/20, stratified, seeded).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError

__all__ = ["write_digits"]

MARKER = ".featcache-sample"


def write_digits(out: str | Path = "data", size: int = 32, seed: int = 0) -> dict[str, int]:
    """Materialise the digits; returns images per split. Re-running on its own output is a no-op."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if (out / MARKER).exists():
            return {s: sum(1 for _ in (out / s).rglob("*.png")) for s in ("train", "val", "test")}
        raise DataError(f"{out} exists and is not the sample folder; choose an empty --out", param="out")
    if out.is_dir():
        # an empty folder that exists (``--out .``, the current one) stays that folder: the sample is written
        # into a hidden folder inside it and moved up, the marker last (a re-run then sees the sample)
        tmp, inside = out / f".featcache-sample.{os.getpid()}.tmp", True
    else:
        absolute = Path(os.path.abspath(out))
        tmp, inside = absolute.with_name(f".{absolute.name}.{os.getpid()}.tmp"), False  # renamed to OUT when complete
    try:
        counts = _write(tmp, size, seed)
        (tmp / MARKER).write_text("scikit-learn digits, written by featcache sample\n")
        if inside:
            for split in ("train", "val", "test", MARKER):
                os.replace(tmp / split, out / split)
        else:
            os.replace(tmp, out)
    except OSError as e:  # named by the folder asked for, not the temporary one
        raise OSError(e.errno, e.strerror, str(out)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


def _write(out: Path, size: int, seed: int) -> dict[str, int]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx = np.arange(len(digits.target))
    train, rest = train_test_split(idx, train_size=0.6, stratify=digits.target, random_state=seed)
    val, test = train_test_split(rest, train_size=0.5, stratify=digits.target[rest], random_state=seed)
    counts = {}
    for split, members in (("train", train), ("val", val), ("test", test)):
        for i in members:
            folder = out / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            ink = (255 - digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # dark ink on white
            Image.fromarray(ink, "L").resize((size, size), Image.BILINEAR).save(folder / f"{i:04d}.png")
        counts[split] = len(members)
    return counts
