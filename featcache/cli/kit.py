"""The command line's plumbing: the group that reports errors, value types that check every
option where it is parsed, phase lines, and output (text or one JSON document).

Imports nothing heavy: ``featcache --help`` must answer at once. The SIGINT handler is
installed before anything else is imported, so Ctrl-C at any moment is one line.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupt(signum, frame) -> None:
    """SIGINT: inside a command, KeyboardInterrupt (its clean-up runs); else one line and exit 130 at once."""
    if getattr(globals().get("Group"), "running", False):  # Group is defined below: a signal may come first
        raise KeyboardInterrupt
    sys.stderr.write("\nInterrupted\n")
    sys.stderr.flush()
    os._exit(130)


# Installed before any other import, so Ctrl-C while Python starts up prints no traceback; the
# handler found here is put back when a command returns (the CLI may run inside another program).
_OUTER_SIGINT = signal.signal(signal.SIGINT, _interrupt)

import contextlib  # noqa: E402
import errno  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402

from ..choices import DEVICES, default_store_url  # noqa: E402
from ..errors import FeatcacheError, os_error_text  # noqa: E402

MAX_SKIPS_SHOWN = 20  # skipped files listed one per line; the rest are counted

__all__ = ["MAX_SKIPS_SHOWN", "Group", "Floats", "Ints", "AutoOr", "Fractions", "Device", "OutputPath", "StoreURL", "ListOf", "many", "store_option",
           "json_option", "workers_option", "run_store_option", "recompute_option", "set_option", "echo_json", "pick_set", "store_arg",
           "parse_size_text", "csv_cell", "cli_param", "flag"]

class Group(click.Group):
    """Turns the library's errors into one ``Error:`` line (no traceback) with exit status 1, a
    failed write into one ``Error:`` line naming the path, and Ctrl-C into one ``Interrupted`` line
    (exit status 130)."""

    running = False  # inside a command: Ctrl-C raises KeyboardInterrupt so its clean-up runs

    def main(self, *args, **kwargs):
        signal.signal(signal.SIGINT, _interrupt)
        # SIGTERM (kill, a job scheduler's time limit) ends a command like Ctrl-C: its clean-up runs and
        # its model processes end; a handler the hosting program installed is left alone
        outer_term = signal.getsignal(signal.SIGTERM)
        if outer_term == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _interrupt)
        try:
            return super().main(*args, **kwargs)
        finally:
            signal.signal(signal.SIGINT, _OUTER_SIGINT)
            if outer_term == signal.SIG_DFL:
                signal.signal(signal.SIGTERM, outer_term)

    def invoke(self, ctx: click.Context):
        Group.running = True
        try:
            with _phase_lines():
                return super().invoke(ctx)
        except KeyboardInterrupt as e:
            said = str(e) if isinstance(e, FeatcacheError) else "the store holds only committed data; re-run the command."
            click.echo(f"\nInterrupted: {said}", err=True)
            ctx.exit(130)
        except FeatcacheError as e:
            raise _as_usage_error(self, ctx, e) from None
        except OSError as e:
            if e.errno == errno.EPIPE and e.filename is None and _reader_gone():
                _silence_stdout()  # `featcache backbones | head -1`: the reader has all it wanted
                ctx.exit(141)  # what a shell reports for a writer stopped by a closed pipe
            raise click.ClickException(_os_error(e)) from None
        finally:
            Group.running = False


def _reader_gone() -> bool:
    """True when standard output is a pipe or socket whose reading end was closed."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _silence_stdout() -> None:
    """Point standard output at /dev/null: nothing more may go there, not even Python's flush at exit."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _os_error(e: OSError) -> str:
    """One line for a failed read or write: the path and what happened (or that standard output failed)."""
    what = os_error_text(e)
    if e.filename is None and e.errno in (errno.ENOSPC, errno.EPIPE, errno.EIO, errno.EDQUOT, errno.EFBIG):
        _silence_stdout()  # click.echo failed: nothing more may go there, not even at exit
        return f"writing to standard output failed ({what})"
    if e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG):
        return f"cannot write {e.filename}: {what}; nothing was left half-written there"
    return f"{e.filename}: {what}" if e.filename else what


def csv_cell(text: str) -> str:
    """A text cell no spreadsheet runs as a formula: one that starts with = + - @, a tab or a carriage
    return gets a leading ``'`` (OWASP, CSV injection). Class names and paths come from folder names."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _flag_names(param: click.Parameter) -> list[str]:
    """The names click derives from ``param``'s flags, lower case (``--store`` -> ``store`` for a parameter
    kept as ``store_url``, ``--set`` -> ``set`` for ``set_``, ``--checkpoint-every`` -> ``checkpoint_every``)."""
    if not isinstance(param, click.Option):
        return []
    return [o.lstrip("-").replace("-", "_").lower() for o in param.opts + param.secondary_opts]


