"""``featcache runs``: one row per run directory under a folder (a sweep's runs included), each read
and checked through :meth:`RunRecord.read`, the damaged ones named and skipped.

Listing imports neither torch, scikit-learn nor NumPy, and checks as much as loading a run does:
a saved head is checked against its row of the head table (``heads.table``), its arrays and the
confusion tables as stored (``featcache.npy``: every header, size and number).
"""

from __future__ import annotations

from pathlib import Path

from .choices import RUN_SORTS
from .errors import RunError
from .heads import KINDS
from .runs import RunRecord

__all__ = ["SORTS", "list_runs", "format_runs"]

_RUN_MARKERS = ("config.json", "metrics.json", "head.json")
SORTS = RUN_SORTS


def _run_dirs(root: Path, depth: int = 3) -> list[Path]:
    """Folders under ``root`` (itself included) that hold a run's files; a sweep's runs one level down."""
    found, stack = [], [(root, 0)]
    while stack:
        folder, d = stack.pop()
        try:
            names = {p.name for p in folder.iterdir()}
        except OSError:
            continue
        if names & set(_RUN_MARKERS):
            found.append(folder)
            continue
        if d < depth:
            stack += [(folder / n, d + 1) for n in sorted(names, reverse=True)
                      if not n.startswith(".") and (folder / n).is_dir() and not (folder / n).is_symlink()]
    return sorted(found)


def _key_params(record: RunRecord) -> str:
    params = record.head.params
    shown = []
    for name in KINDS[record.head.kind].key_params:  # a checked record names a kind of the table
        value = record.C if name == "C" and record.C is not None else params.get(name)
        shown.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
    return " ".join(shown)


def list_runs(root: str | Path = "runs", set_key: str | None = None,
              sort: str = "time") -> tuple[list[dict], list[tuple[str, str]]]:
    """One row per run directory under ``root`` (time, head, set, key parameters, best epoch,
    val/test top-1), and the (folder, reason) of each damaged one skipped. Runs are read only
    through :meth:`RunRecord.read`; ``set_key`` keeps runs whose set starts with it."""
    if sort not in SORTS:
        raise ValueError(f"sort must be one of {', '.join(SORTS)}; got {sort!r}")
    root = Path(root)
    rows, skipped = [], []
    for folder in _run_dirs(root):
        name = str(folder.relative_to(root)) if folder != root else folder.name
        try:
            record = RunRecord.read(folder)
        except RunError as e:
            skipped.append((name, str(e)))
            continue
        if set_key and not record.set.startswith(set_key):
            continue
        metrics = record.metrics
        rows.append({
            "time": record.created_at, "run": name, "head": record.config.head, "set": record.set,
            "params": _key_params(record), "best_epoch": record.best_epoch,
            "val_top1": metrics["val"]["top1"] if "val" in metrics else None,
            "test_top1": metrics["test"]["top1"] if "test" in metrics else None,
        })
    score = {"val": "val_top1", "test": "test_top1"}.get(sort)
    if score:
        rows.sort(key=lambda r: (r[score] is None, -(r[score] or 0.0), r["run"]))
    else:
        rows.sort(key=lambda r: (r[sort], r["run"]))
    return rows, skipped


def format_runs(rows: list[dict]) -> str:
    """``list_runs`` rows as an aligned text table."""
    columns = [("time", "time"), ("run", "run"), ("head", "head"), ("set", "set"), ("params", "params"),
               ("best_epoch", "best epoch"), ("val_top1", "val top-1"), ("test_top1", "test top-1")]

    def cell(key, v):
        if v is None:
            return "-"
        if key == "set":
            return v[:12]
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[cell(k, r[k]) for k, _ in columns] for r in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title) in enumerate(columns)]
    lines = ["  ".join(t.ljust(w) for (_, t), w in zip(columns, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)
