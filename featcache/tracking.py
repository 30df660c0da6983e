"""Record fits where users already look: MLflow and TensorBoard.

One small adapter per library behind :class:`Tracker` (start a run, log an epoch row, finish it
with its run directory); nothing else in featcache imports mlflow or tensorboard. ``fit`` and
``sweep`` talk to a :class:`Tracking`, which wraps one adapter so that a failing tracker never
changes a result or touches a run directory: the failure becomes a note and tracking stops.

What a tracked run holds, in both libraries:

- parameters: ``head`` and the parameters that head takes (asked of its class), nothing else;
  the set, backbone, layer and fit pooling are tags;
- per-epoch metrics (torch heads): each ``history.json`` row's values, step = epoch (MLflow:
  ``train_loss``, ...; TensorBoard groups them: ``loss/train``, ``loss/val``, ``acc/train``, ...);
- final metrics: ``{split}_top1``, ``{split}_top5`` (5+ classes), ``{split}_log_loss``,
  ``{split}_balanced_accuracy``, ``{split}_macro_f1`` and ``best_epoch`` / ``chosen_C`` where the
  head has them (TensorBoard: ``top1/val``, ...);
- the run directory's PNG plots (MLflow artifacts under ``plots/``; TensorBoard images ``plots/NAME``);
- MLflow: the fitted head as ``model/head.json`` + ``model/head.npz`` (JSON and arrays, no pickle),
  loaded back by :func:`featcache.load_head` on the downloaded folder.

Both write live: MLflow logs each epoch as it ends; TensorBoard's event file is flushed each
epoch, into ``RUN/tb`` or, with a tracking URI, ``URI/RUN-NAME`` (``URI/SWEEP/RUN-NAME``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .choices import SPLITS, TRACKERS
from .errors import FeatcacheError

__all__ = ["TRACKERS", "Tracker", "MLflowTracker", "TensorBoardTracker", "Tracking", "open_tracking",
           "final_metrics", "param_value", "run_params", "grouped_tag"]

_FINAL = ("top1", "top5", "log_loss", "balanced_accuracy")
_MODEL_FILES = ("head.json", "head.npz")


def final_metrics(result) -> dict[str, float]:
    """A fit result's final numbers as flat metric names: ``val_top1``, ..., ``best_epoch``, ``chosen_C``."""
    out = {f"{split}_{k}": float(m[k]) for split, m in result.metrics.items() for k in _FINAL if m.get(k) is not None}
    out.update({f"{split}_macro_f1": float(m["macro"]["f1"]) for split, m in result.metrics.items() if m.get("macro")})
    if result.best_epoch is not None:
        out["best_epoch"] = float(result.best_epoch)
    if result.chosen_C is not None:
        out["chosen_C"] = float(result.chosen_C)
    return out


