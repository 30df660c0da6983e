"""Commands that use a run directory: runs, evaluate, predict, export, report.

Each reads a run (through ``RunRecord``) and prints what it finds or computes, as text or, with
``--json``, as one JSON document on standard output. None imports torch before it must.
"""

from __future__ import annotations

import sys

import click

from ..choices import DEFAULT_NAME_PATTERN, RUN_SORTS
from .kit import (
    MAX_SKIPS_SHOWN,
    Device,
    Ints,
    OutputPath,
    cli_param,
    csv_cell,
    echo_json,
    json_option,
    recompute_option,
    run_store_option,
    workers_option,
)

__all__ = ["runs_cmd", "evaluate_cmd", "predict_cmd", "export_cmd", "report_cmd"]


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


@click.command("runs")
@click.option("--runs", "root", default="runs", show_default=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of run directories (a sweep's runs included).")
@click.option("--set", "set_key", default=None, help="Only runs of this set (key or prefix).")
@click.option("--sort", type=click.Choice(RUN_SORTS), default="time", show_default=True,
              help="Order: time, val or test top-1 (best first), head, run.")
@json_option
def runs_cmd(root: str, set_key: str | None, sort: str, as_json: bool) -> None:
    """One row per run directory: time, head, set, key parameters, best epoch, val/test top-1."""
    from ..runlist import format_runs, list_runs

    rows, skipped = list_runs(root, set_key, sort)
    for name, reason in skipped:
        click.echo(f"skipped {name}: {reason}", err=True)
    if as_json:
        echo_json(rows)
        return
    if rows:
        click.echo(format_runs(rows))
    click.echo(f"{len(rows)} runs in {root}" + (f", {len(skipped)} damaged skipped" if skipped else ""), err=True)


def _print_metrics(metrics: dict, classes: tuple[str, ...] | list[str], detailed: tuple[str, ...]) -> None:
    """One line per split, then per-class accuracy and the confusion matrix of the ``detailed`` splits."""
    for split, m in metrics.items():
        top5 = f"  top-5 {_fmt(m['top5'])}" if "top5" in m else ""
        more = (f"  balanced acc {_fmt(m['balanced_accuracy'])}  macro F1 {_fmt(m['macro']['f1'])}"
                if "macro" in m else "")
        click.echo(f"{split:5}  n {m['n']:>6}  top-1 {_fmt(m['top1'])}{top5}  log loss {_fmt(m['log_loss'])}{more}")
    for split in (s for s in metrics if s in detailed):
        m = metrics[split]
        click.echo(f"{split} per class: " + ", ".join(f"{c} {_fmt(a)}" for c, a in m["per_class_accuracy"].items()))
        click.echo(f"{split} confusion matrix (rows: true {', '.join(classes)}):")
        for row in m["confusion_matrix"]:
            click.echo("  " + " ".join(f"{v:>5}" for v in row))


_DATA_ONLY = ("no_store", "backbone", "weights", "labels", "labels_from_name", "batch_size", "workers", "device")


@click.command("evaluate")
@click.argument("run", type=click.Path())
@click.option("--data", default=None, type=click.Path(file_okay=False),
              help="A labelled image folder (any layout extract reads) to measure the run on; without it, the "
                   "run's stored metrics are printed.")
@click.option("--no-store", is_flag=True, help="With --data: do not add the rows computed for new images to the store.")
@run_store_option
@recompute_option
@json_option
@click.option("--backbone", default=None, help="The package.module:factory the run's features came from, if any.")
@click.option("--weights", default=None, help="The weights file the run's features came from, if any.")
@click.option("--labels", default=None, type=click.Path(dir_okay=False),
              help="CSV of labels for --data [default: metadata.csv or labels.csv beside the images, if there].")
@click.option("--labels-from-name", is_flag=False, flag_value=DEFAULT_NAME_PATTERN, default=None, metavar="[REGEX]",
              help="Labels of --data from file names, as for extract.")
@click.option("--batch-size", default=None, type=Ints(1, 2**16), help="Images per batch for new images [default: 64].")
@workers_option
@click.option("--device", type=Device(), default=None, help="[default: auto]")
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: on a terminal].")
def evaluate_cmd(run: str, data: str | None, as_json: bool, progress: bool | None, **options) -> None:
    """Print the metrics of a run, or measure it on a labelled folder (--data)."""
    if data is None:
        from ..runs import RunRecord

        params = [cli_param(click.get_current_context().command, k) for k in _DATA_ONLY + ("recompute", "store")]
        given = [p.opts[0] for p in params if p is not None and options[p.name] not in (None, False)]
        if given:
            raise click.UsageError(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} only with --data DIR")
        record = RunRecord.read(run)
        if as_json:
            echo_json(record.metrics)
            return
        click.echo(f"run {run}: head {record.config.head} on set {record.set} ({record.backbone}/{record.layer})")
        metrics = {s: record.metrics[s] for s in ("train", "val", "test") if s in record.metrics}
        _print_metrics(metrics, record.classes, ("val", "test"))
        return
    from ..evaluate import evaluate

    store = not options.pop("no_store")
    options = {k: v for k, v in options.items() if v is not None}
    result = evaluate(run, data, store=store, progress=sys.stderr.isatty() if progress is None else progress, **options)
    for skip in result.skipped[:MAX_SKIPS_SHOWN]:
        click.echo(f"skipped {skip.path}: {skip.reason}", err=True)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if as_json:
        echo_json(result.to_dict())
        return
    _print_metrics(result.metrics, result.classes, tuple(result.metrics))
    click.echo(result.summary())


@click.command("predict")
@click.argument("run", type=click.Path())
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", default=5, show_default=True, type=Ints(1, 10**6))
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV: path,rank,class,probability.")
@run_store_option
@recompute_option
@click.option("--backbone", default=None, help="The package.module:factory the run's features came from, if any.")
@click.option("--weights", default=None, help="The weights file the run's features came from, if any.")
@click.option("--batch-size", default=32, show_default=True, type=Ints(1, 2**16), help="Images per batch.")
@workers_option
@click.option("--device", type=Device(), default="auto", show_default=True)
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: on a terminal].")
def predict_cmd(run: str, paths: tuple[str, ...], top_k: int, as_json: bool, as_csv: bool, store_url: str | None,
                recompute: bool, backbone: str | None, weights: str | None, batch_size: int, workers: int | None,
                device: str, progress: bool | None) -> None:
    """Classify images (files or folders) with a run's backbone and head.

    Images whose bytes are in the run's store are not recomputed."""
    from ..predict import predict

    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    results = predict(run, list(paths), top_k=top_k, batch_size=batch_size, backbone=backbone, weights=weights,
                      workers=workers, device=device, progress=sys.stderr.isatty() if progress is None else progress,
                      store=store_url, recompute=recompute)
    for note in results.notes:
        click.echo(f"note: {note}", err=True)
    if as_json:
        echo_json([r.to_dict() for r in results])
    elif as_csv:
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "rank", "class", "probability", "error"])
        for r in results:
            rows = [(i + 1, c, f"{p:.6f}", "") for i, (c, p) in enumerate(r.top)] or [("", "", "", r.error)]
            for rank, cls, proba, error in rows:
                writer.writerow([csv_cell(r.path), rank, csv_cell(cls), proba, csv_cell(error)])
        click.echo(buffer.getvalue(), nl=False)
    else:
        for r in results:
            shown = "  ".join(f"{c} {p:.3f}" for c, p in r.top) if r.error is None else f"error: {r.error}"
            click.echo(f"{r.path}  {shown}")
    failed = sum(r.error is not None for r in results)
    if failed == len(results):
        raise click.ClickException(f"none of the {len(results)} file(s) could be read (first: {results[0].path}: "
                                   f"{results[0].error})")
    click.echo(f"{len(results) - failed} predicted, {failed} could not be read; {results.counts.line()}", err=True)


