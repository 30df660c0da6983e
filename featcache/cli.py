"""The ``featcache`` command: a thin click layer over the library.

Every command parses options, calls one library function and prints its result. A
``FeatcacheError`` becomes ``Error: ...`` and exit status 1; click's usage errors exit 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys

import click

from .backbones import POOLS, PRECISIONS, list_backbones, list_layers
from .data import DEFAULT_NAME_PATTERN
from .errors import FeatcacheError, StoreError
from .extract import DTYPES, ExtractConfig, Interrupted, default_store_url, extract
from .fit import FIT_POOLS, FitConfig, fit
from .heads import HEADS, INITS, OPTIMIZERS
from .sample import write_digits
from .store.maintenance import gc, status, verify
from .runs import SORTS, RunRecord
from .store import human_bytes, open_store
from .stream import parse_size

__all__ = ["main"]

_MAX_SKIPS_SHOWN = 20


class _Group(click.Group):
    """Turns the library's errors into one ``Error:`` line (no traceback) with exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Interrupted as e:
            click.echo(f"\nInterrupted: {e}", err=True)
            ctx.exit(130)
        except FeatcacheError as e:
            raise _as_usage_error(self, ctx, e) from None
        except KeyboardInterrupt:
            click.echo("\nInterrupted: the store holds only committed data; re-run the command.", err=True)
            ctx.exit(130)


def _as_usage_error(group: click.Group, ctx: click.Context, error: FeatcacheError) -> click.ClickException:
    """A bad option value becomes click's usage error for that option (exit 2); anything else ``Error:`` (exit 1)."""
    name = ctx.invoked_subcommand
    command = group.get_command(ctx, name) if name else None
    if error.option and command is not None:
        wanted = error.option.lstrip("-").replace("-", "_").lower()
        for param in command.params:
            # a set is chosen by --set in fit and status, by the KEY argument in info, rm and verify
            if param.name.lower() == wanted or (wanted == "set" and param.name == "key"):
                sub = click.Context(command, info_name=name, parent=ctx)
                return click.BadParameter(str(error), ctx=sub, param=param)
    return click.ClickException(str(error))