def param_value(v: Any) -> str:
    """A config value as the text both trackers record (JSON for lists and None)."""
    return v if isinstance(v, str) else (str(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                                        else json.dumps(v))


def run_params(cfg, heads: list[str] | None = None) -> dict:
    """``head`` and the parameters the head takes (those of ``heads``, in a sweep), from ``cfg``."""
    from .heads import head_params

    names = {p for h in (heads or [cfg.head]) for p in head_params(h)}
    return {"head": cfg.head if heads is None else heads, **{k: v for k, v in cfg.to_dict().items() if k in names}}


def grouped_tag(name: str) -> str:
    """``train_loss`` → ``loss/train``, ``val_top1`` → ``top1/val``, ``seconds`` → ``time/epoch_seconds``:
    TensorBoard shows one chart group per quantity, a curve per split."""
    split, _, rest = name.partition("_")
    if split in SPLITS and rest:
        return f"{rest}/{split}"
    return "time/epoch_seconds" if name == "seconds" else name


def _epoch_metrics(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "epoch" and isinstance(v, (int, float))}


class Tracker:
    """One library's record of runs. A handle returned by :meth:`start` is passed back to the others."""

    name = ""
    where = ""  # said once after the fit: where to look

    def start(self, name: str, params: dict, tags: dict[str, str], parent: Any = None,
              run_dir: Path | None = None) -> Any:
        """``run_dir``: the run's folder, made before training (empty until the run is written)."""
        raise NotImplementedError

    def epoch(self, run: Any, row: dict) -> None:
        raise NotImplementedError

    def finish(self, run: Any, run_dir: Path, final: dict[str, float]) -> None:
        raise NotImplementedError

    def abort(self, run: Any) -> None:
        """The fit failed or was interrupted."""

    def start_sweep(self, name: str, params: dict) -> Any:
        return name

    def finish_sweep(self, sweep: Any, folder: Path, best: dict[str, float]) -> None:
        """The sweep's table is written (``folder/sweep.csv``); ``best``: the best run's final metrics."""


@contextlib.contextmanager
def _file_store_allowed():
    """MLflow 3 refuses its file store (``mlruns``) unless asked: allow it while the store is opened."""
    old = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
        else:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = old


_ANSWER_SECONDS = 5  # how long an MLflow server may take to accept a connection and to answer at start


@contextlib.contextmanager
def _quick_requests():
    """MLflow retries a failed request for minutes (7 times, with backoff); while a run is opened a server
    that does not answer is one failed request, in seconds. Values the user set are kept."""
    keep = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(_ANSWER_SECONDS))
    try:
        yield
    finally:
        for k, v in keep.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _reachable(uri: str) -> None:
    """A server URI whose host does not take a connection within seconds is refused at once."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    if parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(parts.hostname):
        return  # reached through a proxy: the first request (a few seconds at most, see _quick_requests) tells
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=_ANSWER_SECONDS).close()
    except (OSError, ValueError) as e:
        why = "no answer" if isinstance(e, TimeoutError) else (getattr(e, "strerror", None) or str(e))
        raise FeatcacheError(f"--tracker mlflow cannot reach the MLflow server at {uri} ({why} within "
                             f"{_ANSWER_SECONDS} s); start the server, fix --tracking-uri (or MLFLOW_TRACKING_URI) "
                             "or leave out --tracker") from None


class MLflowTracker(Tracker):
    """MLflow through ``MlflowClient`` (no global active run): a sweep is a parent run, its fits child runs."""

    name = "mlflow"

    def __init__(self, uri: str | None, home: Path) -> None:
        try:
            import mlflow  # noqa: F401 - the package itself, not just a submodule left in sys.modules
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise FeatcacheError("--tracker mlflow needs MLflow: pip install 'featcache[mlflow]'") from None
        self._Metric, self._Param = Metric, Param
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or (home / "mlruns").resolve().as_uri()
        local = "://" not in self.uri or self.uri.startswith("file:")
        _reachable(self.uri)
        with _file_store_allowed() if local else contextlib.nullcontext():
            self.client = MlflowClient(tracking_uri=self.uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "featcache"
        with _quick_requests():
            found = self.client.get_experiment_by_name(experiment)
            self.experiment = found.experiment_id if found else self.client.create_experiment(experiment)
        view = (self.uri if self.uri.startswith(("http:", "https:")) else
                f"{'MLFLOW_ALLOW_FILE_STORE=true ' if local else ''}mlflow ui --backend-store-uri {self.uri}")
        self.where = f"tracked in MLflow experiment {experiment} at {self.uri} (see: {view})"

    def _params(self, params: dict) -> list:
        return [self._Param(k, param_value(v)[:6000]) for k, v in params.items()]

    def _metrics(self, values: dict[str, float], step: int) -> list:
        now = int(time.time() * 1000)
        return [self._Metric(k, v, now, step) for k, v in values.items()]

    def start(self, name, params, tags, parent=None, run_dir=None):
        tags = {**tags, **({"mlflow.parentRunId": parent} if parent else {})}
        run = self.client.create_run(self.experiment, run_name=name, tags=tags).info.run_id
        self.client.log_batch(run, params=self._params(params))
        return run

    def epoch(self, run, row):
        self.client.log_batch(run, metrics=self._metrics(_epoch_metrics(row), int(row["epoch"])))

    def finish(self, run, run_dir, final):
        self.client.log_batch(run, metrics=self._metrics(final, 0))
        self.client.set_tag(run, "featcache.run_dir", str(Path(run_dir).resolve()))
        for png in sorted(Path(run_dir).glob("*.png")):
            self.client.log_artifact(run, str(png), "plots")
        for name in _MODEL_FILES:  # the fitted head: JSON + arrays, loaded by featcache.load_head without pickle
            self.client.log_artifact(run, str(Path(run_dir) / name), "model")
        self.client.set_tag(run, "featcache.model", "model (featcache.load_head on the downloaded folder)")
        self.client.update_run(run, name=Path(run_dir).name)  # the run directory's name is known only now
        self.client.set_terminated(run, "FINISHED")

    def abort(self, run):
        self.client.set_terminated(run, "FAILED")

    def start_sweep(self, name, params):
        return self.start(name, params, {"featcache.sweep": "true"})

    def finish_sweep(self, sweep, folder, best):
        self.client.log_batch(sweep, metrics=self._metrics({f"best_{k}": v for k, v in best.items()}, 0))
        for table in ("sweep.csv", "sweep.json"):
            self.client.log_artifact(sweep, str(Path(folder) / table))
        self.client.set_terminated(sweep, "FINISHED")


class _TensorBoardRun:
    def __init__(self, writer, params: dict) -> None:
        self.writer, self.params, self.last = writer, params, 0


class TensorBoardTracker(Tracker):
    """TensorBoard event files through ``torch.utils.tensorboard.SummaryWriter``, opened as a run starts
    and flushed every epoch (live curves): scalars in groups, the head's parameters as hyper-parameters,
    plots as images when the run ends."""

    name = "tensorboard"

    def __init__(self, uri: str | None, home: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError:
            raise FeatcacheError("--tracker tensorboard needs TensorBoard: pip install 'featcache[tensorboard]'") from None
        if uri is not None and "://" in uri:
            raise FeatcacheError(f"--tracking-uri for tensorboard is a folder for its event files; got {uri!r}",
                                 param="tracking_uri")
        self._writer, self._hparams = SummaryWriter, hparams
        self.root = Path(uri) if uri else None
        self.where = (f"tracked in TensorBoard event files under {self.root} (see: tensorboard --logdir {self.root})"
                      if self.root else "tracked in TensorBoard event files in each run directory's tb/ "
                                        "(see: tensorboard --logdir {folder})")

    def start(self, name, params, tags, parent=None, run_dir=None):
        run_dir = Path(run_dir) if run_dir is not None else None
        if self.root is not None:
            logdir = self.root.joinpath(*filter(None, (parent, run_dir.name if run_dir is not None else name)))
        elif run_dir is not None:
            logdir = run_dir / "tb"
        else:
            raise ValueError("a TensorBoard run without a tracking folder needs its run directory")
        return _TensorBoardRun(self._writer(log_dir=str(logdir)), params)

    def epoch(self, run, row):
        step = int(row["epoch"])
        for k, v in _epoch_metrics(row).items():
            run.writer.add_scalar(grouped_tag(k), v, step)
        run.writer.flush()  # on disk now: tensorboard shows the curve while the head trains
        run.last = step

    def finish(self, run, run_dir, final):
        import numpy as np
        from PIL import Image

        writer, last = run.writer, run.last
        try:
            final = {grouped_tag(k): v for k, v in final.items()}
            for k, v in final.items():
                writer.add_scalar(k, v, last)
            for png in sorted(Path(run_dir).glob("*.png")):
                with Image.open(png) as img:
                    writer.add_image(f"plots/{png.stem}", np.asarray(img.convert("RGB")), last, dataformats="HWC")
            shown = {k: v if isinstance(v, (int, float, str)) else param_value(v) for k, v in run.params.items()}
            for summary in self._hparams(shown, final):
                writer.file_writer.add_summary(summary)
        finally:
            writer.close()

    def abort(self, run):
        run.writer.close()

    def start_sweep(self, name, params):
        return name


_ADAPTERS = {"mlflow": MLflowTracker, "tensorboard": TensorBoardTracker}


class Tracking:
    """A tracker whose failures become one note; after the first, it stops (the fits go on untouched)."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.notes: list[str] = []
        self.broken = False

    def _call(self, what: str, fn: Callable, *args) -> Any:
        if self.broken:
            return None
        try:
            return fn(*args)
        except Exception as e:
            self.broken = True
            self.notes.append(f"{self.tracker.name} tracking stopped while {what} ({type(e).__name__}: {e}); "
                              "the run directories are complete and their results unchanged")
            return None

    def start(self, name: str, cfg, fs, parent: Any = None, run_dir: Path | None = None) -> Any:
        tags = {"featcache.set": fs.key, "featcache.backbone": str(fs.record.backbone),
                "featcache.layer": str(fs.record.layer), "featcache.fit_pool": str(cfg.pool)}
        return self._call(f"starting run {name}", self.tracker.start, name, run_params(cfg), tags, parent, run_dir)

    def on_epoch(self, run: Any, then: Callable[[dict], None] | None = None) -> Callable[[dict], None]:
        """An ``on_epoch`` callback that logs the row, then calls ``then``."""
        def log(row: dict) -> None:
            if run is not None:
                self._call(f"logging epoch {row.get('epoch')}", self.tracker.epoch, run, row)
            if then is not None:
                then(row)
        return log

    def finish(self, run: Any, result) -> None:
        if run is not None:
            self._call(f"finishing run {result.run_dir.name}", self.tracker.finish, run, result.run_dir,
                       final_metrics(result))

    def abort(self, run: Any) -> None:
        if run is not None:
            self._call("marking the run failed", self.tracker.abort, run)

    def start_sweep(self, name: str, base, grid: dict[str, list]) -> Any:
        """A sweep's parent run: its heads' parameters from ``base``, the varied ones as their lists of values."""
        heads = list(grid.get("head", [base.head]))
        params = {**run_params(base, heads), **{k: v for k, v in grid.items() if k != "head"}}
        return self._call(f"starting sweep {name}", self.tracker.start_sweep, name, params)

    def finish_sweep(self, sweep: Any, folder: Path, best) -> None:
        if sweep is not None:
            self._call("finishing the sweep", self.tracker.finish_sweep, sweep, folder, final_metrics(best))

    def all_notes(self, folder: Path) -> list[str]:
        """The failure, or where to look; ``folder``: the run directory or the sweep's folder."""
        return self.notes if self.broken else [self.tracker.where.replace("{folder}", str(folder))]


def open_tracking(kind: str | None, uri: str | None, home: str | Path) -> Tracking | None:
    """The tracker ``kind`` names (None: no tracking), ready to log; a missing library or an unusable
    ``uri`` is an error here, before any training. ``home``: the folder that holds the run directories
    (MLflow's default ``mlruns`` goes there)."""
    if kind is None:
        return None
    if kind not in _ADAPTERS:
        raise FeatcacheError(f"--tracker must be one of {', '.join(TRACKERS)}; got {kind!r}", param="tracker")
    try:
        return Tracking(_ADAPTERS[kind](uri, Path(home)))
    except FeatcacheError:
        raise
    except Exception as e:
        text = " ".join(str(e).split())
        raise FeatcacheError(f"--tracker {kind} cannot record at {uri or 'its default place'}: {text[:300]}; "
                             "fix --tracking-uri (or MLFLOW_TRACKING_URI) or leave out --tracker") from None
