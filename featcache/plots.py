"""The pictures of a run, drawn with matplotlib as PNG bytes (the report embeds them; ``fit`` also
writes them into the run directory for those who want the files).

Text from a run (class names, file names) is drawn as plain text: ``$`` never starts mathtext.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .errors import FeatcacheError

__all__ = ["have_matplotlib", "pyplot", "curves", "confusion", "per_class", "misclassified", "point_labels"]

MAX_MISSES = 16
MAX_BARS = 40  # the per-class plot shows at most this many classes (the worst ones)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def pyplot():
    """matplotlib's pyplot on the Agg backend, text never typeset (no TeX, no mathtext from ``$``)."""
    if not have_matplotlib():
        raise FeatcacheError("plots need matplotlib: pip install 'featcache[plots]'")
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.usetex"] = False
    import matplotlib.pyplot as plt

    return plt


def _plain(text) -> str:
    """``text`` as matplotlib draws it literally: a ``$`` pair would start mathtext (and can fail to parse)."""
    return str(text).replace("$", r"\$")


def _png(plt, fig, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    plt.close(fig)
    return buf.getvalue()


def curves(plt, history: list[dict], best_epoch: int | None = None) -> bytes | None:
    """Loss and accuracy per epoch, the kept epoch marked; None for heads without epochs."""
    if not history:
        return None
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
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
    for ax in (ax1, ax2):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
    return _png(plt, fig)


def normalised(cm) -> np.ndarray:
    """Each row of a confusion matrix divided by its sum (the class's support): rows sum to 1, a class
    without images is a row of NaN."""
    cm = np.asarray(cm, dtype=float)
    support = cm.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, cm / np.where(support > 0, support, 1), np.nan)


def confusion(plt, cm, classes: list[str], split: str) -> bytes:
    """The confusion matrix normalised by row (the share of each true class predicted as each class),
    the counts written in the cells (up to 30 classes)."""
    counts = np.asarray(cm)
    share = normalised(counts)
    c = len(classes)
    size = max(4.5, 0.5 * c + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size), layout="constrained")
    image = ax.imshow(np.nan_to_num(share), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    names = [_plain(n) for n in classes]
    ax.set(xticks=range(c), yticks=range(c), xlabel="predicted", ylabel="true",
           title=f"confusion matrix ({split}), rows sum to 1")
    ax.set_xticklabels(names, rotation=45 if c > 3 else 0, ha="right" if c > 3 else "center")
    ax.set_yticklabels(names)
    if c <= 30:
        font = 12 if c <= 5 else (9 if c <= 12 else 6)
        for i in range(c):
            for j in range(c):
                if np.isnan(share[i, j]) or (counts[i, j] == 0 and i != j):  # empty cells stay blank
                    continue
                text = f"{share[i, j]:.2f}\n({counts[i, j]})" if c <= 12 else f"{counts[i, j]}"
                ax.text(j, i, text, ha="center", va="center", fontsize=font,
                        color="white" if share[i, j] > 0.5 else "black")
    return _png(plt, fig)


def per_class(plt, classes: list[str], f1: list, support: list[int], split: str, what: str = "F1") -> bytes:
    """One bar per class, its ``what`` score (F1, or recall for runs that recorded no F1), worst first,
    each labelled with its score and its number of images (support); classes without images are left
    out. Categories on one axis, scores 0 to 1 on the other: never an axis of image counts."""
    rows = [(s, n, name) for name, s, n in zip(classes, f1, support) if n and s is not None and not np.isnan(s)]
    rows.sort(key=lambda r: (r[0], r[2]))
    shown = rows[:MAX_BARS]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.3 * max(len(shown), 2)), layout="constrained")
    ys = np.arange(len(shown))[::-1]  # the worst class on top
    ax.barh(ys, [r[0] for r in shown], color="#4c72b0")
    for y, (s, n, _) in zip(ys, shown):
        ax.text(min(s, 1.0) + 0.01, y, f"{s:.2f}  (n={n})", va="center", fontsize=8)
    ax.set_yticks(ys, [_plain(r[2]) for r in shown], fontsize=8 if len(shown) > 12 else 10)
    ax.set_xlim(0, 1.25)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    more = f", the {len(shown)} lowest of {len(rows)}" if len(rows) > len(shown) else ""
    ax.set(xlabel=f"{split} {what}", title=f"per-class {what} ({split}), worst first{more}; n = images of the class")
    return _png(plt, fig)


def point_labels(names: list, xs: list, ys: list) -> dict[tuple, str]:
    """One label per plotted point: classes on the same point share it ("1, 4"), never drawn over each
    other; a class without a value (NaN) has no point and no label."""
    at: dict[tuple, list[str]] = {}
    for c, x, y in zip(names, xs, ys):
        if not np.isnan(y):
            at.setdefault((x, round(float(y), 6)), []).append(str(c))
    return {xy: ", ".join(cs) for xy, cs in at.items()}


