"""Pictures of a run, and one HTML page with all of it.

Plots need matplotlib (``pip install 'featcache[plots]'``); without it ``fit`` still writes
its run directory and says how to get the plots.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from .data import load_rgb, safe_join
from .errors import FeatcacheError, RunError, StoreError
from .heads import head_from_record
from .persist import write_atomic
from .runs import RunRecord, describe_selection, run_store
from .store import open_store
from .stream import RowReader

__all__ = ["PLOTS", "have_matplotlib", "write_plots", "write_report"]

PLOTS = ("curves.png", "confusion.png", "per_class.png", "misclassified.png")
_MAX_MISSES = 16


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    if not have_matplotlib():
        raise FeatcacheError("plots need matplotlib: pip install 'featcache[plots]'")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _eval_split(metrics: dict) -> str | None:
    return "val" if "val" in metrics else ("test" if "test" in metrics else None)


def _curves(plt, history: list[dict], out: Path, best_epoch: int | None = None) -> Path | None:
    if not history:
        return None  # scikit-learn heads have no epochs
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        if key in history[0]:
            ax1.plot(epochs, [r[key] for r in history], label=label)
    for key, label in (("train_acc", "train"), ("val_acc", "val")):
        if key in history[0]:
            ax2.plot(epochs, [r[key] for r in history], label=label)
    if best_epoch is not None and best_epoch >= 1:
        for ax in (ax1, ax2):
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"kept (epoch {best_epoch})")
    accs = [r[k] for r in history for k in ("train_acc", "val_acc") if k in r]
    low = max(0.0, np.floor(min(accs) * 10) / 10 - 0.1) if accs else 0.0  # zoom in: curves near 1 stay apart
    ax1.set(title="loss", xlabel="epoch")
    ax2.set(title="accuracy", xlabel="epoch", ylim=(low, 1.01))
    ax1.xaxis.get_major_locator().set_params(integer=True)
    ax2.xaxis.get_major_locator().set_params(integer=True)
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return out


def _confusion(plt, cm: list[list[int]], classes: list[str], split: str, out: Path) -> Path:
    cm = np.asarray(cm)
    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
           title=f"confusion matrix ({split})")
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    if len(classes) <= 30:
        font = 14 if len(classes) <= 5 else (10 if len(classes) <= 12 else 8)
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=font)
    fig.tight_layout()
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return out


def point_labels(names: list, xs: list, ys: list) -> dict[tuple, str]:
    """One label per plotted point: classes on the same point share it ("1, 4"), never drawn over each
    other; a class without an accuracy (NaN) has no point and no label."""
    at: dict[tuple, list[str]] = {}
    for c, x, y in zip(names, xs, ys):
        if not np.isnan(y):
            at.setdefault((x, round(float(y), 6)), []).append(str(c))
    return {xy: ", ".join(cs) for xy, cs in at.items()}


def _per_class(plt, per_class: dict, train_counts: dict, split: str, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [train_counts[c] for c in per_class]
    ys = [np.nan if a is None else a for a in per_class.values()]
    ax.scatter(xs, ys)
    for (x, y), text in point_labels(list(per_class), xs, ys).items():
        ax.annotate(text, (x, y), fontsize=9, xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="training images", ylabel=f"{split} accuracy", ylim=(0, 1.08), title="per-class accuracy")
    ax.xaxis.get_major_locator().set_params(integer=True)  # counts, never 121.5
    pad = max(1.0, 0.1 * (max(xs) - min(xs)))  # points and their names off the frame
    ax.set_xlim(min(xs) - pad, max(xs) + pad * 2)
    fig.tight_layout()
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return out


def _misclassified(plt, root: Path, paths: list[str], y: np.ndarray, pred: np.ndarray, classes: list[str],
                   split: str, out: Path, confidence: np.ndarray | None = None) -> Path | None:
    wrong = np.flatnonzero(pred != y)
    total = len(wrong)
    if confidence is not None:  # the surest mistakes first: those say most about the data or the labels
        wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]
    wrong = wrong[:_MAX_MISSES]
    if not len(wrong) or not root.is_dir():
        return None
    cols = min(4, len(wrong))
    rows = -(-len(wrong) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        try:
            img = load_rgb(safe_join(root, paths[i]))
            img.thumbnail((256, 256))
            ax.imshow(img)
        except Exception:  # a file moved or unreadable since extraction: leave the tile empty
            pass
        sure = f" ({confidence[i]:.0%})" if confidence is not None else ""
        name = Path(paths[i]).name
        name = name if len(name) <= 28 else name[:12] + "…" + name[-12:]
        ax.set_title(f"{name}\ntrue {classes[y[i]]}\npredicted {classes[pred[i]]}{sure}", fontsize=9)
    order = ", most confident first" if confidence is not None else ""
    fig.suptitle(f"misclassified {split} images: {len(wrong)} of {total}{order}")
    fig.tight_layout()
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return out


def write_plots(run: str | Path, fs=None, head=None, probas: dict | None = None, data: str | Path | None = None,
                backbone: str | None = None, store: str | None = None, notes: list[str] | None = None) -> list[Path]:
    """Write the run's PNGs (those that apply) into the run directory and return their paths.

    ``fit`` passes the set, head and per-split probabilities it already has; on its own this
    reloads the head and features from the run directory and the store. The misclassified grid
    reads images only under ``data``, a folder the user names (never the root a store records).
    ``backbone``: the user's --backbone, for a rest head on a ``module:factory`` network. ``store``: where
    the run's store is now (default: the one it records). When the recorded store is not found (a run
    copied on its own), the plots drawn from the run directory alone are written, and ``notes`` says
    which were left out.
    """
    plt = _pyplot()
    record = RunRecord.read(run)
    run = Path(run)
    metrics = record.metrics
    split = _eval_split(metrics)
    if split and fs is None:
        try:
            fs = open_store(run_store(record, run, store), mode="r").get_set(record.set)
        except StoreError as e:
            if store is not None:
                raise
            if notes is not None:
                notes.append(f"{str(e).split('. ')[0]}: the plots that need its rows (per class, misclassified) are "
                             "left out; pass --store with where it is now to draw them")
    if split and fs is not None:  # everything that can fail comes before the first plot is written
        if list(fs.classes) != list(record.classes) or tuple(fs.shape) != record.feature_shape:
            raise RunError(f"{run}: set {record.set} in {record.store} has other classes or another feature shape "
                           "than the run was fitted on; the run or the store is damaged")
        if probas is None:
            head = head or head_from_record(record.head, str(run), backbone)
            x = RowReader(fs.store, fs.space, fs.hashes(split), fs.shape, record.config.pool,
                          keep_shape=record.takes_maps).load()
            probas = {split: head.predict_proba(x)}
        predicted = probas[split].argmax(1)
        confidence = probas[split].max(1)
    # class and file names are drawn as written: a name with two $ is not a formula (mathtext would
    # parse it, and fail on one like a$_$b)
    with plt.rc_context({"text.parse_math": False}):
        written = [_curves(plt, list(record.history), run / "curves.png", record.best_epoch)]
        if split:
            classes = list(record.classes)
            written.append(_confusion(plt, metrics[split]["confusion_matrix"], classes, split, run / "confusion.png"))
        if split and fs is not None:
            counts = np.bincount(fs.labels("train"), minlength=len(classes))
            written.append(_per_class(plt, metrics[split]["per_class_accuracy"], dict(zip(classes, counts.tolist())),
                                      split, run / "per_class.png"))
            if data is not None:
                written.append(_misclassified(plt, Path(data), fs.paths(split), fs.labels(split), predicted,
                                              classes, split, run / "misclassified.png", confidence))
    return [p for p in written if p is not None]


def _table(rows: list[list[str]], head: list[str]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _settings(record: RunRecord, data: str | Path | None) -> list[list]:
    """Every setting of the run: the features, the head's parameters and what fitting chose."""
    rows = [["backbone", f"{record.backbone} / {record.layer}"], ["weights", record.weights["id"]],
            ["feature set", record.set], ["store", record.store], ["data folder", data or record.config.data or "-"],
            ["head", record.config.head]]
    cfg = record.config.to_dict()
    params = {k: v for k, v in record.head.params.items() if k not in ("kind", "rest_of")}
    rows += [[k, _shown(v)] for k, v in params.items()]
    rows += [[k, _shown(cfg[k])] for k in ("pool", "use_views", "max_memory") if k in cfg]
    if record.C is not None:
        rows.append(["chosen C", f"{record.C:g}"])
    rows.append(["model selection", describe_selection(record.selection)])
    if record.history:  # heads trained in epochs
        rows += [["epochs run", len(record.history)],
                 ["best epoch (kept)", "0 (the start)" if record.best_epoch == 0 else record.best_epoch or "-"],
                 ["stopped early", record.stopped_early]]
    rows += [["views used", record.views_used], ["created", record.created_at]]
    return rows


