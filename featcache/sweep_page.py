"""A sweep's page, ``SWEEP/report.html``: every run with its parameters and val/test top-1 (best
marked, columns sortable), val and test top-1 against the swept parameter, which split is held out,
and a link to each run's report. ``sweep`` passes the ``sweep.json`` document it has in memory;
``featcache report SWEEP`` reads it from the folder.
"""

from __future__ import annotations

from pathlib import Path

from . import plots as _plots
from .errors import RunError
from .html import SORT_JS, Html, esc, fmt, img, page, table
from .persist import read_json, write_atomic
from .plots import have_matplotlib
from .report import EVAL_SPLITS
from .runs import describe_selection

__all__ = ["is_sweep_folder", "write_sweep_report"]


def is_sweep_folder(path: str | Path) -> bool:
    """Whether ``path`` is a sweep's folder (it holds ``sweep.json``)."""
    return (Path(path) / "sweep.json").is_file()


def _checked(doc, folder: Path) -> dict:
    """``sweep.json``'s document, checked enough to be shown: rows of plain values, the best run among them."""
    plain = lambda v: v is None or isinstance(v, (str, int, float, bool))
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not (isinstance(rows, list) and rows and all(isinstance(r, dict) and isinstance(r.get("run"), str)
                                                    and all(plain(v) for v in r.values()) for r in rows)):
        raise RunError(f"{folder}: sweep.json field 'rows' must be a non-empty list of runs with plain values; "
                       "the sweep folder is damaged")
    if not isinstance(doc.get("grid"), dict) or doc.get("best") not in {r["run"] for r in rows}:
        raise RunError(f"{folder}: sweep.json fields 'grid' and 'best' must be the grid and one of its runs; the "
                       "sweep folder is damaged")
    return doc


def write_sweep_report(folder: str | Path, doc: dict | None = None) -> Path:
    """Write ``SWEEP/report.html``: every run with its parameters and val/test top-1 (best marked, columns
    sortable), val and test top-1 against the swept parameter, and a link to each run's report.
    ``doc``: the ``sweep.json`` document the sweep has in memory (else it is read from ``folder``)."""
    folder = Path(folder)
    doc = _checked(read_json(folder / "sweep.json", str(folder)) if doc is None else doc, folder)
    rows, best = doc["rows"], doc["best"]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    varied = [k for k, v in doc["grid"].items() if isinstance(v, list) and len(set(map(str, v))) > 1]

    def cell(r, c):
        v = r.get(c)
        name = r["run"]
        if c == "run" and "/" not in name and name not in ("", ".", "..") and (folder / name / "report.html").is_file():
            return Html(f'<a href="{esc(name)}/report.html">{esc(name)}</a>')
        if c in varied or c == "chosen_C":  # a setting as typed (1e-05), never rounded to 0.0000
            return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
        return v

    runs = table([[cell(r, c) for c in columns] for r in rows], [c.replace("_", " ") for c in columns],
                   ["best" if r["run"] == best else "" for r in rows], sortable=True)
    param = next((k for k in varied if k != "head"), "head" if "head" in varied else None)
    picture = ""
    if param is not None and have_matplotlib() and all(param in r for r in rows):
        plt = _plots.pyplot()
        series = {f"{s} top-1": [r.get(f"{s}_top1") for r in rows] for s in EVAL_SPLITS
                  if any(r.get(f"{s}_top1") is not None for r in rows)}
        if series:
            png = _plots.sweep_scores(plt, [r[param] for r in rows], series, param,
                                      next(i for i, r in enumerate(rows) if r["run"] == best))
            picture = (f'<section id="sweep-plot"><h2>top-1 against {esc(param)}</h2>'
                       f'{img("sweep.png", png, f"top-1 against {param}")}</section>')
    sel = doc.get("selection")
    if not (isinstance(sel, dict) and isinstance(sel.get("chosen"), list) and all(
            isinstance(c, dict) and isinstance(c.get("what"), str) and isinstance(c.get("on"), str)
            for c in sel["chosen"]) and isinstance(sel.get("biased", []), list)
            and all(isinstance(b, str) for b in sel.get("biased", [])) and isinstance(sel.get("score"), (str, type(None)))):
        sel = None  # a sweep of an older featcache, or a damaged record: said as "-"
    best_row = next(r for r in rows if r["run"] == best)
    headline = (f'<p class="biased">The best run <b>{esc(best)}</b> was chosen on val top-1 '
                f'({esc(fmt(best_row.get("val_top1")))}): val is selection-biased.</p>')
    if best_row.get("test_top1") is not None:
        headline = (f'<p class="held headline"><b>test is held out</b>: the best run\'s test top-1 is '
                    f'<b>{esc(fmt(best_row["test_top1"]))}</b>.</p>') + headline
    notes = [n for n in doc["notes"] if isinstance(n, str)] if isinstance(doc.get("notes"), list) else []
    grid = [[k, ", ".join(map(str, v)) if isinstance(v, list) else str(v)] for k, v in doc["grid"].items()]
    body = (f'<section id="summary"><h1>Sweep {esc(folder.name)}</h1><p class="sub">{len(rows)} runs; best '
            f'{esc(best)}</p>{headline}<p>model selection: {esc(describe_selection(sel))}</p>'
            f'{"".join(f"<p class=note>note: {esc(n)}</p>" for n in notes)}</section>'
            f'<section id="runs"><h2>runs</h2><p>Best first; click a column to sort.</p>{runs}</section>{picture}'
            f'<section id="grid"><h2>grid</h2>{table(grid, ["option", "values"])}</section>')
    out = folder / "report.html"
    text = page(f"featcache sweep {folder.name}", body, SORT_JS)
    write_atomic(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return out
