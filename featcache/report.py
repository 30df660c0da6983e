"""One HTML page for a run (``RUN/report.html``) or a sweep (``SWEEP/report.html``), each a single
self-contained file: pictures embedded as PNG data, style inline, nothing linked but other reports.

A run's page: which split is held out and what was chosen on what, scikit-learn's classification
report per split, the confusion matrices normalised by row, per-class F1, the learning curves, the
settings of the head that ran, and (with ``data``) the surest mistakes. It is drawn from the run
record alone; ``fit`` passes the record and predictions it has in memory, and only the grid of
misclassified images needs the store's rows. Plots need matplotlib (``pip install 'featcache[plots]'``);
without it ``fit`` still writes its run directory and says how to get them.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from . import plots as _plots
from .errors import RunError, StoreError
from .persist import read_json, write_atomic
from .plots import have_matplotlib, point_labels
from .runs import RunRecord, describe_selection

__all__ = ["PLOTS", "have_matplotlib", "point_labels", "write_plots", "write_report", "write_sweep_report",
           "is_sweep_folder"]

PLOTS = ("curves.png", "confusion.png", "confusion_test.png", "per_class.png", "misclassified.png")
EVAL_SPLITS = ("val", "test")


def _eval_split(metrics: dict) -> str | None:
    return "val" if "val" in metrics else ("test" if "test" in metrics else None)


def _per_class_split(record: RunRecord) -> str | None:
    """The split the per-class plot shows: the held-out one when there is one, else the first evaluated."""
    held = (record.selection or {}).get("score")
    return held if held in record.metrics else _eval_split(record.metrics)


def _predictions(record: RunRecord, run: Path, split: str, fs, head, probas, backbone, store, notes):
    """(set, predicted, confidence) of ``split`` for the misclassified grid; (None, ...) when the rows are
    not at hand (a store that is not found is a note, unless the user named it). Nothing is written yet."""
    if fs is None:
        from .runs import run_store
        from .store import open_store

        try:
            fs = open_store(run_store(record, run, store), mode="r").get_set(record.set)
        except StoreError as e:
            if store is not None:
                raise
            notes.append(f"{str(e).split('. ')[0]}: the grid of misclassified images (it needs the store's rows) is "
                         "left out; pass --store with where it is now to draw it")
            return None, None, None
    if list(fs.classes) != list(record.classes) or tuple(fs.shape) != record.feature_shape:
        raise RunError(f"{run}: set {record.set} in {record.store} has other classes or another feature shape "
                       "than the run was fitted on; the run or the store is damaged")
    if probas is None or split not in probas:
        from .heads import head_from_record
        from .stream import RowReader
        from .tails import RestNetwork

        head = head or head_from_record(record.head, str(run), RestNetwork(backbone))
        x = RowReader(fs.store, fs.space, fs.hashes(split), fs.shape, record.config.pool,
                      keep_shape=record.takes_maps).load()
        probas = {split: head.predict_proba(x)}
    return fs, probas[split].argmax(1), probas[split].max(1)


def _figures(record: RunRecord, run: Path, fs=None, head=None, probas=None, data=None, backbone=None, store=None,
             notes: list[str] | None = None) -> dict[str, bytes]:
    """The run's pictures as PNG bytes by file name (those that apply). Everything that can fail (the
    store, the head) comes before the first figure, so a refused run gets nothing written."""
    notes = [] if notes is None else notes
    plt = _plots.pyplot()
    metrics, classes = record.metrics, list(record.classes)
    split = _eval_split(metrics)
    grid = None
    if split and data is not None:
        fs, predicted, confidence = _predictions(record, run, split, fs, head, probas, backbone, store, notes)
        if fs is not None:
            grid = (fs.paths(split), fs.labels(split), predicted, confidence)
    out = {"curves.png": _plots.curves(plt, list(record.history), record.best_epoch)}
    evaluated = [s for s in EVAL_SPLITS if s in metrics]
    for s in evaluated:
        out[_confusion_name(s, evaluated)] = _plots.confusion(plt, metrics[s]["confusion_matrix"], classes, s)
    shown = _per_class_split(record)
    if shown:
        scores, what = _class_scores(metrics[shown])
        out["per_class.png"] = _plots.per_class(plt, classes, scores, _support(metrics[shown]), shown, what)
    if grid is not None:
        out["misclassified.png"] = _plots.misclassified(Path(data), grid[0], grid[1], grid[2], classes, split,
                                                        grid[3])
    return {k: v for k, v in out.items() if v is not None}


def _confusion_name(split: str, evaluated: list[str]) -> str:
    """``confusion.png`` for the first evaluated split (val, else test), ``confusion_test.png`` beside it."""
    return "confusion.png" if split == evaluated[0] else f"confusion_{split}.png"


def _support(m: dict) -> list[int]:
    return [int(sum(row)) for row in m["confusion_matrix"]]


def _class_scores(m: dict) -> tuple[list, str]:
    """Per-class F1 as recorded; recall (per-class accuracy) for a run of a featcache that recorded no F1."""
    if m.get("per_class"):
        return list(m["per_class"]["f1"]), "F1"
    return list(m["per_class_accuracy"].values()), "recall"


def write_plots(run: str | Path, fs=None, head=None, probas: dict | None = None, data: str | Path | None = None,
                backbone: str | None = None, store: str | None = None, notes: list[str] | None = None, *,
                record: RunRecord | None = None) -> list[Path]:
    """Write the run's PNGs (those that apply) into the run directory and return their paths.

    ``fit`` passes the record, set, head and per-split probabilities it has in memory; on its own this
    reads the run directory, and the store only for the grid of misclassified images, which is drawn
    only with ``data`` (a folder the user names, never the root a store records). ``backbone``: the
    user's --backbone, for a rest head on a ``module:factory`` network. ``store``: where the run's store
    is now (default: the one it records); when that is not found, ``notes`` says what was left out."""
    run = Path(run)
    record = record or RunRecord.read(run)
    return _write_pngs(run, _figures(record, run, fs, head, probas, data, backbone, store, notes))


def _write_pngs(run: Path, figures: dict[str, bytes]) -> list[Path]:
    written = []
    for name, png in figures.items():
        write_atomic(run / name, lambda tmp, png=png: tmp.write_bytes(png))
        written.append(run / name)
    return written


# -- the page ----------------------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.4}h1{margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}
.sub{color:#555;margin-top:0}table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #ccc;padding:3px 9px;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f3f3f3}tr.avg td{background:#fafafa;font-style:italic}tr.best td{background:#fff6d5;font-weight:600}
img{max-width:100%;height:auto}.note{background:#fff4e5;border-left:4px solid #f0a030;padding:.4em .8em;margin:.4em 0}
.held{background:#e9f6ec;border-left:4px solid #2e9b4f;padding:.6em 1em;margin:.6em 0}
.biased{background:#fdecea;border-left:4px solid #d9534f;padding:.6em 1em;margin:.6em 0}
.headline{font-size:1.25em}th.sort{cursor:pointer}th.sort:after{content:" \\2195";color:#999}"""


