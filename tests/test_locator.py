"""A set records where its rows are when it is committed, and a load reads only those segments; a location
is a hint, checked against the key it must hold, so rows moved (compact, gc), locations damaged or rewritten
with matching digests, and sets recorded before locations all still give each image its own row.
Stores are changed for real on disk: shard files deleted, arrays rewritten, records edited."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import featcache
from featcache.store.groups import digest_values
from featcache.store.maintenance import compact, gc

from .helpers import extract_tiny, make_folder


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, str, str]:
    """A store whose space holds two folders' rows, each written by its own extract (its own segment)."""
    top = tmp_path_factory.mktemp("locator")
    first, second = make_folder(top / "first"), make_folder(top / "second", seed=1)
    store = top / "s.zarr"
    return store, extract_tiny(first, store).set_key, extract_tiny(second, store).set_key


@pytest.fixture
def store(made, tmp_path) -> tuple[str, str, str, dict[str, np.ndarray]]:
    """A copy of the made store, the two set keys, and the second set's rows per split read through the
    space's row index (no locations)."""
    copy = tmp_path / "s.zarr"
    shutil.copytree(made[0], copy)
    st = featcache.open_store(str(copy))
    fs = st.get_set(made[2])
    reference = {s: st.gather(fs.space, fs.hashes(s), fs.shape, fs.record.dtype) for s in fs.splits}
    return str(copy), made[1], made[2], reference


def _segments(url: str, space: str) -> Path:
    return Path(url) / "spaces" / space / "segments"


def _set_folder(url: str, key: str) -> Path:
    [path] = (Path(url) / "sets").glob(f"{key}-*")
    return path


def _rewrite(url: str, key: str, split: str, name: str, values: np.ndarray, digest: bool) -> None:
    """Replace one array of a set's split by ``values`` (same length), and its digest in the record if ``digest``."""
    st = featcache.open_store(url)
    group = st.get_set(key).group
    group[split][name][...] = values
    if digest:
        path = _set_folder(url, key) / "zarr.json"
        meta = json.loads(path.read_text())
        meta["attributes"]["locator"]["integrity"][split][name] = digest_values(values)
        path.write_text(json.dumps(meta))


def _load(url: str, key: str) -> tuple[featcache.Store, dict[str, np.ndarray]]:
    """Each split of the set as a fit loads it, in a store opened afresh (no index cached)."""
    st = featcache.open_store(url, mode="r")
    fs = st.get_set(key)
    return st, {s: fs.to_numpy(s, dtype="float16")[0] for s in fs.splits}


