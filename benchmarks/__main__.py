"""``python -m benchmarks [transfer|storage|store|throughput|memory|scaleout|ray|views|predict|cli|sweep|formats|layers|peers|scale|all]``:
run, print Markdown tables, save JSON (``scale`` runs only when named: it takes minutes and GBs of temporary files).

A case is ``NAME[/LAYER][@WEIGHTS]``, e.g. ``resnet18@none``, ``efficientnet_lite0``,
``vgg16/features@DEFAULT``. Results go to benchmarks/results/<bench>-<machine>-<time>.json.
"""

from __future__ import annotations

from pathlib import Path

import click

from .common import machine, machine_label, save, table

DEFAULT_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera")

TRANSFER_COLUMNS = [
    ("backbone", "backbone"), ("layer", "layer"), ("head", "head"), ("epochs", "epochs"), ("images", "images"),
    ("extract_s", "extract s"), ("e2e_epoch_s", "e2e s/epoch"), ("cached_epoch_s", "cached s/epoch"),
    ("epoch_speedup", "epoch speedup"), ("e2e_total_s", "e2e total s"), ("cached_total_s", "cached total s"),
    ("total_speedup", "total speedup"), ("total_speedup_per_epoch", "total speedup / E"),
    ("val_acc_e2e", "val acc e2e"), ("val_acc_cached", "val acc cached"), ("val_images_apart", "images apart"),
]
FORMAT_COLUMNS = [
    ("format", "format"), ("code", "written and read by"), ("rounds", "rounds"), ("extract_s", "extract s"),
    ("extract_vs_old", "vs format 1"), ("read_gbs", "read GB/s (float32)"), ("read_vs_old", "vs format 1"),
    ("files", "files"), ("files_per_10k", "files / 10k images"), ("bytes", "bytes"), ("bytes_vs_old", "vs format 1"),
    ("same_rows", "same rows and labels"),
]
PROCESS_COLUMNS = [
    ("backbone", "backbone"), ("weights", "weights"), ("head", "head"), ("epochs", "epochs"), ("rounds", "rounds"),
    ("featcache_extract_s", "featcache extract s"), ("featcache_s", "featcache extract + fit s"),
    ("e2e_s", "plain loop script s"), ("speedup", "speedup (median)"), ("speedups", "per round"),
]
STORAGE_COLUMNS = [
    ("features", "features"), ("shape", "shape"), ("dtype", "dtype"), ("codec", "codec"),
    ("bytes_per_image", "bytes/image"), ("ratio", "ratio"), ("write_gbs", "write GB/s"), ("read_gbs", "read GB/s"),
]

