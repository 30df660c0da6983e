"""Each segment's sorted keys on disk (featcache/store/sortedkeys.py) and the lookups that search them
(spacekeys.py): they answer as the space-wide row index does, read only the chunks the keys fall in, and a
damaged, rewritten or missing structure never gives a row that holds another key (at worst a miss)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

import featcache
from featcache.keys import row_key
from featcache.store.groups import default_compressor, require_group, uncommitted
from featcache.store.maintenance import compact
from featcache.store.rowindex import RowIndex
from featcache.store.segments import SegmentWriter, check_segment
from featcache.store.sortedkeys import CHUNK, SortedSearch, sorted_search
from featcache.store.spacekeys import SpaceKeys

OLD, MID, NEW = "20200101T000000-aaaaaaaa", "20200101T000001-bbbbbbbb", "20200101T000002-cccccccc"


def _hash(i: int) -> str:
    return hashlib.sha256(i.to_bytes(8, "little", signed=True)).hexdigest()


def _write(st, space: str, name: str, keys: list[str], value: float = 0.0) -> Path:
    """A committed segment ``name`` whose row ``i`` holds ``value + i``, written as extract writes one."""
    parent = require_group(st.root["spaces"][space], "segments")
    group = parent.create_group(name, attributes=uncommitted(created_at="2020-01-01T00:00:00Z", created_by="test"))
    writer = SegmentWriter(group, len(keys), (1,), "float32", default_compressor())
    writer.append((value + np.arange(len(keys), dtype=np.float32)).reshape(-1, 1), keys)
    writer.commit()
    return Path(st.url) / "spaces" / space / "segments" / name


@pytest.fixture
def store(tmp_path):
    st = featcache.open_store(str(tmp_path / "s.zarr"))
    return st, st.ensure_space({"test": "sorted keys"})


def _lazy(st, space: str) -> SpaceKeys:
    """A lookup over the space's committed segments, opened afresh (keys not read)."""
    fresh = featcache.open_store(st.url)
    return fresh.known_hashes(space)


def _never_wrong(st, space: str, keys: list[str], values: dict[str, float]) -> np.ndarray:
    """Every key either missing from the lookup or found at a row holding exactly it; ``locate``/``gather``
    (which fall back to the row index on a miss) give each key its own row. Returns what the lookup found."""
    lookup = _lazy(st, space)
    found = lookup.find(keys)
    for key, at in zip(keys, found.tolist()):
        if at >= 0:
            s, r = lookup.locate(np.array([at]))[0].tolist()
            seg = lookup.segments[s]
            assert seg.sha256[r] == key, f"{key[:8]} found at a row holding {seg.sha256[r][:8]}"
    got = featcache.open_store(st.url).gather(space, keys, (1,), "float32")[:, 0]
    assert got.tolist() == [values[k] for k in keys]
    return found


def test_a_lookup_reads_only_the_chunks_its_keys_fall_in(store):
    st, space = store
    keys = [_hash(i) for i in range(20 * CHUNK)]
    _write(st, space, OLD, keys)
    lookup = _lazy(st, space)
    seg = lookup.segments[0]
    assert not seg.keys_read and isinstance(sorted_search(seg.group, seg.rows), SortedSearch)
    absent = [_hash(-i) for i in range(1, 4)]
    assert not lookup.contains(absent).any()
    assert lookup.reads() <= 2 * len(absent) and not seg.keys_read  # a miss reads no key of the segment
    wanted = [keys[5], keys[7 * CHUNK + 3]]
    found = lookup.find(wanted)
    assert lookup.locate(found)[:, 1].tolist() == [5, 7 * CHUNK + 3]
    assert lookup.reads() <= 2 * (len(absent) + len(wanted)) and seg.keys_read  # a hit is checked against its keys
    assert len(lookup) == len(keys) and set(lookup) == set(keys)  # every key: the row index, built on demand


