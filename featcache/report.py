"""One HTML page for a run (``RUN/report.html``; a sweep's page is ``sweep_page``), a single
self-contained file: pictures embedded as PNG data, style inline, nothing linked but other reports.

A run's page: which split is held out and what was chosen on what, scikit-learn's classification
report per split, the confusion matrices normalised by row, per-class F1, the learning curves, the
settings of the head that ran, and (with ``data``) the surest mistakes. It is drawn from the run
record alone; ``fit`` passes the record and predictions it has in memory, and only the grid of
misclassified images needs the store's rows. Plots need matplotlib (``pip install 'featcache[plots]'``);
without it ``fit`` still writes its run directory and says how to get them.
"""

from __future__ import annotations

from pathlib import Path

from . import plots as _plots
from .errors import RunError, StoreError
from .heads import KINDS
from .html import esc, fmt, img, page, table
from .persist import write_atomic
from .plots import have_matplotlib, point_labels
from .runs import RunRecord, describe_selection

__all__ = ["PLOTS", "EVAL_SPLITS", "have_matplotlib", "point_labels", "write_plots", "write_report"]

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


def _selection_html(selection: dict | None, metrics: dict) -> str:
    """Which split is held out and which are selection-biased, said first and plainly."""
    if not selection:
        return '<p class="note">This run records no model selection (a run of an older featcache).</p>'
    parts = []
    for s in selection.get("biased", ()):
        why = [f"{c['what']} chosen on {c['on']}" for c in selection["chosen"] if c["on"].startswith(s)]
        parts.append(f'<p class="biased"><b>{esc(s)} is selection-biased</b>'
                     f'{" (" + esc("; ".join(why)) + ")" if why else ""}: its numbers overstate how well the head does '
                     "on new images.</p>")
    held = selection.get("score")
    if held and held in metrics:
        m = metrics[held]
        parts.insert(0, f'<p class="held headline"><b>{esc(held)} is held out</b> (nothing was chosen on it): top-1 '
                        f'<b>{esc(fmt(m["top1"]))}</b>, balanced accuracy {esc(fmt(m.get("balanced_accuracy")))}, '
                        f'macro F1 {esc(fmt(m.get("macro", {}).get("f1")))} on {esc(m["n"])} images.</p>')
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
    return table(rows, ["class", "precision", "recall", "f1-score", "support"], kinds)


def _settings(record: RunRecord, data, store: str | None) -> str:
    """The features, the parameters of the head that ran (asked of the head table) and what fitting chose."""
    features = [["backbone / layer", f"{record.backbone} / {record.layer}"], ["weights", record.weights["id"]],
                ["feature set", record.set], ["feature shape", " x ".join(map(str, record.feature_shape))],
                ["pool", record.config.pool], ["store", record.store]]
    if store is not None:
        features.append(["store used for this report", store])
    features.append(["data folder", data or record.config.data or "-"])
    if record.views_used:
        features.append(["augmented views used", record.views_used])
    params = KINDS[record.head.kind].params_in_effect(record.head.params)  # a checked record's kind
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
    out = (f"<h3>features</h3>{table(features, ['setting', 'value'])}"
           f"<h3>{esc(record.head.kind)} head</h3>{table(head, ['parameter', 'value'])}"
           f"<h3>fitting</h3>{table(fitting, ['', 'value'])}")
    search = record.C_search
    if search and search.get("grid"):
        rows = [[f"{c:g}" + (" (chosen)" if c == record.C else ""), float(s)] for c, s in zip(search["grid"],
                                                                                              search["scores"])]
        out += f"<h3>C search ({esc(search['by'])})</h3>" + table(rows, ["C", "score"])
    return out


def _shown(v) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) or "-"
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    return "-" if v is None else str(v)


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
    summary = table(
        [[s, m["n"], m["top1"], m.get("top5"), m.get("log_loss"), m.get("balanced_accuracy"),
          m.get("macro", {}).get("f1"), m.get("weighted", {}).get("f1"), _role(record, s)] for s, m in metrics.items()],
        ["split", "images", "top-1", "top-5", "log loss", "balanced accuracy", "macro F1", "weighted F1", "role"])
    about = f"{record.config.head} head on {record.backbone} / {record.layer} features, {len(classes)} classes"
    sections = [f'<section id="summary"><h1>Run {esc(run.name)}</h1><p class="sub">{esc(about)}; set {esc(record.set)}; '
                f'{esc(record.created_at)}</p>{"".join(f"<p class=note>note: {esc(n)}</p>" for n in notes)}'
                f"{_selection_html(record.selection, metrics)}"
                f"<p>model selection: {esc(describe_selection(record.selection))}</p></section>",
                f'<section id="metrics"><h2>metrics</h2>{summary}</section>']
    for s in EVAL_SPLITS:
        if s in metrics:
            sections.append(f'<section id="classification-{s}"><h2>classification report ({esc(s)}, '
                            f'{esc(_role(record, s))})</h2>{_classification_report(metrics[s], classes)}</section>')
    if "per_class.png" in figures:
        shown = _per_class_split(record)
        sections.append(f'<section id="per-class"><h2>per class ({esc(shown)})</h2>'
                        f'{img("per_class.png", figures["per_class.png"], f"per-class scores ({shown})")}</section>')
    for s in (evaluated := [s for s in EVAL_SPLITS if s in metrics]):
        name = _confusion_name(s, evaluated)
        if name in figures:
            sections.append(f'<section id="confusion-{s}"><h2>confusion matrix ({esc(s)})</h2><p>Each row is one true '
                            "class: the share of its images predicted as each class (rows sum to 1), the number of "
                            f"images in brackets.</p>{img(name, figures[name], f'confusion matrix ({s})')}</section>")
    if "curves.png" in figures:
        sections.append(f'<section id="curves"><h2>learning curves</h2>'
                        f'{img("curves.png", figures["curves.png"], "loss and accuracy per epoch")}</section>')
    if "misclassified.png" in figures:
        sections.append(f'<section id="misclassified"><h2>misclassified images</h2>'
                        f'{img("misclassified.png", figures["misclassified.png"], "misclassified images")}</section>')
    sections.append(f'<section id="settings"><h2>settings</h2>{_settings(record, data, store)}</section>')
    _write_pngs(run, figures)
    out = run / "report.html"
    text = page(f"featcache run {run.name}", "".join(sections))
    write_atomic(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return out
