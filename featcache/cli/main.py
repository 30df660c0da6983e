"""The program and its core commands: the ``featcache`` group, ``run`` (the console script), and the
commands that make and inspect features and runs from images: extract, fit, backbones, layers, sample.

Every command parses options, calls one library function and prints its result, as text or,
with ``--json``, as one JSON document on standard output (messages go to standard error). A
``FeatcacheError`` becomes ``Error: ...`` and exit status 1; click's usage errors exit 2.
The library is imported inside each command, so ``--help`` and the store commands never load torch.
"""

from __future__ import annotations

import os
import sys

import click

from .. import __version__
from ..choices import (
    DEFAULT_NAME_PATTERN,
    DTYPES,
    ENGINES,
    FIT_POOLS,
    HEADS,
    INITS,
    OPTIMIZERS,
    POOLS,
    PRECISIONS,
    TRACKERS,
)
from ..errors import FeatcacheError
from .kit import (  # first: Ctrl-C handler
    MAX_SKIPS_SHOWN,
    AutoOr,
    Device,
    Floats,
    Fractions,
    Group,
    Ints,
    OutputPath,
    echo_json,
    json_option,
    many,
    parse_size_text,
    set_option,
    store_arg,
    store_option,
    workers_option,
)

__all__ = ["main", "run"]


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="featcache")  # no package metadata scan at start-up
def main() -> None:
    """Run a frozen CNN once, cache its features in Zarr, fit heads in seconds."""


@main.command("extract")
@click.option("--backbone", required=True,
              help="torchvision model name, efficientnet_lite0, timm:NAME, hf:NAME_OR_DIR, or package.module:factory.")
@click.option("--layer", default=None, help="Layer/node to cut at, or several (layer3,layer4: one set each, one pass) "
                                            "(default: the pooled penultimate output; see featcache layers NAME).")
@click.option("--weights", default="DEFAULT", show_default=True,
              help="DEFAULT, a weights enum name, none, or a .pth/.safetensors file.")
@click.option("--pool", type=click.Choice(POOLS), default=None,
              help="Store-time pooling of spatial maps (default: none; avg for the default layer). Part of the feature space.")
@click.option("--data", default="data", show_default=True, type=click.Path(file_okay=False), help="Image folder.")
@store_option
@click.option("--split", default=None, type=Fractions(),
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
@click.option("--seed", default=0, show_default=True, type=Ints(0, 2**32 - 1), help="Seed of --split.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float16", show_default=True)
@click.option("--batch-size", default=64, show_default=True, type=Ints(1, 2**16))
@workers_option
@click.option("--device", type=Device(), default="auto", show_default=True)
@click.option("--strict", is_flag=True, help="Fail on the first unreadable image instead of skipping it.")
@click.option("--views", default=0, show_default=True, type=Ints(0, 1000),
              help="Also store K seeded augmented views (RandomResizedCrop + flip) of each training image.")
@click.option("--checkpoint-every", "checkpoint_s", default=30.0, show_default=True,
              type=Floats(min=0, min_open=True, max=10**7), help="Seconds between commits; a killed run loses at most this much work.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Compute precision of the backbone: auto = bfloat16 autocast on CUDA (float16 where bf16 is missing), "
                   "float32 on the CPU. Part of the feature space.")
@click.option("--compile", is_flag=True,
              help="torch.compile the backbone first: slower start, faster batches on large runs (mostly GPUs).")
@click.option("--rehash", is_flag=True,
              help="Read and hash every file again instead of trusting the scan cache for files whose size, "
                   "times and inode are unchanged.")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="local: this process (and its model processes); ray: Ray Data on a cluster, surviving lost "
                   "workers and nodes (pip install 'featcache[ray]'). The rows are the same.")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="Ray cluster to join (HOST:6379, ray://HOST:10001, auto), or local: a private instance on "
                   "127.0.0.1 [default: $RAY_ADDRESS, else the cluster `ray start` began on this machine, else local].")
@click.option("--ray-gpus-per-actor", default=0.0, type=Floats(min=0, max=64), show_default=True,
              help="GPUs each model actor asks for (0: the actors run on CPUs).")
@click.option("--ray-decode-cpus", default=None, type=Floats(min=0, min_open=True, max=256),
              help="CPUs each read-and-decode task asks for [default: 1].")