class _Floats(click.FloatRange):
    """A FloatRange that also refuses nan and ±inf (click's lets nan through every bound)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            described = getattr(self, "_describe_range", None)  # click >= 8.0
            self.fail(f"{value!r} is not a finite number{' in the range ' + described() if described else ''}.", param, ctx)
        return number


store_option = click.option(
    "--store",
    default=default_store_url,
    show_default="$FEATCACHE_STORE or featcache.zarr",
    help="Store path or fsspec URL (s3://...).",
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="featcache")
def main() -> None:
    """Run a frozen CNN once, cache its features in Zarr, fit heads in seconds."""


@main.command("extract")
@click.option("--backbone", required=True, help="torchvision model name, efficientnet_lite0, or package.module:factory.")
@click.option("--layer", default=None, help="Layer/node to cut at (default: the pooled penultimate output).")
@click.option("--weights", default="DEFAULT", show_default=True, help="DEFAULT, a weights enum name, none, or a .pth file.")
@click.option("--pool", type=click.Choice(POOLS), default=None, help="Pool spatial maps (default: none; avg for the default layer).")
@click.option("--data", default="data", show_default=True, type=click.Path(file_okay=False), help="Image folder.")
@store_option
@click.option("--split", default=None,
              help="train,val[,test] fractions, e.g. 0.8,0.2: splits a flat folder, or carves val (and test) out of "
                   "a train split that has no val.")
@click.option("--labels", default=None, type=click.Path(dir_okay=False),
              help="CSV of labels: a header, then path,label (or file_name,label) rows, paths relative to the CSV "
                   "[default: metadata.csv or labels.csv beside the images, if there].")
@click.option("--labels-from-name", is_flag=False, flag_value=DEFAULT_NAME_PATTERN, default=None, metavar="[REGEX]",
              help="Labels from file names: alone, the prefix before the first . or _ (cat.0.jpg -> cat); "
                   "or a regular expression whose one group is the label.")
@click.option("--classes", default=None, help="Keep only these classes, e.g. cats,dogs.")
@click.option("--exclude-class", multiple=True, metavar="NAME", help="Leave this class out (repeatable), e.g. BACKGROUND_Google.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1), help="Seed of --split.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float16", show_default=True)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=None, type=click.IntRange(min=0), help="DataLoader workers [default: min(8, CPUs)].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--strict", is_flag=True, help="Fail on the first unreadable image instead of skipping it.")
@click.option("--views", default=0, show_default=True, type=click.IntRange(min=0),
              help="Also store K seeded augmented views (RandomResizedCrop + flip) of each training image.")
@click.option("--checkpoint-every", "checkpoint_s", default=30.0, show_default=True, type=_Floats(min=0, min_open=True),
              help="Seconds between commits; a killed run loses at most this much work.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Compute precision of the backbone: auto = bfloat16 autocast on CUDA (float16 where bf16 is missing), "
                   "float32 on the CPU. Part of the feature space.")
@click.option("--compile", is_flag=True,
              help="torch.compile the backbone first: slower start, faster batches on large runs (mostly GPUs).")
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: on a terminal].")
def extract_cmd(progress: bool | None, **options) -> None:
    """Push an image folder through a frozen backbone once and store the features."""
    try:
        cfg = ExtractConfig(**options)
    except FeatcacheError:
        raise  # names its option; the group turns it into a usage error for that option
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if int(os.environ.get("RANK", "0")) != 0:
        extract(cfg, progress=False)
        return  # under torchrun, rank 0 reports for all
    with _layout_line():
        result = extract(cfg, progress=sys.stderr.isatty() if progress is None else progress)
    for skip in result.skipped[:_MAX_SKIPS_SHOWN]:
        click.echo(f"skipped {skip.path}: {skip.reason}", err=True)
    if len(result.skipped) > _MAX_SKIPS_SHOWN:
        click.echo(f"... and {len(result.skipped) - _MAX_SKIPS_SHOWN} more skipped (see: featcache ls)", err=True)
    click.echo(result.summary())


@contextlib.contextmanager
def _layout_line():
    """Show the library's one ``layout: ...`` line (logged before work starts) on stderr."""

    class Echo(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            click.echo(record.getMessage(), err=True)

    logger, handler = logging.getLogger("featcache.data"), Echo(logging.INFO)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _positive_float(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not 0 < number < math.inf:
        raise ValueError("expected a finite number > 0")
    return number


class _ListOf(click.ParamType):
    """Comma-separated values of ``inner`` (``1e-3,3e-3``): ``featcache fit`` fits every combination."""

    def __init__(self, inner: click.ParamType):
        self.inner, self.name = inner, inner.name

    def get_metavar(self, *args, **kwargs):
        return self.inner.get_metavar(*args, **kwargs)

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        if not isinstance(value, str):
            return [self.inner.convert(value, param, ctx)]
        parts = [p.strip() for p in value.split(",")]
        if "" in parts:
            self.fail(f"{value!r} has an empty item; give one value or several separated by commas", param, ctx)
        return list(dict.fromkeys(self.inner.convert(p, param, ctx) for p in parts))


def _many(type_: click.ParamType) -> _ListOf:
    return _ListOf(type_)


class _AutoOr(click.ParamType):
    """``auto`` or a value that ``parse`` accepts (it raises ValueError with what it expects)."""

    def __init__(self, name: str, what: str, parse):
        self.name, self.what, self.parse = name, what, parse

    def convert(self, value, param, ctx):
        if value == "auto" or not isinstance(value, str):
            return value
        try:
            return self.parse(value)
        except ValueError as e:
            self.fail(f"{value!r} is neither 'auto' nor {self.what}: {e}", param, ctx)


def _epoch_line(total: int):
    def show(row: dict) -> None:
        val = f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}" if "val_loss" in row else ""
        click.echo(
            f"epoch {row['epoch']:>{len(str(total))}}/{total}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f}{val}  {row['seconds']:.2f} s"
        )

    return show


@main.command("fit")
@click.option("--head", type=_many(click.Choice(HEADS)), default="mlp", show_default=True,
              help="One head, or several: logreg,mlp (every option may list values: a sweep).")
@click.option("--set", "set", default=None, help="Feature set key or prefix [default: the most recent].")
@store_option
@click.option("--epochs", default=30, show_default=True, type=_many(click.IntRange(min=1)))
@click.option("--batch-size", default=64, show_default=True, type=_many(click.IntRange(min=1)))
@click.option("--lr", default=1e-3, show_default=True, type=_many(_Floats(min=0, min_open=True)))
@click.option("--optimizer", type=_many(click.Choice(OPTIMIZERS)), default="adam", show_default=True)
@click.option("--momentum", default=0.9, show_default=True, type=_many(_Floats(0, 1)))
@click.option("--weight-decay", default=0.0, show_default=True, type=_many(_Floats(min=0)))
@click.option("--step-size", default=10, show_default=True, type=_many(click.IntRange(min=1)), help="StepLR period (sgd).")
@click.option("--gamma", default=0.1, show_default=True, type=_many(_Floats(min=0, min_open=True)), help="StepLR factor (sgd).")
@click.option("--hidden", default=256, show_default=True, type=_many(click.IntRange(min=1)), help="mlp hidden units.")
@click.option("--dropout", default=0.4, show_default=True, type=_many(_Floats(0, 1, max_open=True)), help="mlp dropout.")
@click.option("--patience", default=10, show_default=True, type=_many(click.IntRange(min=0)), help="Early-stopping patience on val loss (0: off).")
@click.option("--seed", default=0, show_default=True, type=_many(click.IntRange(0, 2**32 - 1)))
@click.option("--C", "C", default="auto", show_default=True, type=_many(_AutoOr("auto|NUMBER", "a number", _positive_float)),
              help="Inverse regularisation (logreg, svm); auto picks it on the val split (or by CV).")
@click.option("--max-iter", default=2000, show_default=True, type=_many(click.IntRange(min=1)), help="Solver iterations (logreg, svm).")
@click.option("--pool", type=_many(click.Choice(FIT_POOLS)), default="none", show_default=True, help="Pool spatial features instead of flattening.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--runs", default="runs", show_default=True, help="Parent folder of run directories.")
@click.option("--out", default=None, help="Run directory [default: RUNS/<time>-<head>].")
@click.option("--pretrained-lr-scale", default=0.1, show_default=True, type=_many(_Floats(min=0)),
              help="rest head: learning rate of the pretrained layers, as a fraction of --lr.")
@click.option("--init", type=_many(click.Choice(INITS)), default="probe", show_default=True,
              help="rest head: the new layer starts as a logistic-regression probe on the pretrained layers' output "
                   "(then fine-tuning is kept only where it lowers val loss), or random.")
@click.option("--warmup-epochs", default=0, show_default=True, type=_many(click.IntRange(min=0)),
              help="rest head: epochs that train only the new layer before the pretrained layers join.")
@click.option("--freeze", default="", help="rest head: comma-separated layer names to keep frozen, e.g. layer4.0.")
@click.option("--views/--no-views", "use_views", default=True, show_default=True,
              help="Train on the set's augmented views (one per image per epoch), when it has them.")
@click.option("--max-memory", default="auto", show_default=True, type=_AutoOr("auto|SIZE", "a size", parse_size),
              help="Features held in memory, e.g. 8GB; a larger set is streamed chunk by chunk (mlp, linear, rest). "
                   "auto: half of this machine's memory.")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write PNG plots into the run directory.")
@click.option("--all-plots", is_flag=True, help="In a sweep, plots for every run (default: the best run only).")
@click.option("--backbone", default=None,
              help="rest head on features from a package.module:factory network: name it to let featcache import it.")
@click.option("--data", default=None, type=click.Path(file_okay=False),
              help="The set's image folder, for the plot of misclassified images (read from no other place).")
@click.option("--check-data", default=None, type=click.Path(file_okay=False),
              help="Refuse the set if this image folder (the one it was made from) has changed since extraction.")
@click.option("--quiet", is_flag=True, help="No per-epoch lines.")
def fit_cmd(quiet: bool, check_data: str | None, all_plots: bool, **options) -> None:
    """Train a classifier head on stored features; writes a run directory.

    Comma-separated values (--head logreg,mlp --lr 1e-3,3e-3) fit every combination in this
    process, the features loaded once: one run directory each, and a table sorted by val top-1.
    """
    from click.core import ParameterSource

    ctx = click.get_current_context()
    given = {name for name in options if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT,
                                                                                  ParameterSource.DEFAULT_MAP)}
    options["freeze"] = tuple(f.strip() for f in options["freeze"].split(",") if f.strip())
    grid = {k: v for k, v in options.items() if isinstance(v, list) and len(v) > 1}
    cfg = FitConfig(**{k: v[0] if isinstance(v, list) else v for k, v in options.items()})
    if check_data:
        st = status(open_store(cfg.store, mode="r"), cfg.set, check_data)
        if not st.up_to_date:
            raise FeatcacheError(st.summary())
    if grid:
        from .sweep import sweep

        def done(i: int, n: int, name: str, res) -> None:
            if not quiet:
                val = f"val top-1 {res.metrics['val']['top1']:.4f}" if "val" in res.metrics else "no val split"
                click.echo(f"[{i}/{n}] {name}: {val}, fit {res.seconds['fit']:.2f} s", err=True)

        result = sweep(cfg, grid, given=given, all_plots=all_plots, on_result=done)
        for note in result.notes:
            click.echo(f"note: {note}", err=True)
        click.echo(result.table())
        click.echo(result.summary())
        return
    result = fit(cfg, on_epoch=None if quiet else _epoch_line(cfg.epochs), given=given)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(result.summary())


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


