"""Classification metrics of a head's probabilities: scikit-learn's own, in one JSON-ready dict."""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["compute_metrics"]


def compute_metrics(proba: np.ndarray, y: np.ndarray, classes: list[str], calibrated: bool = True) -> dict:
    """Top-1, top-5 (5+ classes), log loss (calibrated heads), balanced accuracy, precision, recall, F1
    and support (per class, macro and weighted: scikit-learn's own), per-class accuracy, confusion matrix.

    ``per_class`` holds lists in class order (None where a class has no image or no prediction); the
    averages run over the classes present in ``y`` or predicted, as scikit-learn's do."""
    from sklearn.metrics import (
        balanced_accuracy_score,
        classification_report,
        confusion_matrix,
        log_loss,
        precision_recall_fscore_support,
    )

    c = len(classes)
    pred = proba.argmax(1)
    out: dict = {"n": len(y), "top1": float((pred == y).mean()) if len(y) else float("nan")}
    if c >= 5:
        top5 = np.argsort(-proba, axis=1)[:, :5]
        out["top5"] = float((top5 == y[:, None]).any(1).mean())
    out["log_loss"] = float(log_loss(y, np.clip(proba, 1e-7, 1), labels=list(range(c)))) if calibrated else None
    if len(y):
        with warnings.catch_warnings():  # "y_pred contains classes not in y_true": the averages say which they cover
            warnings.simplefilter("ignore", UserWarning)
            out["balanced_accuracy"] = float(balanced_accuracy_score(y, pred))
            report = classification_report(y, pred, output_dict=True, zero_division=0)
            p, r, f, support = precision_recall_fscore_support(y, pred, labels=list(range(c)), zero_division=np.nan)
        for avg in ("macro", "weighted"):
            row = report[f"{avg} avg"]
            out[avg] = {"precision": float(row["precision"]), "recall": float(row["recall"]),
                        "f1": float(row["f1-score"])}
        shown = lambda a: [None if np.isnan(v) else float(v) for v in a]
        out["per_class"] = {"precision": shown(p), "recall": shown(r), "f1": shown(f),
                            "support": [int(v) for v in support]}
    else:
        out["balanced_accuracy"] = float("nan")
    cm = confusion_matrix(y, pred, labels=list(range(c)))
    support = cm.sum(1)
    out["per_class_accuracy"] = {
        name: (float(cm[i, i] / support[i]) if support[i] else None) for i, name in enumerate(classes)
    }
    out["confusion_matrix"] = cm.tolist()
    return out