@click.option("--ray-max-actors", default=None, type=Ints(1, 100000),
              help="Run this many model actors [default: a pool that grows from one to one per CPU, or per "
                   "GPUs-per-actor, as work waits].")
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: on a terminal].")
@json_option
def extract_cmd(progress: bool | None, as_json: bool, rehash: bool, **options) -> None:
    """Push an image folder through a frozen backbone once and store the features."""
    from ..config import ExtractConfig
    from ..names import check_backbone_name

    try:
        cfg = ExtractConfig(**options)
    except FeatcacheError:
        raise  # names its option; the group turns it into a usage error for that option
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    check_backbone_name(cfg.backbone)  # before torch is imported, the folder scanned or a model built
    from ..extract import extract
    from ..extracted import ExtractResult

    if int(os.environ.get("RANK", "0")) != 0:
        extract(cfg, progress=False, rehash=rehash)
        return  # under torchrun, rank 0 reports for all
    result = extract(cfg, progress=sys.stderr.isatty() if progress is None else progress, rehash=rehash)
    first = result if isinstance(result, ExtractResult) else result[0]  # several layers: one set each
    for skip in result.skipped[:MAX_SKIPS_SHOWN]:
        click.echo(f"skipped {skip.path}: {skip.reason}", err=True)
    if len(result.skipped) > MAX_SKIPS_SHOWN:
        click.echo(f"... and {len(result.skipped) - MAX_SKIPS_SHOWN} more skipped (see: featcache info --set "
                   f"{first.set_key})", err=True)
    following = f"featcache fit --set {first.set_key}{store_arg(cfg.store)}"
    if as_json:
        echo_json({**result.to_dict(), "next": following})
        return
    click.echo(result.summary())
    spent = first.time_line()
    if spent:
        click.echo(spent, err=True)
    click.echo(f"next: {following}")


def _epoch_line(total: int, err: bool):
    def show(row: dict) -> None:
        val = f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}" if "val_loss" in row else ""
        click.echo(
            f"epoch {row['epoch']:>{len(str(total))}}/{total}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f}{val}  {row['seconds']:.2f} s",
            err=err,
        )

    return show


def _positive_float(text: str) -> float:
    """A finite number in (0, 1e6] (``--C``)."""
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not 0 < number <= 1e6:
        raise ValueError("expected a number > 0 and at most 1e6")
    return number


@main.command("fit")
@click.option("--head", type=many(click.Choice(HEADS)), default="mlp", show_default=True,
              help="One head, or several: logreg,mlp (every option below that takes a value may list several: a sweep).")
@set_option()
@store_option
@click.option("--epochs", default=30, show_default=True, type=many(Ints(1, 10**6)))
@click.option("--batch-size", default=64, show_default=True, type=many(Ints(1, 2**20)))
@click.option("--lr", default=1e-3, show_default=True, type=many(Floats(min=0, min_open=True, max=10)))
@click.option("--optimizer", type=many(click.Choice(OPTIMIZERS)), default="adam", show_default=True)
@click.option("--momentum", default=0.9, show_default=True, type=many(Floats(0, 1)))
@click.option("--weight-decay", default=0.0, show_default=True, type=many(Floats(0, 10)))
@click.option("--step-size", default=10, show_default=True, type=many(Ints(1, 10**6)), help="StepLR period (sgd).")
@click.option("--gamma", default=0.1, show_default=True, type=many(Floats(min=0, min_open=True, max=10)), help="StepLR factor (sgd).")
@click.option("--hidden", default=256, show_default=True, type=many(Ints(1, 2**16)), help="mlp hidden units.")
@click.option("--dropout", default=0.4, show_default=True, type=many(Floats(0, 1, max_open=True)), help="mlp dropout.")
@click.option("--patience", default=10, show_default=True, type=many(Ints(0, 10**6)), help="Early-stopping patience on val loss (0: off).")
@click.option("--seed", default=0, show_default=True, type=many(Ints(0, 2**32 - 1)))
@click.option("--C", "C", default="auto", show_default=True, type=many(AutoOr("auto|NUMBER", "a number", _positive_float)),
              help="Inverse regularisation (logreg, svm); auto picks it by 5-fold cross-validation of train "
                   "(val and test stay held out).")
@click.option("--max-iter", default=2000, show_default=True, type=many(Ints(1, 10**7)), help="Solver iterations (logreg, svm).")
@click.option("--fit-pool", "pool", type=many(click.Choice(FIT_POOLS)), default=None,
              help="Train-time pooling of stored spatial maps instead of flattening them [default: none].")