def _e(v) -> str:
    return html.escape(str(v))


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table(rows: list[list], head: list[str], classes: list[str] | None = None, sortable: bool = False) -> str:
    th = "".join(f'<th{" class=sort" if sortable else ""}>{_e(h)}</th>' for h in head)
    body = []
    for i, r in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(f'<td class="n">{_e(_fmt(c))}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
                        else f"<td>{c.html if isinstance(c, _Html) else _e(_fmt(c))}</td>" for c in r)
        body.append(f"<tr{cls}>{cells}</tr>")
    kind = " class=sortable" if sortable else ""
    return f'<table{kind}><thead><tr>{th}</tr></thead><tbody>{"".join(body)}</tbody></table>'


class _Html(str):
    """A cell already written as HTML (a link)."""

    @property
    def html(self) -> str:
        return str(self)


def _img(name: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}" title="{_e(name)}"></figure>'


def _selection_html(selection: dict | None, metrics: dict) -> str:
    """Which split is held out and which are selection-biased, said first and plainly."""
    if not selection:
        return '<p class="note">This run records no model selection (a run of an older featcache).</p>'
    parts = []
    for s in selection.get("biased", ()):
        why = [f"{c['what']} chosen on {c['on']}" for c in selection["chosen"] if c["on"].startswith(s)]
        parts.append(f'<p class="biased"><b>{_e(s)} is selection-biased</b>'
                     f'{" (" + _e("; ".join(why)) + ")" if why else ""}: its numbers overstate how well the head does '
                     "on new images.</p>")
    held = selection.get("score")
    if held and held in metrics:
        m = metrics[held]
        parts.insert(0, f'<p class="held headline"><b>{_e(held)} is held out</b> (nothing was chosen on it): top-1 '
                        f'<b>{_e(_fmt(m["top1"]))}</b>, balanced accuracy {_e(_fmt(m.get("balanced_accuracy")))}, '
                        f'macro F1 {_e(_fmt(m.get("macro", {}).get("f1")))} on {_e(m["n"])} images.</p>')
    else:
        parts.insert(0, '<p class="biased headline"><b>No held-out split</b>: every number below is on rows that '
                        "trained the head or chose a setting. Extract with a test split (a test/ folder, or --split "
                        "0.7,0.15,0.15) for a held-out score.</p>")
    return "".join(parts)