def _same(got: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    assert set(got) == set(reference)
    for s in reference:
        assert np.array_equal(got[s], reference[s]), s


def test_a_load_reads_only_the_segments_holding_the_sets_rows(store):
    url, first, second, reference = store
    st = featcache.open_store(url)
    a, b = st.get_set(first), st.get_set(second)
    names = {n for s in b.splits for n in b.locations(s).names}
    others = sorted(p.name for p in _segments(url, b.space).iterdir() if p.is_dir() and p.name not in names)
    assert names and others  # the first folder's rows lie in segments the second set does not use
    for name in others:  # damage them: a load that built the space's row index would read and report them
        shards = [p for p in (_segments(url, b.space) / name / "features").rglob("*") if p.is_file()
                  and p.name != "zarr.json"]
        shards[0].unlink()
    st, got = _load(url, second)
    _same(got, reference)
    assert not any(name in w for w in st.warnings for name in others), st.warnings
    assert b.space not in st._index_cache  # no row index was built
    for s in a.splits:  # the first set's rows are gone with them: an error, never another row
        with pytest.raises(featcache.errors.StoreError, match=r"missing|damaged|cannot read"):
            st.get_set(first).to_numpy(s)


def test_rows_moved_by_compact_and_removed_by_gc_are_found_through_the_index(store):
    url, _, second, reference = store
    st = featcache.open_store(url)
    space = st.get_set(second).space
    before = {p.name for p in _segments(url, space).iterdir() if p.is_dir()}
    assert compact(st).segments >= 2
    st, got = _load(url, second)  # the set's segments are now replaced (supersedes): not read from
    _same(got, reference)
    assert space in st._index_cache
    gc(featcache.open_store(url), grace_s=0)
    after = {p.name for p in _segments(url, space).iterdir() if p.is_dir()}
    assert not (before & after)  # every segment the set named is gone
    st, got = _load(url, second)
    _same(got, reference)
    assert not st.warnings


@pytest.mark.parametrize("where", ["row", "segment"])
def test_locations_rewritten_with_matching_digests_never_serve_another_images_row(store, where):
    url, first, second, reference = store
    st = featcache.open_store(url)
    fs = st.get_set(second)
    hint = fs.locations("train")
    if where == "row":  # each image pointed at another image's row of the same segment
        values = np.roll(hint.row, 1)
    else:  # pointed at a segment of the first folder's, at rows that exist there
        other = st.get_set(first)
        foreign = other.locations("train")
        _rewrite(url, second, "train", "row", foreign.row[: len(hint.row)], digest=True)
        path = _set_folder(url, second)
        group = st.get_set(second).group
        names = list(foreign.names)
        blob = np.frombuffer("".join(names).encode(), dtype=np.uint8)
        offsets = np.cumsum([0] + [len(n) for n in names]).astype(np.int64)
        group["locator"]["names_utf8"].resize(blob.shape)
        group["locator"]["names_utf8"][...] = blob
        group["locator"]["names_offsets"].resize(offsets.shape)
        group["locator"]["names_offsets"][...] = offsets
        meta = json.loads((path / "zarr.json").read_text())
        loc = meta["attributes"]["locator"]
        loc["segments"] = len(names)
        loc["integrity"]["names_utf8"], loc["integrity"]["names_offsets"] = digest_values(blob), digest_values(offsets)
        (path / "zarr.json").write_text(json.dumps(meta))
        values = foreign.segment[: len(hint.row)]
        assert len(foreign.row) >= len(hint.row)
    _rewrite(url, second, "train", where, values, digest=True)
    st2 = featcache.open_store(url)
    assert st2.get_set(second).locations("train") is not None  # the rewrite passes its integrity record ...
    st, got = _load(url, second)
    _same(got, reference)  # ... but each location is checked against the key it must hold


def test_damaged_locations_are_reported_and_the_rows_found_through_the_index(store):
    url, _, second, reference = store
    st = featcache.open_store(url)
    hint = st.get_set(second).locations("val")
    _rewrite(url, second, "val", "row", hint.row[::-1].copy(), digest=False)
    st, got = _load(url, second)
    _same(got, reference)
    assert any("row locations are damaged" in w and "val" in w for w in st.warnings), st.warnings


def test_segment_names_that_are_not_segment_names_are_refused(store):
    url, _, second, reference = store
    st = featcache.open_store(url)
    fs = st.get_set(second)
    group = fs.group["locator"]
    names = ["../../../sets"] * fs.record.extra["locator"]["segments"]
    blob = np.frombuffer("".join(names).encode(), dtype=np.uint8)
    offsets = np.cumsum([0] + [len(n) for n in names]).astype(np.int64)
    group["names_utf8"].resize(blob.shape)
    group["names_utf8"][...] = blob
    group["names_offsets"][...] = offsets
    path = _set_folder(url, second) / "zarr.json"
    meta = json.loads(path.read_text())
    meta["attributes"]["locator"]["integrity"].update(names_utf8=digest_values(blob), names_offsets=digest_values(offsets))
    path.write_text(json.dumps(meta))
    st, got = _load(url, second)
    _same(got, reference)
    assert any("not segment names" in w for w in st.warnings), st.warnings


def test_a_set_recorded_before_locations_reads_through_the_index(store):
    url, _, second, reference = store
    folder = _set_folder(url, second)
    meta = json.loads((folder / "zarr.json").read_text())
    del meta["attributes"]["locator"]  # as a writer before locations recorded it
    (folder / "zarr.json").write_text(json.dumps(meta))
    shutil.rmtree(folder / "locator")
    for split in ("train", "val"):
        shutil.rmtree(folder / split / "segment")
        shutil.rmtree(folder / split / "row")
    st = featcache.open_store(url)
    fs = st.get_set(second)
    assert fs.locations("train") is None and not st.warnings
    st, got = _load(url, second)
    _same(got, reference)
    assert fs.space in st._keys_cache and not st.warnings  # found through the space's sorted keys


def test_a_whole_set_key_opens_only_that_sets_groups(store):
    url, first, second, reference = store
    (_set_folder(url, first) / "zarr.json").write_text("{not json")  # another set's record, damaged
    st = featcache.open_store(url)
    fs = st.get_set(second)
    assert fs.key == second and not st.warnings  # the damaged record was not read
    _same({s: fs.to_numpy(s, dtype="float16")[0] for s in fs.splits}, reference)
    with pytest.raises(featcache.errors.StoreError):
        st.get_set(first)
    assert st.get_set(second[:6]).key == second and st.warnings  # a prefix lists every set, and says so
