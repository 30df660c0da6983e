"""Auditing a set against the world outside the store: ``status`` compares an image folder with the
view stored for it, ``verify`` checks every chunk a set draws on and recomputes a sample of rows
from the images.

Both need what the store must not import: the folder scanner (:mod:`featcache.data`) and the
backbones (:mod:`featcache.backbones`, which may load a network's weights). So they sit here, above
the store, and read it only through its public API; ``gc`` and ``compact`` stay in
:mod:`featcache.store.maintenance`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import safe_join, scan
from .errors import DataError, StoreError
from .store import FeatureSet, Store

__all__ = ["Status", "VerifyReport", "TOLERANCE", "status", "verify"]


@dataclass
class Status:
    """How an image folder compares with the view stored for it."""

    set_key: str
    data: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)  # "path (val -> train)": the same file in another split now
    skipped: list[str] = field(default_factory=list)  # "path: reason": files extract would newly skip
    to_extract: int = 0

    @property
    def up_to_date(self) -> bool:
        return not (self.added or self.removed or self.changed or self.moved or self.skipped or self.to_extract)

    def summary(self) -> str:
        if self.up_to_date:
            return f"set {self.set_key} matches {self.data}: up to date"
        extra = "".join(f", {len(v)} {k}" for k, v in (("moved between splits", self.moved),
                                                         ("to be skipped", self.skipped)) if v)
        return (
            f"set {self.set_key} differs from {self.data}: {len(self.added)} added, {len(self.removed)} removed, "
            f"{len(self.changed)} changed{extra}; {self.to_extract} images need extracting. "
            "Run featcache extract with the same options to update."
        )


def status(store: Store, key: str | None = None, data: str | None = None) -> Status:
    """Compare the folder ``data`` with the set's view.

    The set's stored ``data_root`` is only a hint shown to the user: featcache walks no folder
    that a store names, so ``data`` must be given (by the user, who can confirm the hint).
    """
    fs = store.get_set(key)
    r = fs.record
    if data is None:
        raise DataError(
            f"set {fs.key} was made from {r.data_root!r}; pass that folder (or its copy) with --data to compare. "
            "featcache does not walk a folder named by a store by itself.",
            param="data",
        )
    cfg = r.config
    text = lambda v: v if isinstance(v, str) else None
    names = lambda v: tuple(x for x in v if isinstance(x, str)) if isinstance(v, list) else None
    manifest = scan(data, r.split_fractions, r.split_seed or 0, labels=_labels_inside(fs, text(cfg.get("labels")), data),
                    labels_from_name=text(cfg.get("labels_from_name")), classes=names(cfg.get("classes")),
                    exclude_class=names(cfg.get("exclude_class")) or ())
    # a path is in one split at a time, in the folder and in the set; a flat folder's split is shown with it
    current = {it.path: (it.split, it.sha256) for it in manifest.items}
    stored = {p: (s, h) for s in fs.splits for p, h in zip(fs.paths(s), fs.hashes(s).tolist())}
    shown = (lambda split, path: f"{split}/{path}") if manifest.layout == "flat" else (lambda split, path: path)
    skipped = {d["path"] for d in fs.skipped()}
    known = store.known_hashes(fs.space)
    st = Status(fs.key, str(data))
    for path, (split, h) in current.items():
        if path not in stored:
            if path not in skipped:
                st.added.append(shown(split, path))
            continue
        was, had = stored[path]
        if had != h:
            st.changed.append(path)
        if was != split:
            st.moved.append(f"{path} ({was} -> {split})")
    st.removed = [shown(split, path) for path, (split, _) in stored.items() if path not in current]
    st.skipped = [f"{s.path}: {s.reason}" for s in manifest.skipped if s.path not in skipped]
    wanted = [(path, h) for path, (_, h) in current.items() if path not in skipped]
    held = known.contains([h for _, h in wanted])  # one sorted search for the folder's images
    st.to_extract = len({h for (_, h), k in zip(wanted, held.tolist()) if not k})
    return st


def _labels_inside(fs: FeatureSet, labels: str | None, data: str) -> Path | None:
    """The labels CSV a set was made with, found at the same place inside the folder the user names.

    The stored path is only a name: a CSV outside the set's data folder is never opened (a store
    must not make featcache read, and print the first line of, a file the user did not name)."""
    if labels is None:
        return None
    made_from = fs.record.config.get("data")
    base = fs.record.data_root if os.path.isabs(labels) or not isinstance(made_from, str) else made_from
    rel = os.path.relpath(os.path.normpath(labels), os.path.normpath(base))
    if os.path.isabs(rel) or rel == ".." or rel.startswith(".." + os.sep):
        raise DataError(f"set {fs.key} was made with the labels file {labels!r}, outside its data folder "
                        f"{fs.record.data_root!r}; featcache opens no file a store names, so the folder cannot be "
                        "compared. Re-extract with the CSV inside the data folder.", param="data")
    return safe_join(data, rel)


@dataclass
class VerifyReport:
    set_key: str
    rows: int  # the set's rows (images and views) found in chunks that were read and checked
    errors: list[str]
    compared: int
    max_rel_diff: float | None
    notes: list[str]
    stored_rows: int = 0  # every row of those chunks, the set's and other sets' (a chunk is read whole)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        state = "OK" if self.ok else f"FAILED ({len(self.errors)} problems)"
        diff = f", max relative difference {self.max_rel_diff:.2e}" if self.max_rel_diff is not None else ""
        within = f" (in {self.stored_rows} stored rows read)" if self.stored_rows != self.rows else ""
        return (f"verify {self.set_key}: {state}; {self.rows} rows of the set checksummed{within}; "
                f"{self.compared} recomputed{diff}")


# Relative L2 distance a recomputed row may have from the stored one, by compute precision: the
# float16 storage alone moves rows by ~3e-4; bf16/fp16 autocast moves them by a few percent
# (3.2% median measured for efficientnet_lite0, bf16 against float32), and by a similar amount
# between two machines that both use it. A row of another image is ~0.5-1.4 away.
TOLERANCE = {"float32": 5e-3, "tf32": 2e-2, "float16": 5e-2, "bfloat16": 1e-1, "unrecorded": 1e-1}


def _read_checked(fs: FeatureSet, store: Store, errors: list[str], notes: list[str]) -> tuple[int, int]:
    """Read every chunk of every segment the set draws on: each must be present, decode, match the
    CRC in the segment's integrity record and hold finite values. Errors name segment and chunk.
    Returns (the set's distinct rows found in chunks that passed, every row of those chunks)."""
    wanted = set(fs.hashes_all())
    spaces = [fs.space] + ([fs.record.view_space] if fs.views else [])
    if fs.views:
        wanted.update(fs.view_keys())
    rows, found = 0, set()
    for space in spaces:
        segments, damaged = store.locate(space, [])[0], store.damaged_segments(space)
        for name, why in damaged.items():
            notes.append(f"space {space} segment {name} is damaged ({why}); its rows count as missing")
        for seg in segments:
            keys = seg.sha256.tolist()
            if not wanted.intersection(keys):
                continue
            arr, step = seg.features, seg.chunk_rows
            for start in range(0, arr.shape[0], step):
                where = (f"space {space} segment {seg.key} chunk {start // step} "
                         f"(rows {start}-{min(start + step, arr.shape[0]) - 1})")
                try:
                    block = arr[start : start + step]
                    seg.check_chunk(start, block, space)
                except Exception as e:
                    errors.append(f"{where}: {e.__class__.__name__}: {e}")
                    continue
                bad = int((~np.isfinite(block.reshape(len(block), -1)).all(axis=1)).sum())
                if bad:
                    errors.append(f"{where}: {bad} rows hold non-finite values (NaN or inf)")
                rows += len(block)
                found.update(wanted.intersection(keys[start : start + step]))
    return len(found), rows


def verify(store: Store, key: str | None = None, sample: int = 8, seed: int = 0, data: str | None = None,
           backbone: str | None = None, weights: str | None = None) -> VerifyReport:
    """Check every chunk a set draws on against its integrity record, then recompute ``sample`` rows
    from the images in ``data`` (a folder the user names; never the store's recorded root) and compare."""
    from .backbones import check_user_backbone

    check_user_backbone(backbone, weights)
    fs = store.get_set(key)
    r = fs.record
    errors: list[str] = []
    notes: list[str] = []
    try:
        all_hashes = fs.hashes_all()
        for s in fs.splits:
            fs.labels(s), fs.paths(s)
    except StoreError as e:
        return VerifyReport(fs.key, 0, [str(e)], 0, None, notes)
    rows, stored_rows = _read_checked(fs, store, errors, notes)
    held = store.holds(fs.space, all_hashes)
    missing = [h for h, k in zip(all_hashes, held.tolist()) if not k]
    if missing:
        damaged = store.damaged_segments(fs.space)
        why = f" (damaged: {'; '.join(f'segment {k}: {v}' for k, v in damaged.items())})" if damaged else ""
        errors.append(f"{len(missing)} rows of set {fs.key} are missing from space {fs.space}{why}; "
                      "re-run featcache extract to restore them")
    compared, worst = 0, None
    if sample and data is None:
        notes.append(f"rows not recomputed: pass --data with the folder the set was made from ({r.data_root})")
    elif sample and not errors:
        compared, worst = _recompute(fs, Path(data), sample, seed, backbone, weights, errors, notes)
    return VerifyReport(fs.key, rows, errors, compared, worst, notes, stored_rows)


def _recompute(fs: FeatureSet, root: Path, sample: int, seed: int, backbone: str | None, weights: str | None,
               errors: list[str], notes: list[str]) -> tuple[int, float | None]:
    """Recompute a seeded sample of rows from the bytes on disk, under the set's recorded precision."""
    import hashlib

    import torch

    from .backbones import autocast, rebuild_backbone
    from .data import decode_bytes, open_regular

    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist", param="data")
    r = fs.record
    bb = rebuild_backbone(r.config, r.backbone, given=backbone, weights=weights)
    if bb.weights_sha256 != r.weights_sha256:
        errors.append(f"weights of {bb.weights_id} differ from those the set was made with ({r.weights_id})")
        return 0, None
    rng = np.random.default_rng(seed)
    paths = {s: fs.paths(s) for s in fs.splits}  # read each split's arrays once, not per sampled row
    hashes = {s: fs.hashes(s) for s in fs.splits}
    items = [(s, i) for s in fs.splits for i in range(len(hashes[s]))]
    picks = [items[i] for i in rng.choice(len(items), size=min(sample, len(items)), replace=False)]
    tol = TOLERANCE[r.precision]
    compared, worst = 0, 0.0
    for split, i in picks:
        path = safe_join(root, paths[split][i])
        want_hash = hashes[split][i]
        try:
            with open_regular(path) as f:
                data = f.read()
        except OSError as e:
            notes.append(f"{path}: cannot read ({e.strerror}); not compared")
            continue
        if hashlib.sha256(data).hexdigest() != want_hash:
            notes.append(f"{path}: changed on disk since extraction; not compared")
            continue
        stored = fs.store.gather(fs.space, [want_hash], fs.shape, r.dtype)[0].astype(np.float32)
        with torch.inference_mode(), autocast(r.precision, torch.device("cpu")):
            fresh = bb.model(bb.transform(decode_bytes(data))[None])[0].float().numpy()
        rel = float(np.linalg.norm(stored - fresh) / (np.linalg.norm(fresh) or 1.0))
        worst = max(worst, rel) if np.isfinite(rel) else float("inf")
        compared += 1
        if not rel <= tol:  # NaN fails too
            errors.append(f"{paths[split][i]}: stored row differs from a fresh computation "
                          f"(relative L2 {rel:.2e} > {tol:g} for {r.precision})")
    return compared, worst