def cli_param(command: click.Command, name: str) -> click.Parameter | None:
    """The option or argument of ``command`` that takes the library parameter ``name`` (``"split"``,
    ``"store"``, ``"run"``), or None: the one map from the library's parameter names to the command
    line's flags, read from click's own parameters. A parameter's Python name wins (``pool`` is
    ``fit --fit-pool``, not the hidden old ``--pool``), then a name derived from a flag, so an
    old-style flag (``"--split"``) works too."""
    wanted = name.lstrip("-").replace("-", "_").lower()
    for param in command.params:
        if param.name is not None and param.name.lower() == wanted:
            return param
    for param in command.params:
        if wanted in _flag_names(param):
            return param
    return None


def flag(command: click.Command, name: str) -> str:
    """How the command line spells the library parameter ``name`` in ``command``: ``--fit-pool``, ``RUN``."""
    param = cli_param(command, name)
    if param is None:
        raise LookupError(f"{command.name} has no option for {name!r}")
    return param.opts[0] if isinstance(param, click.Option) else param.human_readable_name


def _as_usage_error(group: click.Group, ctx: click.Context, error: FeatcacheError) -> click.ClickException:
    """A bad parameter value (``error.param``) becomes click's usage error for its option (exit 2);
    anything else ``Error:`` (exit 1)."""
    name = ctx.invoked_subcommand
    command = group.get_command(ctx, name) if name else None
    param = cli_param(command, error.param) if error.param and command is not None else None
    if param is not None:
        sub = click.Context(command, info_name=name, parent=ctx)
        return click.BadParameter(str(error), ctx=sub, param=param)
    return click.ClickException(str(error))


