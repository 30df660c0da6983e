"""Looking after a store: status of a folder against its set, verification, garbage collection."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import zarr

from .data import safe_join, scan
from .errors import DataError
from .store import FeatureSet, Store, group_bytes

__all__ = ["Status", "VerifyReport", "status", "verify", "gc"]


@dataclass
class Status:
    """How an image folder compares with the view stored for it."""

    set_key: str
    data: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    to_extract: int = 0

    @property
    def up_to_date(self) -> bool:
        return not (self.added or self.removed or self.changed or self.to_extract)

    def summary(self) -> str:
        if self.up_to_date:
            return f"set {self.set_key} matches {self.data}: up to date"
        return (
            f"set {self.set_key} differs from {self.data}: {len(self.added)} added, {len(self.removed)} removed, "
            f"{len(self.changed)} changed; {self.to_extract} images need extracting. "
            "Run featcache extract with the same options to update."
        )


def status(store: Store, key: str | None = None, data: str | None = None) -> Status:
    """Compare a folder (default: the one the set was made from) with the set's view."""
    fs = store.get_set(key)
    a = fs.attrs
    root = data or a["data_root"]
    cfg = a.get("config") if isinstance(a.get("config"), dict) else {}
    manifest = scan(root, a.get("split_fractions"), a.get("split_seed") or 0, labels=cfg.get("labels"),
                    labels_from_name=cfg.get("labels_from_name"), classes=cfg.get("classes"),
                    exclude_class=cfg.get("exclude_class") or ())
    current = {(it.split, it.path): it.sha256 for it in manifest.items}
    stored = {(s, p): h for s in fs.splits for p, h in zip(fs.paths(s), fs.hashes(s).tolist())}
    skipped = {d["path"] for d in a.get("skipped", [])}
    known = store.known_hashes(fs.space)
    st = Status(fs.key, str(root))
    for k, h in current.items():
        if k not in stored:
            if k[1] not in skipped:
                st.added.append(f"{k[0]}/{k[1]}" if manifest.layout == "flat" else k[1])
        elif stored[k] != h:
            st.changed.append(k[1])
    st.removed = [p for (s, p) in stored if (s, p) not in current]
    st.to_extract = len({h for (s, p), h in current.items() if h not in known and p not in skipped})
    return st


@dataclass
class VerifyReport:
    set_key: str
    rows: int
    errors: list[str]
    compared: int
    max_rel_diff: float | None
    notes: list[str]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        state = "OK" if self.ok else f"FAILED ({len(self.errors)} problems)"
        diff = f", max relative difference {self.max_rel_diff:.2e}" if self.max_rel_diff is not None else ""
        return f"verify {self.set_key}: {state}; {self.rows} rows read and checksummed; {self.compared} recomputed{diff}"


def _read_checked(fs: FeatureSet, store: Store, errors: list[str]) -> int:
    """Read every chunk the set draws on; a checksum or decode failure names its segment and chunk."""
    wanted = set(fs.hashes_all())
    rows = 0
    for name, group in store.segment_groups(fs.space):
        if group.attrs.get("committed") is not True:
            continue
        try:
            hashes = np.asarray(group["sha256"][:])
        except Exception as e:
            errors.append(f"space {fs.space} segment {name} sha256: {e.__class__.__name__}: {e}")
            continue
        if not wanted.intersection(hashes.tolist()):
            continue
        arr = group["features"]
        step = arr.chunks[0]
        for start in range(0, arr.shape[0], step):
            try:
                arr[start : start + step]
                rows += min(step, arr.shape[0] - start)
            except Exception as e:
                errors.append(
                    f"space {fs.space} segment {name} chunk {start // step} (rows {start}-"
                    f"{min(start + step, arr.shape[0]) - 1}): {e.__class__.__name__}: {e}"
                )
    return rows


