"""A sweep of N combinations in one ``featcache fit`` process (comma lists) against N separate
``featcache fit`` processes, on the same stored set, in one run: each side's whole wall time,
process start-up, loading and plots included (separate fits write plots for every run, as
they do by default; the sweep for the best run only), plus the separate fits without plots."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["GRID", "run_sweep"]

ROOT = Path(__file__).resolve().parents[1]
# 12 combinations: mlp 2 lr x 3 hidden, linear 2 lr, logreg and svm with C auto and 1
GRID = {"head": ["mlp", "linear", "logreg", "svm"], "lr": [1e-3, 1e-2], "hidden": [64, 128, 256], "C": ["auto", 1.0]}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _cli(args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "featcache.cli", "fit", *args], cwd=ROOT, check=True, capture_output=True,
                   text=True, env=env)
    return time.perf_counter() - t


def run_sweep(data: str, backbone: str = "efficientnet_lite0", layer: str | None = None, weights: str = "DEFAULT",
              grid: dict | None = None, epochs: int = 30, workers: int | None = None) -> dict:
    import featcache
    from featcache.config import FitConfig
    from featcache.prepare import HEAD_OPTIONS
    from featcache.heads import head_params
    from featcache.sweep import combinations

    grid = grid or GRID
    tmp = Path(tempfile.mkdtemp(prefix="featcache-sweep-"))
    try:
        store = str(tmp / "s.zarr")
        featcache.extract(backbone=backbone, layer=layer, weights=weights, data=data, store=store, workers=workers)
        configs = combinations(FitConfig(store=store, epochs=epochs), grid)
        common = ["--store", store, "--quiet", "--epochs", str(epochs)]
        one = [*common, "--out", str(tmp / "sweep")] + [a for k, v in grid.items()
                                                        for a in (_flag(k), ",".join(map(str, v)))]
        sweep_s = _cli(one)
        separate = {"plots": 0.0, "no_plots": 0.0}
        same = 0
        doc = json.loads((tmp / "sweep" / "sweep.json").read_text())
        for i, cfg in enumerate(configs):
            takes = set(head_params(cfg.head))
            args = ["--head", cfg.head] + [a for k in grid if k != "head" and k in takes
                                           for a in (_flag(k), str(getattr(cfg, k)))]
            if "epochs" not in takes:
                args += ["--store", store, "--quiet"]
            else:
                args += common
            for kind, extra in (("plots", []), ("no_plots", ["--no-plots"])):
                out = tmp / f"{kind}-{i}"
                separate[kind] += _cli(args + extra + ["--out", str(out)])
            val = featcache.read_run(tmp / f"plots-{i}").metrics["val"]["top1"]
            row = next(r for r in doc["rows"] if r["run"].startswith(f"{i + 1:02d}-"))
            same += val == row["val_top1"]
        assert all(k in HEAD_OPTIONS or k == "head" for k in grid)
        return {"backbone": backbone, "combinations": len(configs), "epochs": epochs, "sweep_s": sweep_s,
                "separate_s": separate["plots"], "separate_no_plots_s": separate["no_plots"],
                "ratio": separate["plots"] / sweep_s, "ratio_no_plots": separate["no_plots"] / sweep_s,
                "same_val_top1": f"{same}/{len(configs)}", "best": doc["best"],
                "best_val_top1": doc["rows"][0]["val_top1"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