STORE_COLUMNS = [
    ("backbone", "backbone"), ("images", "images"), ("first_s", "first extract s"), ("second_s", "identical re-run s"),
    ("second_over_first", "re-run / first"), ("added_images", "images added"), ("add_s", "add 10% s"),
    ("add_over_full", "add 10% / full"), ("store_files", "files in store"),
]
EXTRACT_COLUMNS = [
    ("backbone", "backbone"), ("images", "images"), ("batch_size", "batch"), ("threads", "threads"),
    ("bare_forward_ips", "bare forward img/s"), ("extract_ips", "extract img/s"), ("ratio", "extract / bare (median)"), ("ratios", "per pair"),
    ("model_s", "model s"), ("read_wait_s", "waiting for decode s"), ("write_s", "writer busy s"), ("total_s", "extract total s"),
]
READER_COLUMNS = [
    ("backbone", "preprocessing of"), ("images", "images"), ("path_ips", "decode by path img/s"),
    ("reader_ips", "read once + SHA-256 check + decode img/s"), ("ratio", "reader / by path (median)"), ("ratios", "per pair"),
]
FIT_COLUMNS = [
    ("rows", "rows"), ("dim", "features"), ("epochs", "epochs"), ("fit_epoch_s", "featcache s/epoch"),
    ("bare_epoch_s", "bare loop s/epoch"), ("epoch_ratio", "featcache / bare"), ("load_gbs", "set load GB/s"),
    ("plain_read_gbs", "plain array[:] GB/s"), ("naive_read_gbs", "array[:] + astype GB/s"), ("load_ratio", "load / plain"),
]
VIEWS_COLUMNS = [
    ("views", "views K"), ("extract_s", "extract s"), ("view_rows", "view rows"), ("view_bytes", "view bytes"),
    ("base_bytes", "un-augmented bytes"), ("mlp_val", "mlp val acc"), ("logreg_val", "logreg (C=1) val acc"),
]
MEMORY_COLUMNS = [
    ("rows", "rows"), ("dim", "features"), ("features_mb", "float32 MiB"), ("max_memory", "--max-memory"),
    ("streamed", "streamed"), ("base_rss_mb", "RSS before fit MiB"), ("peak_rss_mb", "peak RSS MiB"),
    ("fit_rss_mb", "peak - before MiB"), ("over_budget_mb", "beyond the features held MiB"), ("load_s", "load s"),
    ("epoch_s", "s/epoch"), ("val_acc", "val acc"),
]
PREDICT_COLUMNS = [
    ("backbone", "backbone"), ("images", "new images"), ("workers", "workers"), ("base_rss_mb", "RSS before predict MiB"),
    ("peak_rss_mb", "peak RSS MiB"), ("predict_rss_mb", "peak - before MiB"), ("peak_over_smallest", "peak / peak at fewest"),
    ("workers_peak_rss_mb", "largest worker peak MiB"), ("seconds", "predict s"), ("images_per_s", "images/s"),
]
SCALEOUT_COLUMNS = [("backbone", "backbone"), ("processes", "processes"), ("images", "images"), ("wall_s", "wall s"),
                    ("images_per_s", "images/s"), ("speedup", "speedup")]
COMPACT_COLUMNS = [("backbone", "backbone"), ("images", "images"), ("checkpoint_s", "checkpoint every s"),
                   ("segments_before", "segments"), ("files_before", "files"), ("files_per_10k_before", "files / 10k"),
                   ("segments_after", "after compact + gc: segments"), ("files_after", "files"),
                   ("files_per_10k_after", "files / 10k"), ("compact_s", "compact s")]
LAYERS_COLUMNS = [("backbone", "backbone"), ("weights", "weights"), ("layers", "layers"), ("k", "k"),
                  ("images", "images"), ("one_pass_s", "one pass s (median)"),
                  ("separate_s", "k extracts s (median)"), ("ratio", "k extracts / one pass (median)"),
                  ("ratios", "per pair")]
LAYER_CASES = ("resnet18/layer3,layer4@none", "resnet18/layer2,layer3,layer4@none", "efficientnet_lite0/blocks.10,head")
RAY_COLUMNS = [
    ("engine", "engine"), ("backbone", "backbone"), ("images", "images"), ("wall_s", "wall s"),
    ("images_per_s", "images/s"), ("wall_vs_default", "wall / default"), ("cpu_s", "CPU s (process tree)"),
    ("peak_rss_mb", "peak RSS MB (tree)"), ("actor_killed", "actor killed"), ("same_set", "same set key"),
]
RAY_HASH_COLUMNS = [("way", "hashed by"), ("files", "files"), ("rounds", "rounds"), ("median_s", "scan s (median)"),
                    ("files_per_s", "files/s"), ("vs_threads", "/ threads"), ("spread", "min-max s")]
CLI_COLUMNS = [("command", "command"), ("median_s", "median s"), ("min_s", "min s"), ("max_s", "max s"),
               ("over_pass", "/ python -c pass"), ("over_torch", "/ import torch"), ("over_click", "/ import click")]
SWEEP_COLUMNS = [("backbone", "backbone"), ("combinations", "combinations"), ("epochs", "epochs"),
                 ("sweep_s", "one sweep process s"), ("separate_s", "separate fits s"),
                 ("separate_no_plots_s", "separate fits --no-plots s"), ("ratio", "separate / sweep"),
                 ("ratio_no_plots", "separate --no-plots / sweep"), ("same_val_top1", "same val top-1"),
                 ("best", "best run"), ("best_val_top1", "best val top-1")]
SCALE_COLUMNS = [("images", "images"), ("rerun_s", "re-run, nothing changed s"), ("scan_share", "of which scan + hash"),
                 ("rerun_peak_mb", "re-run peak MiB"), ("plan_bytes_per_image", "re-run peak above start, bytes/image"),
                 ("plan_bytes_per_image_warm", "above a start that has built a model, bytes/image"),
                 ("ls_s", "ls s"), ("ls_peak_mb", "ls peak MiB"), ("load_s", "load set for fit s"),
                 ("load_peak_mb", "load peak MiB"), ("files_per_10k", "files / 10k rows"), ("first_s", "first extract s"),
                 ("warm_rerun_s", "first re-run s"), ("ls_sets", "sets over one space"), ("ls_many_s", "ls, all sets s"),
                 ("ls_many_peak_mb", "ls, all sets peak MiB"), ("ls_many_over_one", "ls, all sets / one set"),
                 ("set_commit_s", "commit one more set s")]
GROWTH_COLUMNS = [("step", "step"), ("images_x", "images x"), ("rerun_s", "re-run"), ("rerun_scan_s", "scan + hash"),
                  ("rerun_peak_mb", "re-run peak"), ("plan_bytes_per_image", "bytes/image"), ("ls_s", "ls"),
                  ("ls_many_s", "ls, all sets"), ("load_s", "load"), ("files", "files"),
                  ("plan_bytes_per_added_image", "planning peak per added image, bytes")]
RATIO_COLUMNS = [("images", "images"), ("rerun_s", "re-run, nothing changed"), ("rerun_scan_s", "scan + hash"),
                 ("rerun_peak_mb", "re-run peak"), ("plan_bytes_per_image", "peak above start"),
                 ("plan_bytes_per_image_warm", "peak above a warm start"), ("ls_s", "ls"), ("ls_many_s", "ls, all sets"),
                 ("load_s", "load set for fit")]
RATIO_KEYS = [k for k, _ in RATIO_COLUMNS[1:]]
FILES_COLUMNS = [("shape", "features"), ("rows", "rows"), ("shard_rows", "rows per shard"), ("files", "files"),
                 ("files_per_10k", "files per 10,000 images")]


PEERS_EXTRACT_COLUMNS = [
    ("backbone", "backbone"), ("way", "way"), ("images", "images"), ("ips", "img/s (median)"), ("spread", "spread"),
    ("featcache_over", "featcache / this"), ("peak_rss_mb", "peak RSS MiB"), ("child_peak_rss_mb", "largest child MiB"),
]
PEERS_LOAD_COLUMNS = [
    ("features", "features"), ("shape", "shape"), ("rows", "rows"), ("way", "way"), ("gbs", "float32 GB/s (median)"),
    ("spread", "spread"), ("featcache_over", "featcache / this"), ("bytes_per_image", "disk bytes/image"),
]
PEERS_FIT_COLUMNS = [
    ("rows", "rows"), ("epochs", "epochs"), ("featcache_epoch_s", "featcache s/epoch"), ("featcache_spread", "spread"),
    ("bare_epoch_s", "np.load + bare loop s/epoch"), ("bare_spread", "spread"), ("featcache_over_bare", "featcache / bare"),
]


def _case(text: str) -> tuple[str, str | None, str]:
    name, _, weights = text.partition("@")
    name, _, layer = name.partition("/")
    return name, layer or None, weights or "DEFAULT"


@click.command()
@click.argument("which", type=click.Choice(["transfer", "storage", "store", "throughput", "memory", "scaleout", "ray", "views", "predict", "cli", "sweep", "formats", "layers", "peers",
                                                    "scale", "all"]), default="all")
@click.option("--data", default=DEFAULT_DATA, show_default=True, help="ImageFolder with train/ and val/.")
@click.option("--case", "cases", multiple=True, help="NAME[/LAYER][@WEIGHTS]; repeatable [default: resnet18@none, efficientnet_lite0].")
@click.option("--head", default="mlp", show_default=True)
@click.option("--epochs", default="10,30", show_default=True, help="Epoch counts to report.")
@click.option("--workers", default=None, type=int, help="DataLoader workers (both ways).")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--repeats", default=3, show_default=True, type=int,
              help="Storage: best of N; cli: rounds (median); layers: alternating pairs (median).")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Results folder [default: benchmarks/results].")
@click.option("--sizes", default="10000,100000", show_default=True, help="scale: image counts.")
@click.option("--million", is_flag=True, help="scale: also 1,000,000 images (about 5 GB of temporary files).")
@click.option("--code", default=None, type=click.Path(exists=True, file_okay=False),
              help="scale: the checkout whose featcache is measured [default: this one].")
@click.option("--against", default=None, type=click.Path(exists=True, file_okay=False),
              help="scale, cli: another checkout measured side by side on the same images and store (e.g. main).")
@click.option("--compiled/--source", default=True, show_default=True,
              help="cli: featcache started as installed (a copy with its bytecode compiled), or from the sources.")
@click.option("--ls-sets", default=20, show_default=True, type=click.IntRange(1, 1000),
              help="scale: sets over one space for the second ls (the first set recorded again for other folders).")
@click.option("--hash-files", default=20_000, show_default=True, type=click.IntRange(1, 10_000_000),
              help="ray: files of the hashing comparison.")
@click.option("--new-set", default=1000, show_default=True, type=click.IntRange(0, None),
              help="scale: images of the new set extracted and loaded into the full space and into an empty store (0: skip).")
@click.option("--big-space", default=None, type=click.IntRange(100, None),
              help="scale: only the new-set case, in a space of this many rows written through the store API.")