@click.command("export")
@click.argument("run", type=click.Path())
@click.argument("out", type=OutputPath("file"))
@click.option("--backbone", default=None, help="The package.module:factory the run's features came from, if any.")
@click.option("--weights", default=None, help="The weights file the run's features came from, if any.")
def export_cmd(run: str, out: str, backbone: str | None, weights: str | None) -> None:
    """Write RUN as one torch.export program (normalised images → probabilities) plus OUT.json."""
    from ..predict import export

    path = export(run, out, backbone=backbone, weights=weights)
    click.echo(f"exported {path} (load: torch.export.load('{path}').module()); classes in {path}.json")


@click.command("report")
@click.argument("run", type=click.Path())
@click.option("--data", default=None, type=click.Path(file_okay=False),
              help="The set's image folder, for the grid of misclassified images (read from no other place).")
@click.option("--backbone", default=None, help="The package.module:factory of a rest head's network, if any.")
@run_store_option
def report_cmd(run: str, data: str | None, backbone: str | None, store_url: str | None) -> None:
    """Write RUN/report.html, one self-contained page: held-out scores, classification report, confusion
    matrices, per-class F1, curves, settings, misclassified images (with --data). For a sweep's folder
    (it holds sweep.json), SWEEP/report.html compares its runs."""
    from ..report import write_report
    from ..sweep_page import is_sweep_folder, write_sweep_report

    if backbone is not None:  # torchvision is imported only when there is a backbone to check
        from ..backbones import check_user_backbone

        check_user_backbone(backbone)
    notes: list[str] = []
    if is_sweep_folder(run):
        out = write_sweep_report(run)
    else:
        out = write_report(run, data=data, backbone=backbone, store=store_url, notes=notes)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {out}")