@contextlib.contextmanager
def _phase_lines():
    """Show the library's phase lines (logger ``featcache``, INFO: layout, hashing, loading ...) on stderr;
    under torchrun only rank 0 shows them."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        yield
        return

    class Echo(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            click.echo(record.getMessage(), err=True)

    logger, handler = logging.getLogger("featcache"), Echo(logging.INFO)
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


class Floats(click.FloatRange):
    """A FloatRange that also refuses nan and ±inf (click's lets nan through every bound)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number in the range {self._describe_range()}.", param, ctx)
        return number


class Ints(click.IntRange):
    """An IntRange that always has an upper bound (a huge --hidden would try to allocate it)."""

    def __init__(self, min: int = 0, max: int = 2**31 - 1):
        super().__init__(min, max)


def parse_size_text(text: str) -> int:
    from ..units import parse_size

    return parse_size(text)


class AutoOr(click.ParamType):
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


class Fractions(click.ParamType):
    """``train,val[,test]`` fractions: two or three finite numbers > 0 that sum to 1."""

    name = "F,F[,F]"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            parts = [float(p) for p in value.split(",")]
        except ValueError:
            self.fail(f"{value!r} is not fractions like 0.8,0.2 or 0.7,0.15,0.15.", param, ctx)
        if len(parts) not in (2, 3) or not all(math.isfinite(p) and p > 0 for p in parts) or not abs(sum(parts) - 1) <= 1e-6:
            self.fail(f"{value!r}: give two or three positive fractions that sum to 1 (train,val[,test]), e.g. 0.8,0.2.",
                      param, ctx)
        return value


class Device(click.Choice):
    """auto, cpu or cuda; cuda only where this machine has a GPU (asked only when cuda is named)."""

    def __init__(self):
        super().__init__(DEVICES)

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if value == "cuda":
            import torch

            if not torch.cuda.is_available():
                self.fail("CUDA is not available on this machine; valid here: auto, cpu.", param, ctx)
        return value


class OutputPath(click.ParamType):
    """A file or folder to write: if it exists it is of that kind; its folder exists and is writable."""

    def __init__(self, kind: str):
        self.kind = kind
        self.name = "file" if kind == "file" else "directory"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        if not value:
            self.fail("an empty path; name a file or folder.", param, ctx)
        path = Path(value)
        if path.exists():
            ok = path.is_file() if self.kind == "file" else path.is_dir()
            if not ok:
                self.fail(f"{value!r} exists and is not a {'regular file' if self.kind == 'file' else 'folder'}.",
                          param, ctx)
        parent = path.parent if self.kind == "file" else path
        if self.kind == "file" and not parent.is_dir():
            self.fail(f"the folder {str(parent)!r} does not exist; create it first.", param, ctx)
        while not parent.exists():  # a folder may be created with its parents
            parent = parent.parent
        if not parent.is_dir():
            self.fail(f"{str(parent)!r} is not a folder.", param, ctx)
        if not os.access(parent, os.W_OK | os.X_OK):
            self.fail(f"cannot write in {str(parent)!r} (permission denied).", param, ctx)
        return value


class StoreURL(click.ParamType):
    """A store path or fsspec URL; never empty (an empty path would make the current folder a store)."""

    name = "url"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("an empty store path; name a store, e.g. featcache.zarr or s3://bucket/featcache.zarr.", param, ctx)
        if isinstance(value, str) and value.strip().lower().startswith("memory://"):
            self.fail(f"{value} (from --store or $FEATCACHE_STORE) is a store in this process's memory: a command "
                      "starts with it empty and what it writes is gone when it ends. Name a folder or an fsspec URL "
                      "that outlives the process (featcache.zarr, s3://bucket/featcache.zarr); in Python, "
                      "featcache.extract(store='memory://...') keeps it for that process", param, ctx)
        return value


store_option = click.option("--store", default=default_store_url, type=StoreURL(),
                            show_default="$FEATCACHE_STORE or featcache.zarr", help="Store path or fsspec URL (s3://...).")
run_store_option = click.option("--store", "store_url", default=None, type=StoreURL(), metavar="URL",
                                help="Where the run's store is now [default: the store the run records].")
recompute_option = click.option("--recompute", is_flag=True,
                                help="Use no store: compute every image's features with the run's backbone.")
workers_option = click.option(
    "--workers", default=None, type=Ints(0, 256),
    help="N DataLoader decode workers beside the model in this process [default: featcache chooses: on the CPU, "
         "one model process per core (at most 8) decoding its own batches; on a GPU, min(8, CPUs) decode workers].")
json_option = click.option("--json", "as_json", is_flag=True,
                           help="One JSON document on standard output (messages go to standard error).")


class ListOf(click.ParamType):
    """Comma-separated values of ``inner`` (``1e-3,3e-3``), each checked as ``inner`` checks one value:
    ``featcache fit`` fits every combination. Duplicates are dropped, order kept."""

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


def many(type_: click.ParamType) -> ListOf:
    return ListOf(type_)


def set_option(default_help: str = "the default set (see docs/guide.md)"):
    return click.option("--set", "set_", default=None, metavar="KEY", help=f"Set key or unique prefix [default: {default_help}].")


def pick_set(positional: str | None, option: str | None) -> str | None:
    """The set named by ``--set KEY`` or by the positional KEY (an alias kept for scripts); not both, differently."""
    if positional is not None and option is not None and positional != option:
        raise click.UsageError(f"two sets named: KEY {positional!r} and --set {option!r}; give one")
    return option if option is not None else positional


def echo_json(doc) -> None:
    """The one JSON document a ``--json`` command prints on standard output (NaN becomes null)."""
    click.echo(json.dumps(_plain(doc), indent=2, allow_nan=False, default=str))


def _plain(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def store_arg(store: str) -> str:
    """`` --store URL`` when the store is not the default one, for a ``next:`` command."""
    return "" if store == default_store_url() else f" --store {store}"
