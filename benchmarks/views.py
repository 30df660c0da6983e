"""Augmented views: validation accuracy with K = 0, 1, 4, 8 views per training image,
against what they cost in bytes and extract time (fresh store for each K)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import featcache

__all__ = ["run_views"]


def run_views(data: str, backbone: str = "efficientnet_lite0", weights: str = "DEFAULT", ks=(0, 1, 4, 8),
              epochs: int = 30, workers: int | None = None) -> list[dict]:
    rows = []
    for k in ks:
        tmp = Path(tempfile.mkdtemp(prefix="featcache-views-"))
        try:
            store = str(tmp / "s.zarr")
            t = time.perf_counter()
            r = featcache.extract(backbone=backbone, weights=weights, data=data, store=store, views=k, workers=workers)
            extract_s = time.perf_counter() - t
            st = featcache.open_store(store)
            fs = st.get_set(r.set_key)
            view_bytes = st.space_stats(fs.attrs["view_space"])["bytes_stored"] if k else 0
            row = {"views": k, "extract_s": extract_s, "view_rows": r.views_extracted, "view_bytes": view_bytes,
                   "base_bytes": st.space_stats(fs.space)["bytes_stored"]}
            for head in ("mlp", "logreg"):
                options = {"epochs": epochs, "patience": 0} if head == "mlp" else {"C": 1.0}
                res = featcache.fit(head=head, store=store, plots=False, runs=str(tmp / "runs"), **options)
                row[f"{head}_val"] = res.metrics["val"]["top1"]
            rows.append(row)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows
