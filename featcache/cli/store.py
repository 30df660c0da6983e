"""Store commands of the command line: ls, info, rm, gc, verify, status, compact, migrate.

Each parses options, calls one library function and prints its result as text or, with
``--json``, as one JSON document on standard output. None of them imports torch.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import click

from .kit import Floats, Ints, echo_json, json_option, pick_set, set_option, store_option

__all__ = ["ls_cmd", "info_cmd", "rm_cmd", "gc_cmd", "verify_cmd", "status_cmd", "compact_cmd", "migrate_cmd", "set_table"]

_MAX_SHOWN = 20
# ls columns: (header, right-aligned, width cap in the default 100-column table)
_COLUMNS = [("set", False, 12), ("data", False, 10), ("classes", True, 7), ("train/val/test", True, 14),
            ("backbone/layer", False, 17), ("dtype", False, 5), ("size", True, 8), ("age", True, 4), ("by", False, 6)]
_SHORT_DTYPES = {"float16": "f16", "float32": "f32"}
_WIDE = [("pool", False, 0), ("shape", False, 0), ("weights", False, 0), ("created", False, 0)]


def _age(iso: str, now: datetime) -> str:
    try:
        seconds = (now - datetime.fromisoformat(iso)).total_seconds()
    except (TypeError, ValueError):
        return "?"
    for unit, size in (("y", 365 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(int(seconds), 0)}s"


def _row(fs, size: str, now: datetime) -> dict[str, str]:
    r = fs.record
    counts = "/".join(str(r.splits.get(s, 0)) for s in ("train", "val", "test"))
    return {"set": fs.key, "data": r.data_root.rstrip("/").rsplit("/", 1)[-1] or r.data_root, "classes": str(len(r.classes)),
            "train/val/test": counts, "backbone/layer": f"{r.backbone}/{r.layer}", "dtype": r.dtype, "size": size,
            "age": _age(r.created_at, now), "by": r.created_by.split("@")[0], "pool": r.pool,
            "shape": "x".join(map(str, fs.shape)), "weights": r.weights_id, "created": r.created_at}


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def set_table(rows: list[dict[str, str]], wide: bool = False) -> list[str]:
    """Aligned lines: a header, then one line per set; capped to fit 100 columns unless ``wide``."""
    columns = _COLUMNS + (_WIDE if wide else [])
    short = [{**r, "dtype": _SHORT_DTYPES.get(r["dtype"], r["dtype"])} for r in rows]
    cells = [[r[h] for h, _, _ in columns] for r in rows] if wide else [[_fit(r[h], cap) for h, _, cap in columns] for r in short]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _, _) in enumerate(columns)]
    lines = []
    for values in [[h for h, _, _ in columns]] + cells:
        parts = [v.rjust(w) if right else v.ljust(w) for v, w, (_, right, _) in zip(values, widths, columns)]
        lines.append("  ".join(parts).rstrip())
    return lines


def _set_doc(fs, size: int | None) -> dict:
    r = fs.record
    return {"set": fs.key, "data_root": r.data_root, "classes": list(r.classes), "splits": dict(r.splits),
            "backbone": r.backbone, "layer": r.layer, "pool": r.pool, "dtype": r.dtype, "shape": list(fs.shape),
            "weights": r.weights_id, "bytes": size, "created_at": r.created_at, "created_by": r.created_by}


_SIZES_HELP = ("Measure sizes now, from the sets' rows (reads their spaces' row indexes: slow on a large store), "
               "instead of the size recorded when each set was committed (unknown for sets made before sizes were recorded).")


def _unknown_note(count: int, command: str) -> str:
    return (f"{count} set(s) committed before featcache recorded set sizes: size unknown; measure it with "
            f"featcache {command} --sizes (reads their spaces' rows)")


@click.command("ls")
@store_option
@click.option("--wide", is_flag=True, help="Every column, nothing shortened (pool, shape, weights, creation time).")
@click.option("--sizes", "measure", is_flag=True, help=_SIZES_HELP)
@json_option
def ls_cmd(store: str, wide: bool, measure: bool, as_json: bool) -> None:
    """List the feature sets in a store, oldest first.

    Reads the sets' records only: each size is the one measured when the set was committed (--sizes: now)."""
    from ..errors import StoreError
    from ..store import open_store
    from ..units import human_bytes

    st = open_store(store, mode="r")
    sets = st.sets()
    sizes: dict[str, int | None] = {}
    for fs in sets:
        try:
            sizes[fs.key] = st.set_size(fs, measure)
        except StoreError:  # only when measuring: the set's arrays cannot be read
            sizes[fs.key] = None
    unknown = 0 if measure else sum(size is None for size in sizes.values())
    notes = [_unknown_note(unknown, "ls")] if unknown else []
    for warning in st.warnings:
        click.echo(f"warning: {warning}", err=True)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    if as_json:
        echo_json({"store": store, "sets": [_set_doc(fs, sizes[fs.key]) for fs in sets], "warnings": list(st.warnings),
                   "notes": notes})
        return
    if not sets:
        click.echo(f"no feature sets in {store}")
        return
    now = datetime.now(UTC)

    def shown(size: int | None) -> str:
        return human_bytes(size) if size is not None else "damaged" if measure else "?"

    rows = [_row(fs, shown(sizes[fs.key]), now) for fs in sets]
    for line in set_table(rows, wide):
        click.echo(line)


@click.command("info")
@click.argument("key", required=False)
@set_option()
@store_option
@click.option("--sizes", "measure", is_flag=True, help=_SIZES_HELP)
@json_option
def info_cmd(key: str | None, set_: str | None, store: str, measure: bool, as_json: bool) -> None:
    """Everything recorded about a set, as JSON (KEY is the same as --set KEY)."""
    from ..store import open_store

    st = open_store(store, mode="r")
    fs = st.get_set(pick_set(key, set_))
    size = st.set_size(fs, measure)
    if size is None:
        click.echo(f"note: {_unknown_note(1, 'info')}", err=True)
    echo_json({**fs.attrs, "bytes_on_disk": size})


