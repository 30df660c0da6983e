"""Peak memory of ``predict`` on 100 against 2,000 new images: streaming keeps it flat.

The images are new bytes (crops of the photos in ``--data``, resized, saved as JPEG into a
temporary folder), so every one goes through the reader and the backbone; none is in the
store. Each predict runs in a fresh process that reports its RSS just before predicting
(Python, torch, featcache imported, the run loaded once: the base), its own peak RSS
(``VmHWM``) and the largest peak of its DataLoader worker processes.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["make_images", "run_predict"]


def make_images(source: str | Path, out: str | Path, n: int, seed: int = 0, size: int = 320) -> Path:
    """``n`` JPEGs in ``out``: seeded random crops (50-100% of each side) of the images below ``source``,
    resized so the long side is at most ``size``."""
    from featcache.data import is_image_name, load_rgb

    files = sorted(p for p in Path(source).rglob("*") if p.is_file() and is_image_name(p.name))
    if not files:
        raise ValueError(f"no images below {source}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        img = load_rgb(files[k % len(files)])
        w, h = img.size
        cw, ch = max(1, int(w * rng.uniform(0.5, 1))), max(1, int(h * rng.uniform(0.5, 1)))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x, y, x + cw, y + ch))
        crop.thumbnail((size, size))
        crop.save(out / f"img_{k:05d}.jpg", quality=90)
    return out


def _status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(run: str, folder: str, workers: str, backbone: str | None) -> None:
    from featcache.predict import _load, predict

    _load(run, backbone)  # torch, the backbone and the head in memory: the base
    base = _status_mb("VmRSS")
    t = time.perf_counter()
    res = predict(run, [folder], top_k=1, backbone=backbone, workers=None if workers == "auto" else int(workers),
                  device="cpu")
    seconds = time.perf_counter() - t
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"base_rss_mb": base, "peak_rss_mb": _status_mb("VmHWM"), "workers_peak_rss_mb": workers_peak,
                      "seconds": seconds, "images": len(res), "computed": res.counts.computed,
                      "from_store": res.counts.from_store, "failed": sum(r.error is not None for r in res)}))


def run_predict(data: str, backbone: str = "efficientnet_lite0", weights: str = "DEFAULT", counts=(100, 2000),
                workers: tuple[int | None, ...] = (0, None), head: str = "logreg") -> list[dict]:
    """Fit a head on ``data`` (extract + fit into a temporary store), then predict on ``counts`` new images
    each, once per ``workers`` setting (0: decode in the process itself; None: predict's default)."""
    import featcache
    from featcache.heads import head_params

    tmp = Path(tempfile.mkdtemp(prefix="featcache-predict-"))
    try:
        store = str(tmp / "s.zarr")
        featcache.extract(backbone=backbone, data=data, store=store, weights=weights, workers=0)
        extra = {"epochs": 5} if "epochs" in head_params(head) else {}
        run = featcache.fit(head=head, store=store, out=str(tmp / "run"), plots=False, **extra).run_dir
        user = backbone if ":" in backbone else None
        folders = {n: make_images(data, tmp / f"images-{n}", n) for n in counts}
        rows = []
        for w in workers:
            mine = []
            for n in counts:
                proc = subprocess.run(
                    [sys.executable, "-m", "benchmarks.predict", str(run), str(folders[n]),
                     "auto" if w is None else str(w), user or ""],
                    capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
                )
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                r.update(backbone=backbone, workers="auto" if w is None else w,
                         predict_rss_mb=r["peak_rss_mb"] - r["base_rss_mb"], images_per_s=r["images"] / r["seconds"])
                mine.append(r)
            for r in mine:
                r["peak_over_smallest"] = r["peak_rss_mb"] / mine[0]["peak_rss_mb"]
            rows += mine
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] or None)