def test_equal_keys_resolve_to_the_oldest_segments_first_row(store):
    st, space = store
    a, b, c = _hash(1), _hash(2), _hash(3)
    _write(st, space, NEW, [a, c], 30.0)
    _write(st, space, MID, [b, a, b], 20.0)  # b twice: its first row
    _write(st, space, OLD, [c], 10.0)
    lookup = _lazy(st, space)
    where = lookup.locate(lookup.find([a, b, c]))
    assert [lookup.segments[s].key for s in where[:, 0].tolist()] == [MID, MID, OLD]
    assert where[:, 1].tolist() == [1, 0, 0]
    assert featcache.open_store(st.url).gather(space, [a, b, c], (1,), "float32")[:, 0].tolist() == [21.0, 20.0, 10.0]


def _crafted(rng, n: int, pool: np.ndarray, viewed: bool) -> list[str]:
    """Keys from ``pool`` (digests, many sharing their first 8 bytes), repeated, views from a few numbers."""
    digests = pool[rng.integers(0, len(pool), n)]
    views = rng.integers(-2, 4, n) if viewed else [None] * n
    return [row_key(bytes(d).hex(), None if v is None else int(v)) for d, v in zip(digests, views)]


@pytest.mark.parametrize("seed", range(4))
def test_lookups_answer_as_the_row_index_does(tmp_path, seed):
    """Differential: segments of keys sharing their first 8 bytes (the views of one image share all 32), equal keys
    within and across segments, plain and view segments in one space; every key resolves to the very position
    the space-wide row index gives, through the persisted sorted keys and through the in-memory fallback."""
    rng = np.random.default_rng(seed)
    st = featcache.open_store(str(tmp_path / "s.zarr"))
    space = st.ensure_space({"test": seed})
    pool = rng.integers(0, 256, (2000, 32), dtype=np.uint8)
    shared = 40 if seed < 2 else 700  # keys sharing their first 8 bytes: a few, or so many that a segment is
    pool[:shared, :8] = pool[0, :8]  # searched in memory (more candidates than its sorted keys are for)
    pool[shared : shared + 20, :8] = 0
    names = [f"2020010{s}T000000-0000000{s}" for s in range(4)]
    for s, name in enumerate(names):
        _write(st, space, name, _crafted(rng, int(rng.integers(1, 3 * CHUNK)), pool, viewed=seed % 2 == 1 and s != 1))
    if seed >= 2:  # one segment as written before sorted keys were
        folder = Path(st.url) / "spaces" / space / "segments" / names[2]
        shutil.rmtree(folder / "sorted")
    eager = featcache.open_store(st.url)
    index = RowIndex(eager._index(space)[0])
    lookup = _lazy(st, space)
    probe = _crafted(rng, 400, pool, viewed=True) + _crafted(rng, 400, pool, viewed=False)
    probe += [bytes(d).hex() for d in rng.integers(0, 256, (50, 32), dtype=np.uint8)]
    assert np.array_equal(lookup.find(probe), index.find(probe))
    assert np.array_equal(lookup.offsets, index.offsets)
    assert lookup.reads() > 0 or seed >= 2  # seeds 2, 3: every segment searched in memory


def _table(folder: Path) -> zarr.Array:
    return zarr.open_array(str(folder / "sorted"), mode="r+")


