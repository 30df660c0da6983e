"""``featcache migrate``: convert a format-1 store to the current format without recomputing features.

Format 1 kept row keys and paths as zarr-python's variable-length strings and recorded no
integrity information. Migration copies every committed segment's rows into a new segment
(core types, integrity record, commit marker last), rewrites every committed set the same
way, removes the format-1 groups, and only then sets the store's format version. A crash at
any point leaves either a format-1 store (re-run migrate: finished new groups are kept, the
rest is redone) or a finished format-2 one.

What format 1 did not record is stated, not guessed: the compute precision becomes
``unrecorded`` (verify then allows the widest tolerance) and the decode recipe says that
EXIF orientation was not applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from ..errors import StoreError
from .rows import child_groups, now_iso, require_group
from .store import FORMAT_VERSION, Store, _version_of

__all__ = ["MigrationReport", "migrate", "V1_DECODE"]

V1_DECODE = {"decoder": "PIL", "exif_transpose": False, "alpha": "white", "high_bit_depth": "scaled_to_8bit"}


@dataclass
class MigrationReport:
    url: str
    spaces: int = 0
    segments: int = 0
    rows: int = 0
    sets: int = 0
    dropped: int = 0
    already: bool = False

    def summary(self) -> str:
        if self.already:
            return f"{self.url} is already in store format {FORMAT_VERSION}; nothing to do"
        dropped = (f"; {self.dropped} non-finite rows left out (re-extract their images with --dtype float32)"
                   if self.dropped else "")
        return (f"migrated {self.url} to store format {FORMAT_VERSION}: {self.spaces} spaces, {self.segments} segments "
                f"({self.rows} rows copied, none recomputed), {self.sets} sets{dropped}")


def _new_provenance(old: dict) -> dict:
    prov = {k: v for k, v in old.items() if k != "dtype"}
    return {**prov, "decode": V1_DECODE, "precision": "unrecorded", "dtype": old.get("dtype", "float16")}


def migrate(url: str) -> MigrationReport:
    """Convert the format-1 store at ``url`` in place (see the module docstring)."""
    try:
        root = zarr.open_group(str(url), mode="r+")
    except Exception as e:
        raise StoreError(f"no featcache store at {url} ({e.__class__.__name__})", option="--store") from None
    version = _version_of(root)
    report = MigrationReport(str(url))
    if version == FORMAT_VERSION:
        report.already = True
        return report
    if version != 1:
        raise StoreError(f"{url} is not a featcache store of format 1 (found {version!r}); nothing was changed")
    store = Store(str(url), root)
    moved: dict[str, str] = {}  # old space key -> new space key
    spaces = root["spaces"] if "spaces" in root else None
    for old_key, group in (child_groups(spaces) if spaces is not None else []):
        prov = group.attrs.get("space")
        if group.attrs.get("migrated_from") or not isinstance(prov, dict):
            continue
        new_prov = _new_provenance(prov)
        new_key = store.ensure_space(new_prov)
        require_group(spaces, new_key).attrs["migrated_from"] = old_key
        moved[old_key] = new_key
        done = {g.attrs.get("migrated_from") for _, g in store.segment_groups(new_key)
                if g.attrs.get("committed") is True}
        for name, seg in store.segment_groups(old_key):
            if seg.attrs.get("committed") is not True or name in done:
                continue
            feats = seg["features"]
            keys = [str(k) for k in np.asarray(seg["sha256"][:]).tolist()]
            writer = store.new_segment(new_key, len(keys), tuple(feats.shape[1:]), str(feats.dtype))
            step = feats.chunks[0]
            for start in range(0, len(keys), step):
                block = np.asarray(feats[start : start + step])
                finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
                report.dropped += int((~finite).sum())  # format 1 could store float16 overflow as inf
                writer.append(block[finite], [k for k, ok in zip(keys[start : start + step], finite) if ok])
            writer.commit(migrated_from=name)
            report.segments += 1
            report.rows += len(keys)
        report.spaces += 1
    sets = root["sets"] if "sets" in root else None
    for name, group in (child_groups(sets) if sets is not None else []):
        a = dict(group.attrs)
        if a.get("committed") is not True or "integrity" in a:
            continue
        if a.get("space") not in moved:
            raise StoreError(f"set {name} refers to space {a.get('space')!r}, which the store does not hold; "
                             "nothing of this set was migrated")
        old_prov = a.get("space_provenance") if isinstance(a.get("space_provenance"), dict) else {}
        attrs = {**a, "space": moved[a["space"]], "space_provenance": _new_provenance(old_prov),
                 "precision": "unrecorded", "unlabelled": [], "migrated_from": name}
        if a.get("views") and a.get("view_space") in moved:
            attrs["view_space"] = moved[a["view_space"]]
        for key in ("committed", "committed_at", "integrity"):
            attrs.pop(key, None)
        arrays = {}
        for split in a.get("splits", {}):
            sub = group[split]
            arrays[split] = {"sha256": [str(h) for h in np.asarray(sub["sha256"][:]).tolist()],
                             "labels": np.asarray(sub["labels"][:]).astype(np.int32),
                             "paths": [str(p) for p in np.asarray(sub["paths"][:]).tolist()]}
        if not any(g.attrs.get("migrated_from") == name for _, _, g in store.set_groups()):
            store.write_set(str(a["key"]), attrs, arrays)
        report.sets += 1
    # every new group is committed: remove the format-1 ones, then say the store is format 2
    for name, group in (child_groups(sets) if sets is not None else []):
        if "integrity" not in group.attrs:
            del sets[name]
    for old_key in moved:
        del spaces[old_key]
    root.attrs["featcache"] = {"format_version": FORMAT_VERSION, "migrated_at": now_iso()}
    return report