@click.option("--pool", "old_pool", type=click.Choice(FIT_POOLS), default=None, hidden=True,
              help="Deprecated spelling of --fit-pool.")
@click.option("--device", type=Device(), default="auto", show_default=True)
@click.option("--runs", default="runs", show_default=True, type=OutputPath("dir"), help="Parent folder of run directories.")
@click.option("--out", default=None, type=OutputPath("dir"), help="Run directory [default: RUNS/<time>-<head>].")
@click.option("--pretrained-lr-scale", default=0.1, show_default=True, type=many(Floats(0, 10)),
              help="rest head: learning rate of the pretrained layers, as a fraction of --lr.")
@click.option("--init", type=many(click.Choice(INITS)), default="probe", show_default=True,
              help="rest head: the new layer starts as a logistic-regression probe on the pretrained layers' output "
                   "(then fine-tuning is kept only where it lowers val loss), or random.")
@click.option("--warmup-epochs", default=0, show_default=True, type=many(Ints(0, 10**6)),
              help="rest head: epochs that train only the new layer before the pretrained layers join.")
@click.option("--freeze", default="", help="rest head: comma-separated layer names to keep frozen, e.g. layer4.0.")
@click.option("--views/--no-views", "use_views", default=True, show_default=True,
              help="Train on the set's augmented views (one per image per epoch), when it has them.")
@click.option("--max-memory", default="auto", show_default=True, type=AutoOr("auto|SIZE", "a size", parse_size_text),
              help="Features held in memory, e.g. 8GB; a larger set is streamed chunk by chunk (mlp, linear, rest). "
                   "auto: half of this machine's memory.")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write PNG plots into the run directory.")
@click.option("--all-plots", is_flag=True, help="In a sweep, plots for every run (default: the best run only).")
@click.option("--backbone", default=None,
              help="rest head on features from a package.module:factory network: name it to let featcache import it.")
@click.option("--data", default=None, type=click.Path(file_okay=False),
              help="The set's image folder: picks the default set (the newest made from it) and feeds the plot of "
                   "misclassified images (read from no other place).")
@click.option("--check-data", default=None, type=click.Path(file_okay=False),
              help="Refuse the set if this image folder (the one it was made from) has changed since extraction.")
@click.option("--tracker", type=click.Choice(TRACKERS), default=None,
              help="Also record each run (config, epochs, metrics, plots) in MLflow or TensorBoard "
                   "(pip install 'featcache[mlflow]' / 'featcache[tensorboard]').")
@click.option("--tracking-uri", default=None,
              help="Where --tracker records: an MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else mlruns/ "
                   "beside --runs], or a folder for TensorBoard's event files [default: RUN/tb].")
