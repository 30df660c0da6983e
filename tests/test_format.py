"""The store format: a format-1 store from the previous release migrates without recomputing, and
any Zarr v3 reader gets features and labels by following FORMAT.md alone (no featcache import)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import featcache
from featcache.cli import main
from featcache.errors import StoreError

from .helpers import TINY, make_folder

V1 = Path(__file__).parent / "data" / "v1store.zarr"


def _v1_rows(url):
    """Rows and labels of every set in a format-1 store, read with zarr-python alone."""
    root = zarr.open_group(str(url), mode="r")
    rows = {}
    for space, group in root["spaces"].groups():
        for _, seg in group["segments"].groups():
            if seg.attrs.get("committed") is True:
                for k, r in zip(np.asarray(seg["sha256"][:]).tolist(), seg["features"][:]):
                    rows.setdefault((space, str(k)), r)
    out = {}
    for _, s in root["sets"].groups():
        a = s.attrs
        for split in a["splits"]:
            keys = [str(k) for k in np.asarray(s[split]["sha256"][:]).tolist()]
            out[(a["key"], split)] = (np.stack([rows[(a["space"], k)] for k in keys]),
                                      np.asarray(s[split]["labels"][:]).astype(np.int64),
                                      [str(p) for p in np.asarray(s[split]["paths"][:]).tolist()])
            if a.get("views") and split == "train":
                views = [rows[(a["view_space"], f"{k}:{v}")] for k in keys for v in range(a["views"])]
                out[(a["key"], "views")] = np.stack(views)
    return out


def test_a_format_1_store_migrates_and_reads_back_equal(tmp_path):
    url = tmp_path / "old.zarr"
    shutil.copytree(V1, url)
    want = _v1_rows(url)
    with pytest.raises(StoreError, match="featcache migrate --store"):
        featcache.open_store(str(url))
    r = CliRunner().invoke(main, ["migrate", "--store", str(url)])
    assert r.exit_code == 0 and "2 sets" in r.output and "none recomputed" in r.output, r.output
    st = featcache.open_store(str(url))
    assert sorted(st.set_keys()) == sorted({k for k, _ in want})
    for (key, split), value in want.items():
        fs = st.get_set(key)
        if split == "views":
            assert np.array_equal(fs.view_features().reshape(value.shape), value)
            continue
        x, y = fs.to_numpy(split)
        assert np.array_equal(x, value[0]) and np.array_equal(y, value[1]) and fs.paths(split) == value[2]
        assert fs.record.precision == "unrecorded"
    assert featcache.verify(st, sample=0).ok
    assert "already in store format" in CliRunner().invoke(main, ["migrate", "--store", str(url)]).output
    assert not any(p.name.endswith(".partial") for p in url.rglob("*"))


# ---------------------------------------------------------------- foreign readers, from FORMAT.md alone


def _store_with_history(tmp_path):
    """Reused rows, an incremental extract, two sets sharing a space, a checkpointed multi-segment run."""
    folder = make_folder(tmp_path / "d", splits=(("train", 6), ("val", 3)))
    url = str(tmp_path / "s.zarr")
    kw = dict(backbone=TINY, weights="none", workers=0, store=url)
    featcache.extract(data=str(folder), checkpoint_s=1e-9, batch_size=4, **kw)
    from PIL import Image

    Image.new("RGB", (20, 20), (200, 10, 10)).save(folder / "train" / "red" / "added.png")
    featcache.extract(data=str(folder), **kw)  # incremental: one new row, the rest reused
    other = make_folder(tmp_path / "e", splits=(("train", 2), ("val", 1)), seed=5)
    shutil.copy(folder / "train" / "blue" / "blue_0.png", other / "train" / "blue" / "shared.png")
    featcache.extract(data=str(other), **kw)
    return url


def _current_sets(root):
    """FORMAT.md: committed set groups; of several instances of a key, the latest created_at."""
    best = {}
    for _, g in root["sets"].groups():
        a = g.attrs
        if a.get("committed") is True and (a["key"] not in best
                                           or a["created_at"] > best[a["key"]].attrs["created_at"]):
            best[a["key"]] = g
    return best


def _rows_by_key(segments):
    """FORMAT.md: committed segments in name order; the first segment holding a key wins."""
    rows = {}
    for name in sorted(segments):
        attrs, keys, _feats = segments[name]
        if attrs.get("committed") is not True:
            continue
        for i, k in enumerate(keys):
            rows.setdefault(bytes(k), (name, i))
    return rows


def _zarr_python(url):
    root = zarr.open_group(url, mode="r")
    out = {}
    for key, g in _current_sets(root).items():
        space = root["spaces"][g.attrs["space"]]["segments"]
        segments = {n: (s.attrs, s["sha256"][:] if s.attrs.get("rows") else np.zeros((0, 32), np.uint8), s["features"])
                    for n, s in space.groups()}
        where = _rows_by_key(segments)
        classes = g.attrs["classes"]
        for split in g.attrs["splits"]:
            keys = g[split]["sha256"][:]
            x = np.stack([segments[where[bytes(k)][0]][2][where[bytes(k)][1]] for k in keys])
            out[(key, split)] = (x, g[split]["labels"][:].astype(np.int64), [classes[i] for i in g[split]["labels"][:]])
    return out


def _tensorstore(url):
    ts = pytest.importorskip("tensorstore")
    root = Path(url)

    def array(path):
        return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / path)}}).result().read().result()

    def attrs(path):
        return json.loads((root / path / "zarr.json").read_text())["attributes"]

    out = {}
    best = {}
    for g in sorted((root / "sets").iterdir()):
        if g.is_dir():
            a = attrs(f"sets/{g.name}")
            if a.get("committed") is True and (a["key"] not in best or a["created_at"] > best[a["key"]][1]["created_at"]):
                best[a["key"]] = (g.name, a)
    for key, (name, a) in best.items():
        seg_root = root / "spaces" / a["space"] / "segments"
        segments = {}
        for s in sorted(p.name for p in seg_root.iterdir() if p.is_dir()):
            sa = attrs(f"spaces/{a['space']}/segments/{s}")
            rows = sa.get("rows", 0)
            keys = array(f"spaces/{a['space']}/segments/{s}/sha256") if rows else np.zeros((0, 32), np.uint8)
            segments[s] = (sa, keys, f"spaces/{a['space']}/segments/{s}/features")
        where = _rows_by_key(segments)
        for split in a["splits"]:
            keys = array(f"sets/{name}/{split}/sha256")
            labels = array(f"sets/{name}/{split}/labels")
            feats = {}
            x = np.stack([feats.setdefault(where[bytes(k)][0], array(segments[where[bytes(k)][0]][2]))[where[bytes(k)][1]]
                          for k in keys])
            out[(key, split)] = (x, labels.astype(np.int64), [a["classes"][i] for i in labels])
    return out


@pytest.mark.parametrize("reader", [_zarr_python, _tensorstore])
def test_a_foreign_reader_following_the_format_gets_the_same_features_and_labels(tmp_path, reader):
    url = _store_with_history(tmp_path)
    st = featcache.open_store(url)
    assert len(st.set_keys()) == 3
    assert any(len([g for _, g in st.segment_groups(s) if g.attrs.get("committed")]) > 2 for s in st.spaces())
    got = reader(url)
    assert {k for k, _ in got} == set(st.set_keys())
    for (key, split), (x, y, names) in got.items():
        fs = st.get_set(key)
        want_x, want_y = fs.features(split), fs.labels(split)  # as stored
        assert x.dtype == want_x.dtype and np.array_equal(x, want_x) and np.array_equal(y, want_y)
        assert names == [fs.classes[i] for i in want_y]


def test_compact_rewrites_a_checkpointed_space_into_one_segment_and_gc_frees_the_rest(tmp_path):
    from featcache.store.maintenance import compact, gc

    url = _store_with_history(tmp_path)
    st = featcache.open_store(url)
    before = {k: {s: st.get_set(k).to_numpy(s) for s in st.get_set(k).splits} for k in st.set_keys()}
    space = st.get_set().space
    n_before = len([g for _, g in st.segment_groups(space) if g.attrs.get("committed")])
    r = compact(featcache.open_store(url, mode="r+"))
    assert r.segments == n_before and r.spaces == 1
    st = featcache.open_store(url)
    assert len(st.locate(space, [])[0]) == 1  # readers now see only the compacted segment
    for k, splits in before.items():
        for s, (x, y) in splits.items():
            got = st.get_set(k).to_numpy(s)
            assert np.array_equal(got[0], x) and np.array_equal(got[1], y)
    assert gc(st, grace_s=3600).segments_removed == 0  # the old files wait for the grace
    freed = gc(featcache.open_store(url, mode="r+"), grace_s=0)
    assert freed.segments_removed == n_before
    st = featcache.open_store(url)
    assert len([g for _, g in st.segment_groups(space)]) == 1 and featcache.verify(st, sample=0).ok
    assert _zarr_python(url).keys() == {(k, s) for k in before for s in before[k]}