@main.command("runs")
@click.option("--runs", "root", default="runs", show_default=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of run directories (a sweep's runs included).")
@click.option("--set", "set_key", default=None, help="Only runs of this set (key or prefix).")
@click.option("--sort", type=click.Choice(SORTS), default="time", show_default=True,
              help="Order: time, val or test top-1 (best first), head, run.")
@click.option("--json", "as_json", is_flag=True, help="One JSON list of rows.")
def runs_cmd(root: str, set_key: str | None, sort: str, as_json: bool) -> None:
    """One row per run directory: time, head, set, key parameters, best epoch, val/test top-1."""
    from .runs import format_runs, list_runs

    rows, skipped = list_runs(root, set_key, sort)
    for name, reason in skipped:
        click.echo(f"skipped {name}: {reason}", err=True)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if rows:
        click.echo(format_runs(rows))
    click.echo(f"{len(rows)} runs in {root}" + (f", {len(skipped)} damaged skipped" if skipped else ""), err=True)


@main.command("evaluate")
@click.argument("run", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json as is.")
def evaluate_cmd(run: str, as_json: bool) -> None:
    """Print the metrics of a run."""
    record = RunRecord.read(run)
    metrics = record.metrics
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
        return
    click.echo(f"run {run}: head {record.config.head} on set {record.set} ({record.backbone}/{record.layer})")
    classes = record.classes
    for split in ("train", "val", "test"):
        if split not in metrics:
            continue
        m = metrics[split]
        top5 = f"  top-5 {_fmt(m['top5'])}" if "top5" in m else ""
        click.echo(f"{split:5}  n {m['n']:>6}  top-1 {_fmt(m['top1'])}{top5}  log loss {_fmt(m['log_loss'])}")
    for split in ("val", "test"):
        if split in metrics:
            m = metrics[split]
            click.echo(f"{split} per class: " + ", ".join(f"{c} {_fmt(a)}" for c, a in m["per_class_accuracy"].items()))
            click.echo(f"{split} confusion matrix (rows: true {', '.join(classes)}):")
            for row in m["confusion_matrix"]:
                click.echo("  " + " ".join(f"{v:>5}" for v in row))


@main.command("predict")
@click.argument("run", type=click.Path())
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV: path,rank,class,probability.")
@click.option("--backbone", default=None, help="The package.module:factory the run's features came from, if any.")
@click.option("--weights", default=None, help="The weights file the run's features came from, if any.")
def predict_cmd(run: str, paths: tuple[str, ...], top_k: int, as_json: bool, as_csv: bool, backbone: str | None,
                weights: str | None) -> None:
    """Classify images (files or folders) with a run's backbone and head."""
    from .predict import predict

    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    results = predict(run, list(paths), top_k=top_k, backbone=backbone, weights=weights)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
    elif as_csv:
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "rank", "class", "probability", "error"])
        for r in results:
            rows = [(i + 1, c, f"{p:.6f}", "") for i, (c, p) in enumerate(r.top)] or [("", "", "", r.error)]
            for row in rows:
                writer.writerow([r.path, *row])
        click.echo(buffer.getvalue(), nl=False)
    else:
        for r in results:
            shown = "  ".join(f"{c} {p:.3f}" for c, p in r.top) if r.error is None else f"error: {r.error}"
            click.echo(f"{r.path}  {shown}")
    failed = sum(r.error is not None for r in results)
    click.echo(f"{len(results) - failed} predicted, {failed} could not be read", err=True)


@main.command("export")
@click.argument("run", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--backbone", default=None, help="The package.module:factory the run's features came from, if any.")
@click.option("--weights", default=None, help="The weights file the run's features came from, if any.")
def export_cmd(run: str, out: str, backbone: str | None, weights: str | None) -> None:
    """Write RUN as one torch.export program (normalised images → probabilities) plus OUT.json."""
    from .predict import export

    path = export(run, out, backbone=backbone, weights=weights)
    click.echo(f"exported {path} (load: torch.export.load('{path}').module()); classes in {path}.json")


@main.command("report")
@click.argument("run", type=click.Path())
@click.option("--data", default=None, type=click.Path(file_okay=False),
              help="The set's image folder, for the grid of misclassified images (read from no other place).")
@click.option("--backbone", default=None, help="The package.module:factory of a rest head's network, if any.")
def report_cmd(run: str, data: str | None, backbone: str | None) -> None:
    """Write RUN/report.html: settings, metrics, curves, confusion matrix, misclassified images."""
    from .backbones import check_user_backbone
    from .report import write_report

    check_user_backbone(backbone)
    click.echo(f"wrote {write_report(run, data=data, backbone=backbone)}")


@main.command("backbones")
def backbones_cmd() -> None:
    """List backbone names (plus any package.module:factory)."""
    for name in list_backbones():
        click.echo(name)


@main.command("layers")
@click.argument("backbone")
def layers_cmd(backbone: str) -> None:
    """List the layers of BACKBONE that --layer accepts, in network order."""
    for name in list_layers(backbone):
        click.echo(name)


@main.command("ls")
@store_option
def ls_cmd(store: str) -> None:
    """List the feature sets in a store, oldest first."""
    st = open_store(store, mode="r")
    sets = st.sets()
    for warning in st.warnings:
        click.echo(f"warning: {warning}", err=True)
    if not sets:
        click.echo(f"no feature sets in {store}")
        return
    click.echo("set           backbone/layer  pool  dtype  shape  images  on disk  weights  created  by")
    for fs in sets:
        r = fs.record
        splits = " ".join(f"{k}={v}" for k, v in r.splits.items())
        try:
            size = human_bytes(st.set_bytes(fs))
        except StoreError:
            size = "damaged"
        click.echo(
            f"{fs.key}  {r.backbone}/{r.layer}  {r.pool}  {r.dtype}  {'x'.join(map(str, fs.shape))}  "
            f"{splits}  {size}  {r.weights_id}  {r.created_at}  {r.created_by}"
        )


@main.command("info")
@click.argument("key")
@store_option
def info_cmd(key: str, store: str) -> None:
    """Everything recorded about a set (JSON)."""
    st = open_store(store, mode="r")
    fs = st.get_set(key)
    click.echo(json.dumps({**fs.attrs, "bytes_on_disk": st.set_bytes(fs)}, indent=2))


@main.command("rm")
@click.argument("key")
@store_option
def rm_cmd(key: str, store: str) -> None:
    """Remove a set (its rows are freed by gc once no other set uses them)."""
    fs = open_store(store, mode="r+").remove_set(key)
    click.echo(f"removed set {fs.key}; run featcache gc to free rows no other set uses")


@main.command("gc")
@store_option
@click.option("--grace", default=3600.0, show_default=True, type=_Floats(min=0),
              help="Leave anything younger than this many seconds (a running extract may own it).")
@click.option("--dry-run", is_flag=True, help="Report only.")
def gc_cmd(store: str, grace: float, dry_run: bool) -> None:
    """Remove uncommitted leftovers and rows no set refers to."""
    st = open_store(store, mode="r+")
    r = gc(st, grace_s=grace, dry_run=dry_run)
    for warning in st.warnings:
        click.echo(f"warning: {warning}", err=True)
    for note in r["notes"]:
        click.echo(f"note: {note}", err=True)
    if r["spaces_leased"]:
        click.echo(f"note: {r['spaces_leased']} space(s) left alone: a running extract holds a lease on them", err=True)
    verb = "would free" if dry_run else "freed"
    click.echo(
        f"gc: {verb} {human_bytes(r['bytes_freed'])}; segments removed {r['segments_removed']}, rewritten "
        f"{r['segments_rewritten']}, rows removed {r['rows_removed']}, unfinished sets removed {r['sets_removed']}"
    )


@main.command("verify")
@click.argument("key", required=False)
@store_option
@click.option("--sample", default=8, show_default=True, type=click.IntRange(min=0), help="Rows to recompute from the images.")
@click.option("--data", default=None, type=click.Path(file_okay=False),
              help="The image folder the set was made from; rows are recomputed only from a folder you name.")
@click.option("--backbone", default=None, help="The package.module:factory the set was extracted with, if any.")
@click.option("--weights", default=None, help="The weights file the set was extracted with, if any.")
def verify_cmd(key: str | None, store: str, sample: int, data: str | None, backbone: str | None,
               weights: str | None) -> None:
    """Check every chunk of a set against its integrity record; recompute a sample from the images in --data."""
    st = open_store(store, mode="r")
    report = verify(st, key, sample=sample, data=data, backbone=backbone, weights=weights)
    for warning in st.warnings:
        click.echo(f"warning: {warning}", err=True)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    for error in report.errors:
        click.echo(f"problem: {error}", err=True)
    click.echo(report.summary())
    if not report.ok:
        raise SystemExit(1)


@main.command("status")
@click.option("--set", "key", default=None, help="Set key or prefix [default: the most recent].")
@click.option("--data", default=None, type=click.Path(file_okay=False),
              help="The image folder to compare (required: featcache walks no folder a store names).")
@store_option
def status_cmd(key: str | None, data: str | None, store: str) -> None:
    """Tell whether an image folder and its stored set agree."""
    st = status(open_store(store, mode="r"), key, data)
    for label, paths in (("added", st.added), ("removed", st.removed), ("changed", st.changed)):
        for p in paths[:_MAX_SKIPS_SHOWN]:
            click.echo(f"{label} {p}")
    click.echo(st.summary())


@main.command("sample")
@click.option("--out", default="data", show_default=True, type=click.Path(file_okay=False))
def sample_cmd(out: str) -> None:
    """Write scikit-learn's bundled digits as a PNG ImageFolder (train/val/test)."""
    counts = write_digits(out)
    click.echo(f"digits sample in {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
