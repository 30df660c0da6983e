"""Fit every combination of a grid of options in one process: the set is opened and its
features loaded once (once per ``pool``), each combination writes its own run directory, and
one table sorted by validation top-1 goes beside them as ``sweep.csv`` and ``sweep.json``.
The best run is chosen on val, so its val top-1 is selection-biased: the held-out score of the
sweep is the best run's test top-1, and without a test split a note says so (``selection`` in
``sweep.json``)::

    SWEEP/
      sweep.csv  sweep.json        one row per run, best first
      report.html                  the runs compared on one page (featcache report SWEEP writes it again)
      01-logreg-C=auto/            a run directory (featcache evaluate/report/predict read it)
      02-mlp-lr=0.001-hidden=64/
      ...

Plots and report.html are written for the best run only, unless ``all_plots``.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import FitConfig
from .errors import FeatcacheError
from .fit import BIASED_VAL_NOTE, FitResult, discard_run_dir, new_folder, open_tracking_for, train
from .heads import head_class, head_params
from .prepare import HEAD_OPTIONS, Prepared, check_memory_for, check_set_for, load_fit_data, open_fit_set

__all__ = ["SweepResult", "combinations", "sweep"]


def combinations(base: FitConfig, grid: dict[str, list], given: set[str] | None = None) -> list[FitConfig]:
    """Every combination of ``grid``'s values on top of ``base``, per head only of the options it takes.

    An option (in ``grid`` or ``given``) that none of the heads takes is an error; head options
    a head does not take are left at their defaults in its runs.
    """
    heads = list(grid.get("head", [base.head]))
    taken = {h: set(head_params(h)) for h in heads}
    blank = FitConfig(store=base.store)
    for name in sorted(set(grid) | set(given or ())):
        if name in HEAD_OPTIONS and not any(name in t for t in taken.values()):
            flag = "--" + name.replace("_", "-")
            raise FeatcacheError(f"{flag} is not an option of --head {','.join(heads)}", param=name)
    out = []
    for head in heads:
        keys = [k for k in grid if k != "head" and (k not in HEAD_OPTIONS or k in taken[head])]
        unused = {k: getattr(blank, k) for k in HEAD_OPTIONS if k not in taken[head]}
        for values in itertools.product(*(grid[k] for k in keys)):
            out.append(replace(base, **unused, head=head, **dict(zip(keys, values))))
    return out


def _label(i: int, cfg: FitConfig, varied: list[str]) -> str:
    parts = [f"{i:02d}", cfg.head] + [f"{k}={getattr(cfg, k)}" for k in varied if k != "head"
                                      and (k not in HEAD_OPTIONS or k in head_params(cfg.head))]
    return "-".join(parts).replace("/", "_")


@dataclass
class SweepResult:
    """The sweep's folder, one row per run (best first) and the fitted results in fit order."""

    folder: Path
    rows: list[dict]
    results: list[FitResult] = field(repr=False)
    columns: list[str]
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)
    selection: dict = field(default_factory=dict)  # the best run: chosen on what, and its held-out score

    def table(self) -> str:
        """The rows as an aligned text table."""
        head = self.columns
        cells = [[_cell(r.get(c)) for c in head] for r in self.rows]
        widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
        return "\n".join(line.rstrip() for line in lines)

    def summary(self) -> str:
        best = self.rows[0]
        if best.get("val_top1") is None:
            score = "no val split: not ranked"
        else:
            score = f"chosen on val top-1 {best['val_top1']:.4f}, selection-biased"
            if best.get("test_top1") is not None:
                score += f"; held-out test top-1 {best['test_top1']:.4f}"
        return (f"sweep {self.folder}: {len(self.rows)} runs in {self.seconds['total']:.1f} s (features loaded in "
                f"{self.seconds['load']:.2f} s); best {best['run']} ({score}); table in {self.folder / 'sweep.csv'}")


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if v < 1000 else f"{v:.0f}"
    return str(v)


def _row(name: str, res: FitResult, varied: list[str], takes: set[str]) -> dict:
    cfg = res.config
    row = {"run": name, "head": cfg.head}
    for k in varied:
        if k != "head":
            row[k] = getattr(cfg, k) if (k not in HEAD_OPTIONS or k in takes) else None
    if res.chosen_C is not None:
        row["chosen_C"] = res.chosen_C
    row["best_epoch"] = getattr(res.head, "best_epoch_", None) if res.head is not None else None
    for split in ("val", "test"):
        m = res.metrics.get(split)
        row[f"{split}_top1"] = m["top1"] if m else None
    m = res.metrics.get("val")
    row["val_log_loss"] = m["log_loss"] if m else None
    row["fit_s"] = res.seconds["fit"]
    return row


def _rank_key(row: dict):
    top = row.get("val_top1")
    loss = row.get("val_log_loss")
    return (-(top if top is not None else -1), loss if loss is not None else float("inf"))