def _role(record: RunRecord, split: str) -> str:
    sel = record.selection or {}
    if split == "train":
        return "fitted on"
    return ("selection-biased" if split in sel.get("biased", ()) else "held out" if split == sel.get("score")
            else "-")


def _classification_report(m: dict, classes: list[str]) -> str:
    """scikit-learn's classification report of one split: precision, recall, F1 and support per class,
    accuracy, macro and weighted averages (as recorded by fit; per-class accuracy only for older runs)."""
    support = _support(m)
    pc = m.get("per_class")
    if pc:
        rows = [list(r) for r in zip(classes, pc["precision"], pc["recall"], pc["f1"], pc["support"])]
    else:
        rows = [[c, None, a, None, n] for (c, a), n in zip(m["per_class_accuracy"].items(), support)]
    kinds = [""] * len(rows)
    total = sum(support)
    rows.append(["accuracy", None, None, m["top1"], total])
    for avg in ("macro", "weighted"):
        a = m.get(avg)
        if a:
            rows.append([f"{avg} avg", a["precision"], a["recall"], a["f1"], total])
    kinds += ["avg"] * (len(rows) - len(kinds))
    return _table(rows, ["class", "precision", "recall", "f1-score", "support"], kinds)


def _settings(record: RunRecord, data, store: str | None) -> str:
    """The features, the parameters of the head that ran (asked of its class) and what fitting chose."""
    from .heads import head_class

    features = [["backbone / layer", f"{record.backbone} / {record.layer}"], ["weights", record.weights["id"]],
                ["feature set", record.set], ["feature shape", " x ".join(map(str, record.feature_shape))],
                ["pool", record.config.pool], ["store", record.store]]
    if store is not None:
        features.append(["store used for this report", store])
    features.append(["data folder", data or record.config.data or "-"])
    if record.views_used:
        features.append(["augmented views used", record.views_used])
    params = head_class(record.head.kind).params_in_effect(record.head.params)
    head = [[k, _shown(v)] for k, v in params.items()]
    fitting = []
    if record.C is not None:
        fitting.append(["chosen C", f"{record.C:g}"])
    fitting.append(["model selection", describe_selection(record.selection)])
    if record.history:  # heads trained in epochs
        fitting += [["epochs run", len(record.history)],
                    ["kept epoch", "0 (the start)" if record.best_epoch == 0 else record.best_epoch or "-"],
                    ["stopped early", "yes" if record.stopped_early else "no"]]
    fitting += [[f"{k} seconds", float(v)] for k, v in record.seconds.items()]
    fitting.append(["created", record.created_at])
    out = (f"<h3>features</h3>{_table(features, ['setting', 'value'])}"
           f"<h3>{_e(record.head.kind)} head</h3>{_table(head, ['parameter', 'value'])}"
           f"<h3>fitting</h3>{_table(fitting, ['', 'value'])}")
    search = record.C_search
    if search and search.get("grid"):
        rows = [[f"{c:g}" + (" (chosen)" if c == record.C else ""), float(s)] for c, s in zip(search["grid"],
                                                                                              search["scores"])]
        out += f"<h3>C search ({_e(search['by'])})</h3>" + _table(rows, ["C", "score"])
    return out


def _shown(v) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) or "-"
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    return "-" if v is None else str(v)


def _page(title: str, body: str, script: str = "") -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>\n'
            f"<body>{body}{script}</body></html>\n")


