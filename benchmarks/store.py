"""What the content-addressed store saves: re-runs, incremental adds, and files on disk.

* second identical extract / first extract (wall time, same process, same machine);
* extract after adding 10% new images / full extract of the folder;
* files per 10,000 images for common feature shapes (one writer, one segment).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import featcache

__all__ = ["run_store", "files_per_10k", "compaction"]


def compaction(data: str, backbone: str, layer: str | None = None, weights: str = "DEFAULT",
               workers: int | None = None, checkpoint_s: float = 1.0, batch_size: int = 64) -> dict:
    """A checkpointed extract (a segment every ``checkpoint_s``) before and after compact + gc:
    segments, files and files per 10,000 images, and the seconds compaction took."""
    from featcache.store.maintenance import compact, gc

    tmp = Path(tempfile.mkdtemp(prefix="featcache-compact-"))
    try:
        url = str(tmp / "s.zarr")
        r = featcache.extract(data=data, store=url, backbone=backbone, layer=layer, weights=weights,
                              workers=workers, checkpoint_s=checkpoint_s, batch_size=batch_size)

        def count() -> tuple[int, int]:
            st = featcache.open_store(url)
            return (sum(len(st.segment_groups(s)) for s in st.spaces()),
                    sum(1 for p in Path(url).rglob("*") if p.is_file()))

        seg_before, files_before = count()
        t = time.perf_counter()
        compact(featcache.open_store(url, mode="r+"))
        compact_s = time.perf_counter() - t
        gc(featcache.open_store(url, mode="r+"), grace_s=0)
        seg_after, files_after = count()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    per10k = 10_000 / max(r.images, 1)
    return {"backbone": backbone, "images": r.images, "checkpoint_s": checkpoint_s, "segments_before": seg_before,
            "files_before": files_before, "files_per_10k_before": files_before * per10k, "segments_after": seg_after,
            "files_after": files_after, "files_per_10k_after": files_after * per10k, "compact_s": compact_s}

SHAPES = {"pooled 1280": (1280,), "vgg16 features 512x7x7": (512, 7, 7), "spatial 1280x7x7": (1280, 7, 7)}


def _copy_without(src: Path, dst: Path, every: int) -> list[Path]:
    """Copy ``src`` to ``dst`` leaving out every ``every``-th training image; returns those left out."""
    shutil.copytree(src, dst)
    left = sorted((dst / "train").rglob("*.*"))[::every]
    held = dst.parent / "held"
    held.mkdir()
    out = []
    for p in left:
        target = held / p.relative_to(dst).as_posix().replace("/", "__")
        shutil.move(p, target)
        out.append((target, p))
    return out


def run_store(data: str, backbone: str, layer: str | None = None, weights: str = "DEFAULT", workers: int | None = None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="featcache-store-"))
    try:
        kw = dict(backbone=backbone, layer=layer, weights=weights, workers=workers)

        def timed(folder: Path, store: Path):
            t = time.perf_counter()
            r = featcache.extract(data=str(folder), store=str(store), **kw)
            return time.perf_counter() - t, r

        full_s, full = timed(Path(data), tmp / "a.zarr")
        again_s, again = timed(Path(data), tmp / "a.zarr")
        moved = _copy_without(Path(data), tmp / "copy", every=10)
        timed(tmp / "copy", tmp / "b.zarr")
        for held, original in moved:
            shutil.move(held, original)
        add_s, add = timed(tmp / "copy", tmp / "b.zarr")
        files = sum(1 for p in (tmp / "a.zarr").rglob("*") if p.is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "backbone": backbone,
        "images": full.images,
        "first_s": full_s,
        "second_s": again_s,
        "second_over_first": again_s / full_s,
        "second_extracted": again.extracted,
        "added_images": add.extracted,
        "add_s": add_s,
        "add_over_full": add_s / full_s,
        "store_files": files,
    }


def files_per_10k(rows: int = 10_000) -> list[dict]:
    """Files that ``rows`` rows take in one segment, for each common shape (synthetic rows)."""
    out = []
    for label, shape in SHAPES.items():
        tmp = Path(tempfile.mkdtemp(prefix="featcache-files-"))
        try:
            st = featcache.open_store(str(tmp / "s.zarr"))
            space = st.ensure_space({"label": label})
            seg = st.new_segment(space, rows, shape, "float16")
            rng = np.random.default_rng(0)
            for start in range(0, rows, 1000):
                n = min(1000, rows - start)
                seg.append(rng.random((n,) + shape, dtype=np.float32).astype(np.float16),
                           [f"{start + i:064x}" for i in range(n)])
            seg.commit()
            seg_dir = next(p for p in (tmp / "s.zarr" / "spaces" / space / "segments").iterdir() if p.is_dir())
            files = sum(1 for p in seg_dir.rglob("*") if p.is_file())
            out.append({"shape": label, "rows": rows, "files": files, "files_per_10k": files * 10_000 / rows,
                        "shard_rows": seg.shard_rows})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