def verify(store: Store, key: str | None = None, sample: int = 8, seed: int = 0) -> VerifyReport:
    """Checksum every row of a set, then recompute ``sample`` rows from the images and compare."""
    from .backbones import create_backbone
    from .data import load_rgb

    fs = store.get_set(key)
    errors: list[str] = []
    notes: list[str] = []
    rows = _read_checked(fs, store, errors)
    known = store.known_hashes(fs.space)
    missing = [h for h in fs.hashes_all() if h not in known]
    if missing:
        errors.append(f"{len(missing)} rows of set {fs.key} are missing from space {fs.space}")
    compared, worst = 0, None
    root = Path(fs.attrs["data_root"])
    if sample and not errors and root.is_dir():
        cfg = fs.attrs["config"]
        bb = create_backbone(cfg["backbone"], cfg["layer"], cfg["weights"], cfg["pool"])
        if bb.weights_sha256 != fs.attrs["weights"]["sha256"]:
            errors.append(f"weights of {bb.weights_id} differ from those the set was made with")
        else:
            rng = np.random.default_rng(seed)
            paths = {s: fs.paths(s) for s in fs.splits}  # read each split's arrays once, not per sampled row
            hashes = {s: fs.hashes(s) for s in fs.splits}
            items = [(s, i) for s in fs.splits for i in range(len(hashes[s]))]
            picks = [items[i] for i in rng.choice(len(items), size=min(sample, len(items)), replace=False)]
            worst = 0.0
            import hashlib

            import torch

            for split, i in picks:
                path = safe_join(root, paths[split][i])
                want_hash = hashes[split][i]
                try:
                    data = path.read_bytes()
                except OSError as e:
                    notes.append(f"{path}: cannot read ({e.strerror}); not compared")
                    continue
                if hashlib.sha256(data).hexdigest() != want_hash:
                    notes.append(f"{path}: changed on disk since extraction; not compared")
                    continue
                stored = store.gather(fs.space, [want_hash], fs.shape, fs.attrs["dtype"])[0].astype(np.float32)
                with torch.no_grad():
                    fresh = bb.model(bb.transform(load_rgb(path))[None])[0].float().numpy()
                scale = float(np.abs(fresh).max()) or 1.0
                rel = float(np.abs(stored - fresh).max() / scale)
                worst = max(worst, rel)
                compared += 1
                tol = 1e-2 if fs.attrs["dtype"] == "float16" else 1e-4
                if rel > tol:
                    errors.append(f"{paths[split][i]}: stored row differs from a fresh computation (relative {rel:.2e} > {tol})")
    elif sample and not root.is_dir():
        notes.append(f"data folder {root} not found; rows not recomputed")
    return VerifyReport(fs.key, rows, errors, compared, worst, notes)


def gc(store: Store, grace_s: float = 3600.0, dry_run: bool = False) -> dict:
    """Remove uncommitted leftovers and rows no committed set refers to; returns what was freed.

    Anything written in the last ``grace_s`` seconds is left alone: it may belong to an
    extract that is still running. Rows still referenced are copied to a new segment,
    committed, before the old segment is removed, so readers never miss a row.
    """
    now = datetime.now(timezone.utc)

    def old(group: zarr.Group, key: str) -> bool:
        try:
            stamp = datetime.fromisoformat(str(group.attrs.get(key)))
        except ValueError:
            return True
        return (now - stamp).total_seconds() > grace_s

    report = {"segments_removed": 0, "segments_rewritten": 0, "rows_removed": 0, "sets_removed": 0, "bytes_freed": 0}
    referenced: dict[str, set[str]] = {}
    for _, _, group in store.set_groups():
        fs = FeatureSet(store, group.attrs["key"], group)
        referenced.setdefault(fs.space, set()).update(fs.hashes_all())
    sets = store.root["sets"] if "sets" in store.root else None
    if sets is not None:
        for name, group in list(sets.groups()):
            if group.attrs.get("committed") is not True and old(group, "created_at"):
                report["sets_removed"] += 1
                report["bytes_freed"] += group_bytes(group)
                if not dry_run:
                    del sets[name]
    for space in store.spaces():
        parent = store.root["spaces"][space]
        seen: set[str] = set()
        for name, group in store.segment_groups(space):
            if group.attrs.get("committed") is not True:
                if old(group, "created_at"):
                    report["segments_removed"] += 1
                    report["bytes_freed"] += group_bytes(group)
                    if not dry_run:
                        del parent["segments"][name]
                continue
            hashes = np.asarray(group["sha256"][:])
            keep = [i for i, h in enumerate(hashes.tolist()) if h in referenced.get(space, ()) and h not in seen]
            seen.update(hashes[keep].tolist())
            if len(keep) == len(hashes) or not old(group, "committed_at"):
                continue
            before = group_bytes(group)
            report["rows_removed"] += len(hashes) - len(keep)
            if keep:
                report["segments_rewritten"] += 1
                if not dry_run:
                    feats = group["features"]
                    writer = store.new_segment(space, len(keep), feats.shape[1:], str(feats.dtype))
                    writer.append(feats[:][keep], hashes[keep].tolist())
                    writer.commit(rewritten_from=name)
                    report["bytes_freed"] += before - writer.nbytes_stored()
                else:
                    report["bytes_freed"] += before * (len(hashes) - len(keep)) // max(len(hashes), 1)
            else:
                report["segments_removed"] += 1
                report["bytes_freed"] += before
            if not dry_run:
                del parent["segments"][name]
    report["bytes_freed"] += _remove_partial_writes(store.url, grace_s, dry_run)
    return report


def _remove_partial_writes(url: str, grace_s: float, dry_run: bool) -> int:
    """Temporary ``*.partial`` files a killed process left mid-write (local stores only)."""
    if "://" in url and not url.startswith("file://"):
        return 0
    freed = 0
    cutoff = time.time() - grace_s
    for path in Path(url.removeprefix("file://")).rglob("*.partial"):
        try:
            info = path.stat()
            if info.st_mtime < cutoff:
                freed += info.st_size
                if not dry_run:
                    path.unlink()
        except OSError:
            pass
    return freed