def _thumbnail(path: Path):
    """The image at ``path`` decoded at reduced size (JPEG decodes at 1/2 to 1/8 scale), upright RGB."""
    from PIL import Image, ImageOps

    from .data.images import check_size, open_regular

    with open_regular(path) as f, Image.open(f) as img:
        check_size(*img.size)
        img.draft("RGB", (256, 256))
        img = ImageOps.exif_transpose(img).convert("RGB")
    img.thumbnail((256, 256))
    if max(img.size) < 256:  # a small image (digits, icons) fills the tile, its pixels kept sharp
        scale = 256 / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.NEAREST)
    return img


def _font(size: int):
    """matplotlib's own DejaVu Sans (it covers most scripts) at ``size`` pixels; Pillow's default without it."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def misclassified(root: Path, paths: list[str], y: np.ndarray, pred: np.ndarray, classes: list[str],
                  split: str, confidence: np.ndarray | None = None) -> bytes | None:
    """A grid of the split's misclassified images (the surest mistakes first), each with its file name,
    true and predicted class; None when there is none or ``root`` is no folder. Images are read only
    under ``root``. Pillow lays the tiles out (matplotlib takes seconds to resample 16 photos)."""
    from PIL import Image, ImageDraw

    from .data import safe_join

    wrong = np.flatnonzero(pred != y)
    total = len(wrong)
    if confidence is not None:  # the surest mistakes first: those say most about the data or the labels
        wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]
    wrong = wrong[:MAX_MISSES]
    if not len(wrong) or not root.is_dir():
        return None
    tile, caption, pad, top = 256, 54, 10, 34
    cols = min(4, len(wrong))
    rows = -(-len(wrong) // cols)
    sheet = Image.new("RGB", (cols * (tile + pad) + pad, top + rows * (tile + caption + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    small, large = _font(13), _font(17)
    order = ", most confident first" if confidence is not None else ""
    draw.text((pad, 8), f"misclassified {split} images: {len(wrong)} of {total}{order}", fill="black", font=large)
    for k, i in enumerate(wrong):
        x, y0 = pad + (k % cols) * (tile + pad), top + (k // cols) * (tile + caption + pad)
        try:
            img = _thumbnail(safe_join(root, paths[i]))
            sheet.paste(img, (x + (tile - img.width) // 2, y0 + tile - img.height))  # on its caption
        except Exception:  # a file moved or unreadable since extraction: leave the tile empty
            draw.rectangle((x, y0, x + tile - 1, y0 + tile - 1), outline="#bbb")
        sure = f" ({confidence[i]:.0%})" if confidence is not None else ""
        name = Path(paths[i]).name
        name = name if len(name) <= 34 else name[:15] + "…" + name[-15:]
        lines = [name, f"true {classes[y[i]]}"[:40], f"predicted {classes[pred[i]]}"[:34] + sure]
        for j, line in enumerate(lines):
            draw.text((x, y0 + tile + 2 + 17 * j), line, fill="#b00" if j == 2 else "black", font=small)
    buf = io.BytesIO()
    sheet.save(buf, format="png", compress_level=3)
    return buf.getvalue()


def sweep_scores(plt, xs: list, series: dict[str, list], param: str, best: int | None) -> bytes:
    """Val (and test) top-1 of a sweep's runs against the swept parameter; ``best`` (an index) ringed."""
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    pos = np.asarray(xs, dtype=float) if numeric else np.arange(len(xs), dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.4), layout="constrained")
    for (label, ys), marker in zip(series.items(), ("o", "s")):
        v = np.asarray([np.nan if y is None else y for y in ys], dtype=float)
        order = np.argsort(pos, kind="stable")
        line = "-" if len(set(xs)) == len(xs) else "none"  # runs on the same value (other heads) stay points
        ax.plot(pos[order], v[order], marker=marker, linestyle=line, label=label)
    if best is not None and series:
        first = next(iter(series.values()))[best]
        if first is not None:
            ax.plot([pos[best]], [first], "o", markersize=14, markerfacecolor="none", color="crimson", label="best")
    if numeric and len(set(xs)) > 2 and min(xs) > 0 and max(xs) / min(xs) >= 50:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(pos, [_plain(x) for x in xs], rotation=30 if len(xs) > 4 else 0, fontsize=8)
    ax.set(xlabel=_plain(param), ylabel="top-1", title=f"top-1 against {_plain(param)}")
    ax.legend()
    return _png(plt, fig)