def main(which, data, cases, head, epochs, workers, batch_size, repeats, out, sizes, million, code, against,
         ls_sets, hash_files, new_set, big_space, compiled) -> None:
    """Run the benchmark suite and print its tables."""
    from .storage import run_storage
    from .store import compaction, files_per_10k, run_store
    from .formats import run_formats
    from .memory import run_memory
    from .predict import run_predict
    from .scaleout import run_scaleout
    from .throughput import extract_vs_forward, fit_vs_bare, reader_vs_path
    from .sweep import run_sweep
    from .views import run_views
    from .layers import run_layers
    from .transfer import run_transfer, run_transfer_processes
    from .cli import run_cli

    if which == "scale":
        _scale(sizes, million, code, against, repeats, workers, out, ls_sets, new_set, big_space)
        return
    if not Path(data).is_dir():
        raise click.UsageError(f"--data {data} does not exist")
    layer_cases = [c for c in cases if "," in (_case(c)[1] or "")] if cases else list(LAYER_CASES)
    if which == "layers" and not layer_cases:
        raise click.UsageError("the layers benchmark needs a case with several layers, e.g. "
                               "--case resnet18/layer3,layer4@none")
    info = machine()
    click.echo(f"machine: {machine_label(info)}")
    cases = cases or ("resnet18@none", "efficientnet_lite0")
    epoch_list = tuple(int(e) for e in epochs.split(","))
    if which in ("transfer", "all"):
        rows, runs = [], []
        for case in cases:
            name, layer, weights = _case(case)
            res = run_transfer(data, name, layer, weights, head, epoch_list, workers, batch_size)
            for r in res["rows"]:
                r["weights"] = weights
            rows += res["rows"]
            runs.append(res)
        click.echo("\n" + table(rows, TRANSFER_COLUMNS))
        whole = run_transfer_processes(data, "resnet18", "none", "linear", 10, rounds=max(repeats, 1), workers=workers)
        click.echo("\nwhole processes as a user starts them: featcache extract + featcache fit --head linear "
                   "--epochs 10 against a plain 10-epoch loop script (resnet18, random init: same compute)")
        click.echo(table([whole], PROCESS_COLUMNS))
        path = save("transfer", {"machine": info, "data": data, "runs": runs, "rows": rows, "processes": whole}, out)
        click.echo(f"saved {path}")
    if which in ("storage", "all"):
        name, _, weights = _case(cases[-1])
        res = run_storage(data, name, weights=weights, repeats=repeats, workers=workers,
                          spatial_layer="head" if name == "efficientnet_lite0" else "features")
        click.echo(f"\nstorage: {res['images']} images of {name}")
        click.echo(table(res["rows"], STORAGE_COLUMNS))
        path = save("storage", {"machine": info, "data": data, **res}, out)
        click.echo(f"saved {path}")
    if which == "formats":  # also part of store
        name, _, weights = _case(cases[-1])
        frows = run_formats(data, name, weights, rounds=max(repeats, 1), workers=workers)
        click.echo(table(frows, FORMAT_COLUMNS))
        path = save("formats", {"machine": info, "data": data, "rows": frows}, out)
        click.echo(f"saved {path}")
    if which in ("store", "all"):
        rows = []
        for case in cases:
            name, layer, weights = _case(case)
            rows.append(run_store(data, name, layer, weights, workers))
        click.echo("\n" + table(rows, STORE_COLUMNS))
        files = files_per_10k()
        click.echo("\n" + table(files, FILES_COLUMNS))
        name, layer, weights = _case(cases[-1])
        compacted = [compaction(data, name, layer, weights, workers)]
        click.echo("\n" + table(compacted, COMPACT_COLUMNS))
        name, _, weights = _case(cases[-1])
        frows = run_formats(data, name, weights, rounds=max(repeats, 1), workers=workers)
        click.echo(f"\nstore format 2 against format 1 ({frows[0]['code']}), each written and read by its own code, "
                   f"alternating; medians of {max(repeats, 1)} rounds")
        click.echo(table(frows, FORMAT_COLUMNS))
        path = save("store", {"formats": frows, "machine": info, "data": data, "rows": rows, "files": files, "compaction": compacted}, out)
        click.echo(f"saved {path}")
    if which in ("throughput", "all"):
        rows = []
        for case in cases:
            name, layer, weights = _case(case)
            rows.append(extract_vs_forward(data, name, layer, weights, batch_size, workers))
        click.echo("\n" + table(rows, EXTRACT_COLUMNS))
        readers = [reader_vs_path(data, *_case(cases[-1])[::2])]
        click.echo("\n" + table(readers, READER_COLUMNS))
        fits = [fit_vs_bare()]
        click.echo("\n" + table(fits, FIT_COLUMNS))
        path = save("throughput", {"machine": info, "data": data, "extract": rows, "reader": readers, "fit": fits}, out)
        click.echo(f"saved {path}")
    if which in ("memory", "all"):
        rows = run_memory()
        click.echo("\nfit memory: mlp on a synthetic float16 set, each fit in a fresh process")
        click.echo(table(rows, MEMORY_COLUMNS))
        path = save("memory", {"machine": info, "rows": rows}, out)
        click.echo(f"saved {path}")
    if which == "ray":  # needs the ray extra, so not part of all
        from .ray_engine import run_ray

        rows = []
        for case in cases[:1]:
            name, layer, weights = _case(case)
            rows += run_ray(data, name, layer, weights, batch_size=batch_size)
        click.echo("\nthe same extract, default engine against --engine ray (a local Ray instance on this machine's "
                   "CPUs), whole commands, start-up included; CPU and memory over the process tree")
        click.echo(table(rows, RAY_COLUMNS))
        from .ray_engine import run_hashing

        hashing = run_hashing(files=hash_files, rounds=max(repeats, 1))
        click.echo(f"\nscan with every file hashed ({hash_files} tiny PNGs): the driver's threads against Ray tasks "
                   "hashing blocks of paths, on the same local instance, alternating")
        click.echo(table(hashing, RAY_HASH_COLUMNS))
        path = save("ray", {"machine": info, "data": data, "rows": rows, "hashing": hashing}, out)
        click.echo(f"saved {path}")
    if which in ("scaleout", "all"):
        rows = []
        for case in cases:
            name, layer, weights = _case(case)
            rows += run_scaleout(data, name, layer, weights, batch_size=batch_size)
        click.echo("\nextract: one process against torchrun --nproc_per_node 2")
        click.echo(table(rows, SCALEOUT_COLUMNS))
        path = save("scaleout", {"machine": info, "data": data, "rows": rows}, out)
        click.echo(f"saved {path}")
    if which in ("views", "all"):
        name, _, weights = _case(cases[-1])
        rows = run_views(data, name, weights, workers=workers)
        click.echo(f"\naugmented views: {name}")
        click.echo(table(rows, VIEWS_COLUMNS))
        path = save("views", {"machine": info, "data": data, "backbone": name, "rows": rows}, out)
        click.echo(f"saved {path}")
    if which in ("peers", "all"):
        from .peers import extract_ways, load_and_fit

        res = {"extract": []}
        click.echo("\nextract: featcache against its peers, alternating, each run in a fresh process")
        for case in cases:  # each case's table printed and saved as soon as it is measured
            rows = extract_ways(data, *_case(case), batch_size, workers if workers is not None else 2, repeats)
            res["extract"] += rows
            click.echo(table(rows, PEERS_EXTRACT_COLUMNS))
            click.echo(f"{rows[0]['backbone']}: featcache / fastest peer {rows[0]['over_fastest_peer']:.2f}, "
                       f"featcache / bare forward {rows[0]['over_bare']:.2f}; stage seconds {rows[0]['timings']}")
            path = save("peers", {"machine": info, "data": data, **res}, out)
        name, layer, weights = _case(cases[-1])
        res.update(load_and_fit(data, name, layer, weights, "head" if name == "efficientnet_lite0" else None,
                                batch_size, repeats))
        click.echo("\nload: a set's rows as float32, warm cache")
        click.echo(table(res["load"], PEERS_LOAD_COLUMNS))
        click.echo("\nfit: mlp head")
        click.echo(table(res["fit"], PEERS_FIT_COLUMNS))
        path.unlink()
        path = save("peers", {"machine": info, "data": data, **res}, out)
        click.echo(f"saved {path}")
    if which in ("predict", "all"):
        name, _, weights = _case(cases[-1])
        rows = run_predict(data, name, weights, workers=(0, None) if workers is None else (workers,))
        click.echo(f"\npredict: peak memory on 100 and 2,000 new images ({name}), each in a fresh process")
        click.echo(table(rows, PREDICT_COLUMNS))
        path = save("predict", {"machine": info, "data": data, "rows": rows}, out)
        click.echo(f"saved {path}")
    if which in ("layers", "all") and layer_cases:
        rows = []
        for case in layer_cases:
            name, layer, weights = _case(case)
            rows.append(run_layers(data, name, layer.split(","), weights, repeats=repeats, workers=workers,
                                   batch_size=batch_size))
        click.echo("\nseveral layers: one pass against one extract per layer (fresh stores, alternating)")
        click.echo(table(rows, LAYERS_COLUMNS))
        path = save("layers", {"machine": info, "data": data, "rows": rows}, out)
        click.echo(f"saved {path}")

    if which in ("cli", "all"):
        name, _, weights = _case(cases[-1])
        loads: list[float] = []
        rows = run_cli(data, name, weights, rounds=max(repeats, 1), workers=workers, against=against, loads=loads,
                       compiled=compiled)
        click.echo(f"\ncommand line start-up: whole processes, median of {max(repeats, 1)} rounds in rotation; "
                   f"featcache {'as installed (bytecode compiled)' if compiled else 'from its sources'}; "
                   f"fit on a {name} set of {Path(data).name}; load average {min(loads):.1f} to {max(loads):.1f}"
                   + (f"; (against): {against} ({_revision(against)})" if against else ""))
        click.echo(table(rows, CLI_COLUMNS))
        path = save("cli", {"machine": info, "data": data, "backbone": name, "rows": rows, "load_average": loads,
                            "compiled": compiled,
                            "code_revision": _revision(Path(__file__).resolve().parents[1]), "against": against, "against_revision": _revision(against) if against else None}, out)
        click.echo(f"saved {path}")
    if which in ("sweep", "all"):
        name, layer, weights = _case(cases[-1])
        row = run_sweep(data, name, layer, weights, workers=workers)
        click.echo("\nfit many times: one sweep process against separate featcache fit processes")
        click.echo(table([row], SWEEP_COLUMNS))
        path = save("sweep", {"machine": info, "data": data, "rows": [row]}, out)
        click.echo(f"saved {path}")


