"""A run's features for images a user names: read from the run's store when the bytes are there,
computed through the pipeline's reader otherwise, and (if asked) added to the store.

The run records the store it was fitted from and the feature space (provenance) its head was
trained on. Rows are looked up in that space by the SHA-256 of the bytes the user passes, so a
cached row is exactly what ``fit`` trained and measured on. A row is only ever *added* to the
space when the backbone rebuilt here has the space's provenance, under a lease (like extract),
as committed segments; never a set. A store that is missing or unreadable is not an error:
everything is computed, and a note says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backbones import Backbone, check_user_backbone, rebuild_backbone
from .compute import Writers, first_line, run_local, storage_errors
from .data import DECODE_RECIPE
from .errors import BackboneMismatch, RunError, StoreError, WeightsError
from .keys import space_key
from .pooling import prepare_features
from .runs import RunRecord, run_store
from .store import Store, open_store
from .stream import RowReader

__all__ = ["RowCounts", "load_run", "run_rows", "space_differences"]

_READ_BYTES = 64 << 20  # cached rows are read (as float32) this many bytes at a time
_CHECKPOINT_S = 30.0


@dataclass(frozen=True)
class _Image:
    path: str
    sha256: str


@dataclass
class RowCounts:
    """Where the rows came from: ``from_store`` + ``computed`` + ``len(failed)`` images; ``stored`` rows added."""

    from_store: int = 0
    computed: int = 0
    stored: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        """``computed 0, from the store 153`` (+ how many were added to the store)."""
        added = f" (added {self.stored} rows to the store)" if self.stored else ""
        return f"computed {self.computed}{added}, from the store {self.from_store}"


def load_run(run: str | Path, backbone: str | None = None, weights: str | None = None, store: str | None = None,
             recompute: bool = False) -> tuple[Backbone, RunRecord]:
    """The run's record and the backbone its features came from, rebuilt and checked against the run.

    ``backbone``/``weights``: the user's --backbone/--weights, needed when the run's features came
    from a ``module:factory`` network or a weights file (never imported or read because a run names them).
    ``store``: where the run's store is now (default: the one the run records, see :func:`run_store`);
    ``recompute``: use no store at all, every image is computed (the record's ``store`` is then empty)."""
    check_user_backbone(backbone, weights)
    if store is not None and recompute:
        raise ValueError("store and recompute exclude each other: a store is read, or every image is computed")
    record = RunRecord.read(run)
    record = dataclasses.replace(record, store="" if recompute else run_store(record, run, store))
    cfg = record.extract_config
    if cfg is None:
        raise RunError(f"{run} does not record how its features were extracted; re-run featcache fit")
    net = rebuild_backbone(cfg, str(record.backbone), given=backbone, weights=weights)
    if net.weights_sha256 != record.weights["sha256"]:
        raise WeightsError(
            f"the weights {net.weights_id} resolve to other values than those the run was trained on "
            f"({record.weights['id']}); pass the same weights file"
        )
    if tuple(net.shape) != record.feature_shape:
        raise RunError(f"{run}: the backbone gives features of shape {list(net.shape)} but the run was trained on "
                       f"{list(record.feature_shape)}; the run directory is damaged, re-run featcache fit")
    differ, _ = space_differences(record, net)
    if differ:
        field, ran, here = differ[0]
        more = f" (and {len(differ) - 1} more: {', '.join(d[0] for d in differ[1:4])})" if len(differ) > 1 else ""
        raise BackboneMismatch(
            f"the backbone rebuilt here computes other features than {run} was trained on: {field} is {_short(here)} "
            f"here but {_short(ran)} in the run{more}. {_fix(field, ran)}"
        )
    return net, record


def _here(record: RunRecord, net: Backbone) -> dict:
    """The provenance of the space the rebuilt backbone computes, under the run's precision and dtype (as JSON)."""
    prov = record.space_provenance
    here = {**net.provenance(), "decode": DECODE_RECIPE, "precision": prov.get("precision"), "dtype": prov.get("dtype")}
    return json.loads(json.dumps(here))


def _walk(ran: Any, here: Any, path: str, differ: list, unrecorded: list) -> None:
    for key in sorted(set(ran) | set(here)):
        name = f"{path}{key}"
        if key not in ran:
            unrecorded.append(name)
        elif key not in here:
            differ.append((name, ran[key], None))
        elif isinstance(ran[key], dict) and isinstance(here[key], dict):
            _walk(ran[key], here[key], name + ".", differ, unrecorded)
        elif ran[key] != here[key]:
            differ.append((name, ran[key], here[key]))


def space_differences(record: RunRecord, net: Backbone) -> tuple[list[tuple[str, Any, Any]], list[str]]:
    """(each field of the rebuilt backbone's feature space that differs from the run's, as (field, run's value,
    value here); the notes on what the run does not record and so could not be compared).

    Everything that makes the space key is compared: name, layer, weights digest, preprocessing as applied,
    pool, shape, decode recipe, and for a Hugging Face model its effective config, attention implementation,
    processor backend and transformers version. Not compared: the weights' label (a weights file named
    otherwise, a hub model and the same model from a folder: the digest decides), and a Hugging Face model's
    name (a folder named by another path: its config, digest and preprocessing decide).
    """
    ran, here = record.space_provenance, _here(record, net)
    differ: list[tuple[str, Any, Any]] = []
    unrecorded: list[str] = []
    _walk(ran, here, "", differ, unrecorded)
    hf = str(ran.get("backbone", "")).startswith("hf:") and net.name.startswith("hf:")
    differ = [d for d in differ if d[0] != "weights.id" and not (hf and d[0] == "backbone")]
    notes = []
    if ran.get("precision") == "unrecorded":  # migrated from format 1, decoded by its recipe
        if any(d[0].startswith("decode.") for d in differ):
            notes.append("the run's features were decoded by featcache format 1 (no EXIF orientation); images "
                         "computed here are decoded as today, so rotated photos may get other features than it "
                         "was trained on")
        differ = [d for d in differ if not d[0].startswith("decode.")]
    if unrecorded:
        notes.append(f"the run does not record {', '.join(unrecorded)} of its feature space (an older featcache); "
                     "they are not checked against the backbone rebuilt here")
    return differ, notes


def _short(value: Any) -> str:
    text = "absent" if value is None else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fix(field: str, ran: Any) -> str:
    if field == "network.version":
        return (f"Install the transformers the run used (pip install transformers=={ran}), or extract the images "
                "again with this one and fit a new run.")
    return ("Pass the backbone the run was extracted with (the same code, config and preprocessing), or extract "
            "the images again with this one and fit a new run.")


def _open(record: RunRecord, net: Backbone, write: bool, notes: list[str]) -> tuple[Store | None, bool]:
    """The run's store (None with ``recompute``, when the record names none) and whether computed rows may be
    added to it. A store that cannot be opened is an error: every row computed again is not what a user asked."""
    if not record.store:
        return None, False
    try:
        store = open_store(record.store, mode="r+" if write else "r")
    except StoreError as e:
        raise StoreError(f"the run's store {record.store} cannot be opened ({first_line(e)}). Pass --store with "
                         "where it is now, or --recompute to compute every image's features without a store") from None
    differ, unchecked = space_differences(record, net)
    if write and space_key(_here(record, net)) != space_key(record.space_provenance) and (differ or unchecked):
        # when nothing is listed only labels differ (a weights file or a model folder named otherwise), so the
        # rows are the run's space's rows; a field the run does not record leaves that open: nothing is added
        notes.append("the backbone rebuilt here cannot be shown to compute the run's feature space exactly (see "
                     "the note above); computed rows are not added to the store")
        write = False
    return store, write


def run_rows(record: RunRecord, net: Backbone, root: Path, items: Sequence, on_rows: Callable[[np.ndarray, np.ndarray], None],
             *, write: bool = False, pool: str = "none", keep_shape: bool = True, device: str = "auto",
             batch_size: int = 64, workers: int | None = None, progress: bool = False, desc: str = "compute") -> RowCounts:
    """Feed ``on_rows(positions, features)`` the run's features of ``items`` (``.path`` under ``root``, ``.sha256``).

    Features are float32, as ``fit`` prepared them (``pool``ed and flattened, or as stored with
    ``keep_shape``), from rows in the stored dtype. Cached rows come first, in chunks; the rest
    are computed in batches under the run's recorded precision. Images that cannot be read end
    in ``failed``; with ``write``, computed rows are committed to the run's store.
    """
    counts = RowCounts(notes=space_differences(record, net)[1])
    prov = record.space_provenance
    space, dtype, precision = space_key(prov), str(prov["dtype"]), str(prov.get("precision", "float32"))
    if precision == "unrecorded":  # rows migrated from format 1: how they were computed is not known
        counts.notes.append("the run's rows were migrated from store format 1, which did not record the compute "
                            "precision; images not in the store are computed in float32 and not added to it")
        precision, write = "float32", False
    store, write = _open(record, net, write, counts.notes)
    with contextlib.ExitStack() as stack:
        if write:
            try:  # gc leaves the space alone from before the lookup until the new rows are committed
                if not stack.enter_context(store.lease([space])).held:  # a store this process may only read
                    raise OSError(f"read-only: {store.read_only}")
                store.ensure_space(prov)
            except (OSError, ValueError) as e:  # a read-only place, a full disk ...
                counts.notes.append(f"cannot write to the store {record.store} ({first_line(e)}); computed rows "
                                    "are not added to it")
                write = False
        held = np.zeros(len(items), dtype=bool)
        if store is not None:
            try:  # one sorted search over the space's row index for all the images
                held = store.holds(space, [it.sha256 for it in items])
            except StoreError as e:
                counts.notes.append(f"the run's store {record.store} cannot be read ({first_line(e)}); every "
                                    "image is computed")
        cached = np.flatnonzero(held).tolist()
        rest = np.flatnonzero(~held).tolist()
        rest += _read_cached(store, space, record.feature_shape, items, cached, on_rows, pool, keep_shape, counts)
        if rest:
            _compute(net, root, items, rest, on_rows, store if write else None, space, dtype, pool, keep_shape, counts,
                     device=device, precision=precision, batch_size=batch_size, workers=workers, progress=progress,
                     desc=desc)
    return counts


def _read_cached(store: Store | None, space: str, shape: tuple[int, ...], items: Sequence, cached: list[int],
                 on_rows, pool: str, keep_shape: bool, counts: RowCounts) -> list[int]:
    """Serve ``cached`` from the store a chunk at a time; returns those that must be computed after all."""
    if not cached:
        return []
    row_bytes = int(np.prod(shape)) * 4
    step = max(1, _READ_BYTES // row_bytes)
    for start in range(0, len(cached), step):
        part = cached[start : start + step]
        try:
            feats = RowReader(store, space, [items[i].sha256 for i in part], shape, pool, keep_shape).load()
        except StoreError as e:  # removed by gc since the lookup, or damaged: compute them instead
            counts.notes.append(f"cached rows could not be read ({first_line(e)}); they are computed instead")
            return cached[start:]
        on_rows(np.asarray(part), feats)
        counts.from_store += len(part)
    return []


def _compute(net: Backbone, root: Path, items: Sequence, todo: list[int], on_rows, store: Store | None, space: str,
             dtype: str, pool: str, keep_shape: bool, counts: RowCounts, **run) -> None:
    """Push each distinct image of ``todo`` through the backbone once (:func:`featcache.compute.run_local`);
    hand its rows to every item with its bytes, and add them to ``store`` when one is given."""
    same: dict[str, list[int]] = {}
    for i in todo:
        same.setdefault(items[i].sha256, []).append(i)
    unique = [_Image(items[group[0]].path, h) for h, group in same.items()]

    def computed(good: list[int], rows: np.ndarray) -> None:
        feats = rows.astype(np.float32) if keep_shape else prepare_features(rows, pool)
        where = [(k, i) for k, j in enumerate(good) for i in same[unique[j].sha256]]
        if where:
            on_rows(np.array([i for _, i in where]), feats[[k for k, _ in where]])
            counts.computed += len(where)

    fix = "pass --no-store to evaluate without adding rows"
    with storage_errors(store.url if store else "the store", optional=fix):
        with Writers(store, [space], [len(unique)], [net.shape], dtype, _CHECKPOINT_S) as writers:
            failed = run_local(net, root, unique, [u.sha256 for u in unique], writers, [set()], dtype=dtype,
                               skip_bad_rows=True, on_rows=computed, **run)
        counts.stored = writers.committed_rows
    for j, reason in failed.items():
        for i in same[unique[j].sha256]:
            counts.failed[i] = reason