def sweep(base: FitConfig, grid: dict[str, list], *, given: set[str] | None = None, all_plots: bool = False,
          on_result: Callable[[int, int, str, FitResult], None] | None = None) -> SweepResult:
    """Fit ``base`` with every combination of ``grid`` (option name → values) in this process.

    ``given``: options the user set (checked against the heads); ``on_result(i, n, name, result)``
    is called as each run finishes. Returns the table, sorted by validation top-1.
    """
    t0 = time.perf_counter()
    configs = combinations(base, {k: list(dict.fromkeys(v)) for k, v in grid.items()}, given)
    varied = [k for k, v in grid.items() if len(set(v)) > 1]
    tracking = open_tracking_for(base)  # a missing library is an error before any work
    classes = {h: head_class(h) for h in dict.fromkeys(cfg.head for cfg in configs)}  # each name resolved once
    fs = open_fit_set(configs[0])
    for cfg in configs:
        check_set_for(cfg, classes[cfg.head], fs)
        check_memory_for(cfg, classes[cfg.head], fs)  # every head takes the data it will be handed, before any fit
    folder = new_folder(base.out, base.runs, "sweep")
    loaded: dict[tuple, tuple] = {}
    load_s = 0.0
    results, rows, notes, tracked = [], [], [], []
    parent = tracking and tracking.start_sweep(folder.name, base, grid)
    try:
        for i, cfg in enumerate(configs, 1):
            name = _label(i, cfg, varied)
            cls = classes[cfg.head]
            key = (cfg.pool, cls.takes_maps)
            if key not in loaded:
                t = time.perf_counter()
                data, views, more = load_fit_data(cfg, cls, fs)
                loaded[key] = Prepared(fs, data, views)
                load_s += time.perf_counter() - t
                notes += more
            cfg = replace(cfg, out=str(folder / name))
            run_dir = None
            if tracking:  # made now, so the tracker can write into it while the head trains
                run_dir = new_folder(cfg.out, base.runs, cfg.head)
            run = tracking and tracking.start(name, cfg, fs, parent, run_dir=run_dir)
            tracked.append(run)
            try:
                res = train(cfg, cls, loaded[key], plots=all_plots and cfg.plots, t_load=load_s,
                            on_epoch=tracking and tracking.on_epoch(run), run_dir=run_dir)
            except BaseException:
                if run_dir is not None:
                    discard_run_dir(run_dir, True)
                raise
            notes += [f"{name}: {n}" for n in res.notes if n != BIASED_VAL_NOTE]  # the sweep says it once, below
            rows.append(_row(name, res, varied, set(cls.kind.options)))
            if on_result:
                on_result(i, len(configs), name, res)
            results.append(res)
        order = sorted(range(len(rows)), key=lambda j: (_rank_key(rows[j]), j))
        rows = [{"rank": r + 1, **rows[j]} for r, j in enumerate(order)]
        best = results[order[0]]
        if base.plots and not all_plots:
            from .report import have_matplotlib, write_report

            if have_matplotlib():
                write_report(best.run_dir, data=base.data, record=best.record, fs=fs, head=best.head,
                             probas=best.probas)
            else:
                notes.append("plots skipped: matplotlib is not installed (pip install 'featcache[plots]')")
        for res in results:  # keep the runs' records, not every fitted network
            if res is not best:
                res.head, res.probas = None, None
        present = {k for r in rows for k in r}
        columns = [c for c in ("rank", "run", "head", *[k for k in varied if k != "head"], "chosen_C", "best_epoch",
                               "val_top1", "test_top1", "val_log_loss", "fit_s") if c in present]
    except BaseException:
        if tracking:  # the tracked runs end as failed; the finished run directories stay
            for run in (*tracked, parent):
                tracking.abort(run)
        raise
    selection, more = _selection(rows)
    notes += more
    result = SweepResult(folder, rows, results, columns, {"load": load_s, "total": time.perf_counter() - t0}, notes,
                         selection)
    doc = _write(result, grid)
    if base.plots:
        from .plots import have_matplotlib
        from .sweep_page import write_sweep_report

        if have_matplotlib():  # the page comparing the runs, beside sweep.csv, from the document in memory
            write_sweep_report(folder, doc)
    if tracking:  # every run ends once the best one's plots are written, so they go with it
        for run, res in zip(tracked, results):
            tracking.finish(run, res)
        tracking.finish_sweep(parent, folder, best)
        result.notes += tracking.all_notes(folder)
    return result


def _selection(rows: list[dict]) -> tuple[dict, list[str]]:
    """How the best run was chosen and which of its numbers is held out, with a note when none is."""
    best = rows[0]
    if best.get("val_top1") is None:
        return ({"chosen": [], "biased": [], "score": None},
                ["no val split: the runs are listed in fit order, not ranked (ranking them on test would make the "
                 "test numbers selection-biased); extract with a val split to rank them"])
    selection = {"chosen": [{"what": "best run", "on": "val top-1 (then val log loss)"}], "biased": ["val"],
                 "score": "test" if best.get("test_top1") is not None else None}
    if selection["score"] is None:
        return selection, [f"the best run {best['run']} was chosen on val top-1, so its val top-1 is selection-biased "
                           "and the set has no test split to report instead; extract with a test split (--split) "
                           "for a held-out score"]
    return selection, []


def _write(result: SweepResult, grid: dict[str, list]) -> dict:
    """Write ``sweep.csv`` and ``sweep.json``; returns the document of ``sweep.json``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=result.columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.rows)
    (result.folder / "sweep.csv").write_text(buffer.getvalue())
    doc = {"grid": {k: list(v) for k, v in grid.items()}, "best": result.rows[0]["run"], "selection": result.selection, "rows": result.rows,
           "seconds": result.seconds, "notes": result.notes}
    (result.folder / "sweep.json").write_text(json.dumps(doc, indent=2))
    return doc