def _shown(v) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) or "-"
    return "-" if v is None else str(v)


def write_report(run: str | Path, data: str | Path | None = None, backbone: str | None = None,
                 store: str | None = None, notes: list[str] | None = None) -> Path:
    """Write ``RUN/report.html``: the run's settings, metrics and plots on one page (the grid of
    misclassified images only with ``data``, the image folder the set was made from). ``store``: where
    the run's store is now; without it, a run whose store is not found is reported from its own
    directory, with ``notes`` (also on the page) saying what was left out."""
    record = RunRecord.read(run)
    run = Path(run)
    metrics = record.metrics
    notes = [] if notes is None else notes
    plots = [p.name for p in write_plots(run, data=data, backbone=backbone, store=store, notes=notes)]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    summary = _table(
        [[s, m["n"], fmt(m["top1"]), fmt(m.get("top5")), fmt(m["log_loss"]), fmt(m.get("balanced_accuracy")),
          fmt(m.get("macro", {}).get("f1")), "selection-biased" if s in (record.selection or {}).get("biased", ())
          else "held out" if s == (record.selection or {}).get("score") else "-"] for s, m in metrics.items()],
        ["split", "images", "top-1", "top-5", "log loss", "balanced acc", "macro F1", "score"],
    ) + f"<p>model selection: {html.escape(describe_selection(record.selection))}</p>"
    split = _eval_split(metrics)
    per_class = _table([[c, fmt(a)] for c, a in metrics[split]["per_class_accuracy"].items()],
                       ["class", f"{split} accuracy"]) if split else ""
    settings = _table(_settings(record, data), ["setting", "value"])
    search = record.C_search
    if search and search.get("grid"):
        chosen = lambda c: " (chosen)" if c == record.C else ""  # noqa: E731
        settings += f"<h2>C search ({html.escape(search['by'])})</h2>" + _table(
            [[f"{c:g}{chosen(c)}", fmt(s)] for c, s in zip(search["grid"], search["scores"])], ["C", "score"])
    images = "".join(f'<h2>{html.escape(p[:-4].replace("_", " "))}</h2><img src="{p}" alt="{p}">' for p in plots)
    score = f", {split} top-1 {fmt(metrics[split]['top1'])}" if split else ""
    about = f"{record.config.head} head on {record.backbone} / {record.layer} features{score}"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>featcache run {html.escape(run.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}} img{{max-width:100%}}</style></head>
<body><h1>Run {html.escape(run.name)}</h1><p>{html.escape(about)}</p>{"".join(f"<p>note: {html.escape(n)}</p>" for n in notes)}
<h2>metrics</h2>{summary}{per_class}
<h2>settings</h2>{settings}{images}</body></html>
"""
    out = run / "report.html"
    write_atomic(out, lambda tmp: tmp.write_text(page))
    return out