@click.command("rm")
@click.argument("key", required=False)
@set_option("none: name the set to remove")
@store_option
def rm_cmd(key: str | None, set_: str | None, store: str) -> None:
    """Remove a set (its rows are freed by gc once no other set uses them); KEY is the same as --set KEY."""
    from ..store import open_store

    chosen = pick_set(key, set_)
    if chosen is None:
        raise click.UsageError("name the set to remove: featcache rm --set KEY (see: featcache ls)")
    fs = open_store(store, mode="r+").remove_set(chosen)
    click.echo(f"removed set {fs.key}; run featcache gc to free rows no other set uses")


@click.command("gc")
@store_option
@click.option("--grace", default=3600.0, show_default=True, type=Floats(0, 10**9),
              help="Leave anything younger than this many seconds (a running extract may own it).")
@click.option("--dry-run", is_flag=True, help="Report only.")
@json_option
def gc_cmd(store: str, grace: float, dry_run: bool, as_json: bool) -> None:
    """Remove uncommitted leftovers and rows no set refers to."""
    from ..store import open_store
    from ..store.maintenance import gc
    from ..units import human_bytes

    st = open_store(store, mode="r+")
    r = gc(st, grace_s=grace, dry_run=dry_run)
    for warning in st.warnings:
        click.echo(f"warning: {warning}", err=True)
    for note in r.notes:
        click.echo(f"note: {note}", err=True)
    if r.spaces_leased:
        click.echo(f"note: {r.spaces_leased} space(s) left alone: a running extract holds a lease on them", err=True)
    if as_json:
        echo_json({**r.to_dict(), "dry_run": dry_run, "warnings": list(st.warnings)})
        return
    verb = "would free" if dry_run else "freed"
    click.echo(
        f"gc: {verb} {human_bytes(r.bytes_freed)}; segments removed {r.segments_removed}, rewritten "
        f"{r.segments_rewritten}, rows removed {r.rows_removed}, unfinished sets removed {r.sets_removed}"
    )


@click.command("verify")
@click.argument("key", required=False)
@set_option()
@store_option
@click.option("--sample", default=8, show_default=True, type=Ints(0, 10**9), help="Rows to recompute from the images.")
@click.option("--data", default=None, type=click.Path(file_okay=False),
              help="The image folder the set was made from; rows are recomputed only from a folder you name.")
@click.option("--backbone", default=None, help="The package.module:factory the set was extracted with, if any.")
@click.option("--weights", default=None, help="The weights file the set was extracted with, if any.")
@json_option
def verify_cmd(key: str | None, set_: str | None, store: str, sample: int, data: str | None, backbone: str | None,
               weights: str | None, as_json: bool) -> None:
    """Check every chunk of a set against its integrity record; recompute a sample from the images in --data."""
    from ..audit import verify
    from ..store import open_store

    st = open_store(store, mode="r")
    report = verify(st, pick_set(key, set_), sample=sample, data=data, backbone=backbone, weights=weights)
    for warning in st.warnings:
        click.echo(f"warning: {warning}", err=True)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    for error in report.errors:
        click.echo(f"problem: {error}", err=True)
    if as_json:
        doc = dataclasses.asdict(report)
        echo_json({"set": doc.pop("set_key"), **doc, "ok": report.ok, "warnings": list(st.warnings)})
    else:
        click.echo(report.summary())
    if not report.ok:
        raise SystemExit(1)


@click.command("status")
@set_option()
@click.option("--data", default=None, type=click.Path(file_okay=False),
              help="The image folder to compare (required: featcache walks no folder a store names).")
@store_option
@json_option
def status_cmd(set_: str | None, data: str | None, store: str, as_json: bool) -> None:
    """Tell whether an image folder and its stored set agree."""
    from ..audit import status
    from ..store import open_store

    st = status(open_store(store, mode="r"), set_, data)
    if as_json:
        doc = dataclasses.asdict(st)
        echo_json({"set": doc.pop("set_key"), **doc, "up_to_date": st.up_to_date})
        return
    for label, paths in (("added", st.added), ("removed", st.removed), ("changed", st.changed), ("moved", st.moved),
                         ("will skip", st.skipped)):
        for p in paths[:_MAX_SHOWN]:
            click.echo(f"{label} {p}")
    click.echo(st.summary())


@click.command("compact")
@set_option("every space")
@store_option
@json_option
def compact_cmd(set_: str | None, store: str, as_json: bool) -> None:
    """Rewrite each feature space's segments into one (readers never see a partial state)."""
    from ..store import open_store
    from ..store.maintenance import compact

    r = compact(open_store(store, mode="r+"), set_)
    if as_json:
        echo_json(r.to_dict())
        return
    click.echo(f"compact: {r.segments} segments of {r.spaces} space(s) rewritten into {r.spaces} "
               f"({r.rows} rows copied); run featcache gc to free the old files")


@click.command("migrate")
@store_option
@click.option("--drop-damaged", is_flag=True,
              help="Migrate a damaged store: leave out its damaged segments and sets (their rows count as missing).")
@json_option
def migrate_cmd(store: str, drop_damaged: bool, as_json: bool) -> None:
    """Convert a store of an older format to the current one (features are copied, not recomputed)."""
    from ..store.migrate import migrate

    report = migrate(store, drop_damaged=drop_damaged)
    if as_json:
        echo_json(dataclasses.asdict(report))
        return
    click.echo(report.summary())