@click.option("--quiet", is_flag=True, help="No per-epoch lines.")
@json_option
def fit_cmd(quiet: bool, check_data: str | None, as_json: bool, all_plots: bool, set_: str | None, old_pool: str | None,
            **options) -> None:
    """Train a classifier head on stored features; writes a run directory.

    Comma-separated values (--head logreg,mlp --lr 1e-3,3e-3) fit every combination in this
    process, the features loaded once: one run directory each, and a table sorted by val top-1.
    """
    from click.core import ParameterSource

    from ..audit import status
    from ..config import FitConfig
    from ..fit import fit
    from ..store import open_store

    if options["tracking_uri"] is not None and options["tracker"] is None:
        raise FeatcacheError(f"--tracking-uri needs --tracker ({' or '.join(TRACKERS)})", param="tracking_uri")
    ctx = click.get_current_context()
    given = {name for name in options if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT,
                                                                                  ParameterSource.DEFAULT_MAP)}
    if old_pool is not None:
        if options["pool"] is not None and options["pool"] != [old_pool]:
            raise click.UsageError("--pool is the old spelling of --fit-pool; give one of them")
        click.echo("note: fit --pool is deprecated: use --fit-pool (train-time pooling; extract --pool pools "
                   "when features are stored)", err=True)
        options["pool"] = [old_pool]
        given.add("pool")
    options["pool"] = options["pool"] or ["none"]
    options["freeze"] = tuple(f.strip() for f in options["freeze"].split(",") if f.strip())
    store = open_store(options["store"], mode="r")
    options["set"] = store.get_set(set_, data=options["data"]).key  # the default set's rule, said in docs/guide.md
    grid = {k: v for k, v in options.items() if isinstance(v, list) and len(v) > 1}
    cfg = FitConfig(**{k: v[0] if isinstance(v, list) else v for k, v in options.items()})
    if check_data:
        st = status(store, cfg.set, check_data)
        if not st.up_to_date:
            raise FeatcacheError(st.summary())
    if grid:
        from ..sweep import sweep

        def done(i: int, n: int, name: str, res) -> None:
            if not quiet:
                val = f"val top-1 {res.metrics['val']['top1']:.4f}" if "val" in res.metrics else "no val split"
                click.echo(f"[{i}/{n}] {name}: {val}, fit {res.seconds['fit']:.2f} s", err=True)

        result = sweep(cfg, grid, given=given, all_plots=all_plots, on_result=done)
        for note in result.notes:
            click.echo(f"note: {note}", err=True)
        following = f"featcache report {result.folder / result.rows[0]['run']}"
        if as_json:
            echo_json({"sweep": str(result.folder), "runs": result.rows, "best": result.rows[0]["run"],
                       "selection": result.selection, "seconds": result.seconds, "notes": result.notes,
                       "next": following})
            return
        click.echo(result.table())
        click.echo(result.summary())
        click.echo(f"next: {following}")
        return
    result = fit(cfg, on_epoch=None if quiet else _epoch_line(cfg.epochs, err=as_json), given=given)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    following = f"featcache report {result.run_dir}"
    if as_json:
        echo_json({**result.to_dict(), "next": following})
        return
    stopping = result.stopping()
    if stopping:
        click.echo(stopping)
    click.echo(result.summary())
    click.echo(f"next: {following}")


@main.command("backbones")
def backbones_cmd() -> None:
    """List backbone names; timm:NAME, hf:HUB_ID_OR_FOLDER and package.module:factory are accepted too."""
    from ..names import PREFIXES, backbone_names

    for name in backbone_names():
        click.echo(name)
    for form in PREFIXES.values():
        click.echo(form, err=True)
    click.echo("package.module:factory (a callable returning an nn.Module with a transforms attribute)", err=True)


@main.command("layers")
@click.argument("backbone")
@click.option("--match", default=None, metavar="PATTERN", help="Only layers whose name matches, e.g. 'layer*'.")
def layers_cmd(backbone: str, match: str | None) -> None:
    """List the layers of BACKBONE that --layer accepts, in network order, with each one's output shape."""
    from ..backbones import layer_shapes

    shapes, default = layer_shapes(backbone, match)
    width = max((len(n) for n, _ in shapes), default=0)
    for name, shape in shapes:
        size = "x".join(map(str, shape)) if shape is not None else "(not a tensor)"
        click.echo(f"{name.ljust(width)}  {size}{'  (default)' if name == default else ''}")
    click.echo(f"{len(shapes)} layers{f' matching {match}' if match else ''}; default: {default or 'none (pass --layer)'}")


@main.command("sample")
@click.option("--out", default="data", show_default=True, type=OutputPath("dir"))
def sample_cmd(out: str) -> None:
    """Write scikit-learn's bundled digits as a PNG ImageFolder (train/val/test)."""
    from ..sample import write_digits

    counts = write_digits(out)
    click.echo(f"digits sample in {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def _quiet_teardown() -> None:
    """After an ``Error:`` line, the interpreter's exit says nothing more: a storage library's coroutines
    left unfinished by the failure (an S3 endpoint gone mid-write) would otherwise print 'Exception
    ignored ... Traceback', 'never awaited' and 'Task was destroyed' when they are collected."""
    import logging
    import warnings

    sys.unraisablehook = lambda unraisable: None
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    logging.getLogger("asyncio").disabled = True  # "Task was destroyed but it is pending!"


def run() -> None:
    """The ``featcache`` program: :func:`main` as a process of its own.

    After Ctrl-C (status 130, its one ``Interrupted`` line already written) the process leaves at
    once: an interrupt that landed inside an extension's start-up (torch's import) can otherwise
    make the interpreter kill itself with SIGINT on the way out, losing the status."""
    try:
        main()
    except SystemExit as e:
        if e.code not in (0, None, 130):
            _quiet_teardown()
        if e.code == 130:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(130)
        raise