def _revision(path: str | Path) -> str:
    """The short commit of a checkout, and whether it has changes not committed."""
    import subprocess

    head = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "no git"
    dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head + (" with changes" if dirty else "")


def _scale(sizes: str, million: bool, code: str | None, against: str | None, repeats: int, workers: int | None,
           out, ls_sets: int = 20, new_set: int = 1000, big_space: int | None = None) -> None:
    import os
    import subprocess

    from .scale import NEW_SET_KEYS, REPO, growth, run_big_space, run_scale

    def rev(path: Path) -> str:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or "no git"

    counts = [int(x) for x in sizes.split(",")] + ([1_000_000] if million else [])
    info = machine()
    where = {"code": Path(code or REPO).resolve()}
    if against:
        where["against"] = Path(against).resolve()
    click.echo(f"machine: {machine_label(info)}")
    click.echo("; ".join(f"{k}: {p} ({rev(p)})" for k, p in where.items()) +
               f"; tiny 8x8 PNGs, tests.tiny_backbone, each step a fresh process; re-run: median of {max(repeats, 1)}")
    new_cols = [("new_set_space_rows", "rows in the full space")] + [(k, k.removeprefix("new_")) for k in NEW_SET_KEYS]
    if big_space:
        load = os.getloadavg()
        case = run_big_space(big_space, where["code"], max(repeats, 1), workers, against=against, n=new_set or 1000)
        for k, row in case.items():
            click.echo(f"\n{k}: {where[k]} ({rev(where[k])}): a new set of {row['new_set_images']} images")
            click.echo(table([row], new_cols))
        path = save("scale-newset", {"machine": info, "big_space": big_space, "rounds": max(repeats, 1),
                                     "load_before": load, "load_after": os.getloadavg(),
                                     **{k: {"path": str(where[k]), "rev": rev(where[k]), **row} for k, row in case.items()}},
                    out)
        click.echo(f"saved {path}")
        return
    load = os.getloadavg()
    res = run_scale(counts, code=where["code"], rounds=max(repeats, 1), workers=workers, against=against, ls_sets=ls_sets,
                    new_set=new_set)
    payload = {"machine": info, "sizes": counts, "rounds": max(repeats, 1), "ls_sets": ls_sets, "new_set": new_set,
               "load_before": load, "load_after": os.getloadavg()}
    for k, rows in res.items():
        click.echo(f"\n{k}: {where[k]} ({rev(where[k])})")
        click.echo(table(rows, SCALE_COLUMNS))
        steps = growth(rows)
        if steps:
            click.echo("growth from step to step (each number over the one at the size before)")
            click.echo(table(steps, GROWTH_COLUMNS))
        if new_set:
            click.echo(f"a new set of {new_set} images: into the full space / into an empty store")
            click.echo(table(rows, new_cols))
        payload[k] = {"path": str(where[k]), "rev": rev(where[k]), "rows": rows, "growth": steps}
    if against:
        ratios = [{"images": a["images"], **{key: b[key] / a[key] if a[key] else None for key in RATIO_KEYS}}
                  for a, b in zip(res["against"], res["code"])]
        click.echo("\ncode / against, same images and store, alternating")
        click.echo(table(ratios, RATIO_COLUMNS))
        payload["ratios"] = ratios
    path = save("scale", payload, out)
    click.echo(f"saved {path}")


if __name__ == "__main__":
    main()