DAMAGE = {
    "rows swapped": lambda t: t.__setitem__((slice(None), 1), t[:, 1][::-1].copy()),
    "rows out of range": lambda t: t.__setitem__((slice(None), 1), np.uint64(2**63) + t[:, 1]),
    "heads shifted": lambda t: t.__setitem__((slice(None), 0), np.roll(t[:, 0], 1)),
    "heads all equal": lambda t: t.__setitem__((slice(None), 0), t[0, 0]),
    "unsorted": lambda t: t.__setitem__(slice(None), t[...][::-1].copy()),
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_a_rewritten_sorted_structure_never_gives_another_keys_row(store, how):
    st, space = store
    keys = [_hash(i) for i in range(3 * CHUNK + 17)]
    folder = _write(st, space, OLD, keys, 100.0)
    DAMAGE[how](_table(folder))  # rewritten through Zarr: its checksums are valid
    values = {k: 100.0 + i for i, k in enumerate(keys)}
    probe = keys[:: 37] + [keys[-1]]
    _never_wrong(st, space, probe, values)


def test_rewritten_fences_and_a_damaged_chunk_cost_a_miss_or_a_fallback_never_a_wrong_row(store):
    st, space = store
    keys = [_hash(i) for i in range(4 * CHUNK)]
    folder = _write(st, space, OLD, keys, 5.0)
    values = {k: 5.0 + i for i, k in enumerate(keys)}
    probe = keys[::29]
    meta = json.loads((folder / "zarr.json").read_text())
    sound = meta["attributes"]["sorted"]["fences"]
    for fences in (np.frombuffer(bytes.fromhex(sound), ">u8")[::-1], np.zeros(4, ">u8")):
        meta["attributes"]["sorted"]["fences"] = fences.tobytes().hex()
        (folder / "zarr.json").write_text(json.dumps(meta))
        _never_wrong(st, space, probe, values)
    meta["attributes"]["sorted"]["fences"] = sound
    (folder / "zarr.json").write_text(json.dumps(meta))
    shard = next((folder / "sorted").rglob("c/*/*"))
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF  # inside the first chunk: its CRC32C fails, the segment is searched in memory
    shard.write_bytes(bytes(raw))
    found = _never_wrong(st, space, probe, values)
    assert (found >= 0).all()  # the in-memory search finds them all


def test_segments_without_sorted_keys_are_searched_in_memory(store):
    """A store written before sorted keys (no array, no attribute), a structure of the wrong shape, and one
    whose attribute is malformed: each of those segments is searched in memory, all keys found."""
    st, space = store
    keys = [_hash(i) for i in range(2 * CHUNK + 5)]
    folders = [_write(st, space, name, keys[i::3], 10.0 * i) for i, name in enumerate((OLD, MID, NEW))]
    shutil.rmtree(folders[0] / "sorted")
    meta = json.loads((folders[0] / "zarr.json").read_text())
    del meta["attributes"]["sorted"]
    (folders[0] / "zarr.json").write_text(json.dumps(meta))
    shutil.rmtree(folders[1] / "sorted")
    zarr.open_group(str(folders[1]), mode="r+").create_array("sorted", shape=(3, 2), dtype="uint64")
    meta = json.loads((folders[2] / "zarr.json").read_text())
    meta["attributes"]["sorted"].update(chunk_rows=7, fences="not hex")
    (folders[2] / "zarr.json").write_text(json.dumps(meta))
    lookup = _lazy(st, space)
    assert all(sorted_search(seg.group, seg.rows) is None for seg in lookup.segments)
    values = {k: 10.0 * (i % 3) + i // 3 for i, k in enumerate(keys)}
    found = _never_wrong(st, space, keys, values)
    assert (found >= 0).all() and lookup.reads() == 0


def test_a_segment_whose_keys_differ_from_their_record_holds_nothing(store):
    """The sorted keys point at a row, but the segment's own keys were rewritten: the found row is checked against
    keys that must match the integrity record first, so the segment counts as damaged, and the row as missing."""
    st, space = store
    keys = [_hash(i) for i in range(50)]
    folder = _write(st, space, OLD, keys)
    sha = zarr.open_array(str(folder / "sha256"), mode="r+")
    sha[0] = sha[1][...]  # row 0 now claims row 1's key
    fresh = featcache.open_store(st.url)
    assert not fresh.holds(space, keys[:2]).any()
    assert any("damaged" in w for w in fresh.warnings)


def test_compact_and_extract_write_sorted_keys(store):
    st, space = store
    _write(st, space, OLD, [_hash(i) for i in range(10)])
    _write(st, space, NEW, [_hash(i) for i in range(5, 20)])
    compact(st)
    st.forget_index()
    segments = st._index(space)[0]
    assert len(segments) == 1 and sorted_search(segments[0].group, segments[0].rows) is not None
    seg, _ = check_segment(segments[0].key, segments[0].group, keys=False)
    assert seg is not None and not seg.keys_read and seg.rows == 20