def write_report(run: str | Path, data: str | Path | None = None, backbone: str | None = None,
                 store: str | None = None, notes: list[str] | None = None, *, record: RunRecord | None = None,
                 fs=None, head=None, probas: dict | None = None) -> Path:
    """Write ``RUN/report.html`` (and the run's PNGs beside it) and return its path.

    ``record``, ``fs``, ``head``, ``probas``: what ``fit`` has in memory (else the run directory is read).
    ``data``: the image folder the set was made from, for the grid of misclassified images. ``store``:
    where the run's store is now; without it, a store that is not found leaves the grid out, with
    ``notes`` (also on the page) saying so."""
    run = Path(run)
    record = record or RunRecord.read(run)
    notes = [] if notes is None else notes
    figures = _figures(record, run, fs, head, probas, data, backbone, store, notes)
    metrics, classes = record.metrics, list(record.classes)
    summary = _table(
        [[s, m["n"], m["top1"], m.get("top5"), m.get("log_loss"), m.get("balanced_accuracy"),
          m.get("macro", {}).get("f1"), m.get("weighted", {}).get("f1"), _role(record, s)] for s, m in metrics.items()],
        ["split", "images", "top-1", "top-5", "log loss", "balanced accuracy", "macro F1", "weighted F1", "role"])
    about = f"{record.config.head} head on {record.backbone} / {record.layer} features, {len(classes)} classes"
    sections = [f'<section id="summary"><h1>Run {_e(run.name)}</h1><p class="sub">{_e(about)}; set {_e(record.set)}; '
                f'{_e(record.created_at)}</p>{"".join(f"<p class=note>note: {_e(n)}</p>" for n in notes)}'
                f"{_selection_html(record.selection, metrics)}"
                f"<p>model selection: {_e(describe_selection(record.selection))}</p></section>",
                f'<section id="metrics"><h2>metrics</h2>{summary}</section>']
    for s in EVAL_SPLITS:
        if s in metrics:
            sections.append(f'<section id="classification-{s}"><h2>classification report ({_e(s)}, '
                            f'{_e(_role(record, s))})</h2>{_classification_report(metrics[s], classes)}</section>')
    if "per_class.png" in figures:
        shown = _per_class_split(record)
        sections.append(f'<section id="per-class"><h2>per class ({_e(shown)})</h2>'
                        f'{_img("per_class.png", figures["per_class.png"], f"per-class scores ({shown})")}</section>')
    for s in (evaluated := [s for s in EVAL_SPLITS if s in metrics]):
        name = _confusion_name(s, evaluated)
        if name in figures:
            sections.append(f'<section id="confusion-{s}"><h2>confusion matrix ({_e(s)})</h2><p>Each row is one true '
                            "class: the share of its images predicted as each class (rows sum to 1), the number of "
                            f"images in brackets.</p>{_img(name, figures[name], f'confusion matrix ({s})')}</section>")
    if "curves.png" in figures:
        sections.append(f'<section id="curves"><h2>learning curves</h2>'
                        f'{_img("curves.png", figures["curves.png"], "loss and accuracy per epoch")}</section>')
    if "misclassified.png" in figures:
        sections.append(f'<section id="misclassified"><h2>misclassified images</h2>'
                        f'{_img("misclassified.png", figures["misclassified.png"], "misclassified images")}</section>')
    sections.append(f'<section id="settings"><h2>settings</h2>{_settings(record, data, store)}</section>')
    _write_pngs(run, figures)
    out = run / "report.html"
    page = _page(f"featcache run {run.name}", "".join(sections))
    write_atomic(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return out


# -- a sweep -----------------------------------------------------------------------------------------------

_SORT_JS = """<script>document.querySelectorAll("table.sortable").forEach(function(t){
t.querySelectorAll("th").forEach(function(th,i){th.addEventListener("click",function(){
var b=t.tBodies[0],rows=Array.from(b.rows),up=th.dataset.up!=="1";th.dataset.up=up?"1":"0";
rows.sort(function(x,y){var a=x.cells[i].innerText,c=y.cells[i].innerText,p=parseFloat(a),q=parseFloat(c);
var r=(isNaN(p)||isNaN(q))?a.localeCompare(c):p-q;return up?r:-r});rows.forEach(function(r){b.appendChild(r)})})})})
</script>"""


def is_sweep_folder(path: str | Path) -> bool:
    """Whether ``path`` is a sweep's folder (it holds ``sweep.json``)."""
    return (Path(path) / "sweep.json").is_file()


def _read_sweep(folder: Path) -> dict:
    """``sweep.json``, checked enough to be shown: rows of plain values, the best run among them."""
    doc = read_json(folder / "sweep.json", str(folder))
    plain = lambda v: v is None or isinstance(v, (str, int, float, bool))  # noqa: E731
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not (isinstance(rows, list) and rows and all(isinstance(r, dict) and isinstance(r.get("run"), str)
                                                    and all(plain(v) for v in r.values()) for r in rows)):
        raise RunError(f"{folder}: sweep.json field 'rows' must be a non-empty list of runs with plain values; "
                       "the sweep folder is damaged")
    if not isinstance(doc.get("grid"), dict) or doc.get("best") not in {r["run"] for r in rows}:
        raise RunError(f"{folder}: sweep.json fields 'grid' and 'best' must be the grid and one of its runs; the "
                       "sweep folder is damaged")
    return doc


def write_sweep_report(folder: str | Path) -> Path:
    """Write ``SWEEP/report.html``: every run with its parameters and val/test top-1 (best marked, columns
    sortable), val and test top-1 against the swept parameter, and a link to each run's report."""
    folder = Path(folder)
    doc = _read_sweep(folder)
    rows, best = doc["rows"], doc["best"]
    columns = [c for c in dict.fromkeys(k for r in rows for k in r)]
    varied = [k for k, v in doc["grid"].items() if isinstance(v, list) and len(set(map(str, v))) > 1]

    def cell(r, c):
        v = r.get(c)
        name = r["run"]
        if c == "run" and "/" not in name and name not in ("", ".", "..") and (folder / name / "report.html").is_file():
            return _Html(f'<a href="{_e(name)}/report.html">{_e(name)}</a>')
        if c in varied or c == "chosen_C":  # a setting as typed (1e-05), never rounded to 0.0000
            return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
        return v

    table = _table([[cell(r, c) for c in columns] for r in rows], [c.replace("_", " ") for c in columns],
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
            picture = (f'<section id="sweep-plot"><h2>top-1 against {_e(param)}</h2>'
                       f'{_img("sweep.png", png, f"top-1 against {param}")}</section>')
    sel = doc.get("selection")
    if not (isinstance(sel, dict) and isinstance(sel.get("chosen"), list) and all(
            isinstance(c, dict) and isinstance(c.get("what"), str) and isinstance(c.get("on"), str)
            for c in sel["chosen"]) and isinstance(sel.get("biased", []), list)
            and all(isinstance(b, str) for b in sel.get("biased", [])) and isinstance(sel.get("score"), (str, type(None)))):
        sel = None  # a sweep of an older featcache, or a damaged record: said as "-"
    best_row = next(r for r in rows if r["run"] == best)
    headline = (f'<p class="biased">The best run <b>{_e(best)}</b> was chosen on val top-1 '
                f'({_e(_fmt(best_row.get("val_top1")))}): val is selection-biased.</p>')
    if best_row.get("test_top1") is not None:
        headline = (f'<p class="held headline"><b>test is held out</b>: the best run\'s test top-1 is '
                    f'<b>{_e(_fmt(best_row["test_top1"]))}</b>.</p>') + headline
    notes = [n for n in doc["notes"] if isinstance(n, str)] if isinstance(doc.get("notes"), list) else []
    grid = [[k, ", ".join(map(str, v)) if isinstance(v, list) else str(v)] for k, v in doc["grid"].items()]
    body = (f'<section id="summary"><h1>Sweep {_e(folder.name)}</h1><p class="sub">{len(rows)} runs; best '
            f'{_e(best)}</p>{headline}<p>model selection: {_e(describe_selection(sel))}</p>'
            f'{"".join(f"<p class=note>note: {_e(n)}</p>" for n in notes)}</section>'
            f'<section id="runs"><h2>runs</h2><p>Best first; click a column to sort.</p>{table}</section>{picture}'
            f'<section id="grid"><h2>grid</h2>{_table(grid, ["option", "values"])}</section>')
    out = folder / "report.html"
    page = _page(f"featcache sweep {folder.name}", body, _SORT_JS)
    write_atomic(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return out
