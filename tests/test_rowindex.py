"""The row index: which row a key resolves to (the oldest sound segment's), what counts as missing, and that
the sorted-bytes index answers exactly as a dict of key strings would, without a Python object per row."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import featcache
from featcache.errors import StoreError
from featcache.keys import row_key
from featcache.store.groups import default_compressor, require_group, uncommitted
from featcache.store.maintenance import compact
from featcache.store.rowindex import RowIndex
from featcache.store.segments import Segment, SegmentWriter, keys_to_arrays

OLDER, NEWER = "20200101T000000-bbbbbbbb", "20200101T000001-aaaaaaaa"  # segments count oldest name first


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _segment(st, space: str, name: str, keys: list[str], value: float, shape=(3,)) -> Path:
    """A committed segment ``name`` whose row ``i`` is ``value + i`` everywhere, written as extract writes one."""
    parent = require_group(st.root["spaces"][space], "segments")
    group = parent.create_group(name, attributes=uncommitted(created_at="2020-01-01T00:00:00Z", created_by="test"))
    writer = SegmentWriter(group, len(keys), shape, "float32", default_compressor())
    writer.append(np.stack([np.full(shape, value + i, dtype=np.float32) for i in range(len(keys))]), keys)
    writer.commit()
    return Path(st.url) / "spaces" / space / "segments" / name


@pytest.fixture
def store(tmp_path):
    st = featcache.open_store(str(tmp_path / "s.zarr"))
    return st, st.ensure_space({"test": "row index"})


def test_a_row_held_by_two_segments_is_read_from_the_oldest(store):
    st, space = store
    a, b, c = _hash("a"), _hash("b"), _hash("c")
    _segment(st, space, NEWER, [b, a], 20.0)  # written first, but the newer name
    _segment(st, space, OLDER, [c, a], 10.0)
    segments, where = st.locate(space, [a, b, c])
    assert [segments[s].key for s in where[:, 0].tolist()] == [OLDER, NEWER, OLDER]
    assert where[:, 1].tolist() == [1, 0, 0]
    rows = st.gather(space, [a, b, c, a], (3,), "float32")
    assert rows[:, 0].tolist() == [11.0, 20.0, 10.0, 11.0]  # a: the older segment's row, however often asked
    known = st.known_hashes(space)
    assert len(known) == 3 and set(known) == {a, b, c} and a in known
    assert st.holds(space, [a, _hash("d"), c]).tolist() == [True, False, True]
    compact(st)  # the compacted segment keeps the same row for each key
    st.forget_index()
    assert st.gather(space, [a, b, c], (3,), "float32")[:, 0].tolist() == [11.0, 20.0, 10.0]


@pytest.mark.parametrize("damage", ["shard file deleted", "row key rewritten"])
def test_a_damaged_segments_rows_count_as_missing(store, damage):
    st, space = store
    a, b, other = _hash("a"), _hash("b"), _hash("another image")
    older = _segment(st, space, OLDER, [a, b], 10.0)
    _segment(st, space, NEWER, [a], 20.0)
    if damage == "shard file deleted":
        shards = [p for p in (older / "features").rglob("*") if p.is_file() and p.name != "zarr.json"]
        assert shards
        shards[0].unlink()
    else:  # the older segment now claims its second row is another image's: that must never be served
        group = st.root["spaces"][space]["segments"][OLDER]
        group["sha256"][1] = keys_to_arrays([other])[0][0]
    assert OLDER in st.damaged_segments(space)
    assert st.gather(space, [a], (3,), "float32")[0, 0] == 20.0  # the sound segment's row
    assert st.holds(space, [a, b, other]).tolist() == [True, False, False]
    assert b not in st.known_hashes(space) and other not in st.known_hashes(space)
    for key in (b, other):
        with pytest.raises(StoreError, match=f"row for image {key[:12]} is missing.*Damaged segment.*{OLDER}"):
            st.gather(space, [a, key], (3,), "float32")


def test_view_keys_resolve_only_as_row_key_writes_them(store):
    st, space = store
    h = _hash("x")
    _segment(st, space, OLDER, [row_key(h, 0), row_key(h, 1), row_key(h, -3)], 0.0)
    assert st.holds(space, [row_key(h, 1), row_key(h, 0), row_key(h, -3)]).tolist() == [True, True, True]
    assert st.gather(space, [row_key(h, 1)], (3,), "float32")[0, 0] == 1.0
    loose = [h, f"{h}:01", f"{h}:+1", f"{h}: 1", f"{h}:2", f"{h.upper()}:1", f"{h}:{2**32 + 1}", f"{h[:-1]}:1"]
    assert not st.holds(space, loose).any()
    assert set(st.known_hashes(space)) == {row_key(h, 0), row_key(h, 1), row_key(h, -3)}


def _fake_segments(rng, n_segments: int, viewed: bool) -> list[Segment]:
    """Segments of random keys, many of them shared between segments and within one, with digests made mostly
    of zero bytes (keys that differ only in trailing or leading zeros)."""
    pool = rng.integers(0, 256, (60, 32), dtype=np.uint8) * (rng.random((60, 32)) < 0.15)
    segments = []
    for s in range(n_segments):
        n = int(rng.integers(0, 40))
        digests = pool[rng.integers(0, len(pool), n)]
        views = rng.integers(-2, 3, n).astype(np.int32) if viewed and s % 2 else None
        segments.append(Segment(f"s{s}", None, digests.copy(), views, 1, []))  # no features: the index reads keys only
    return segments


@pytest.mark.parametrize("seed", range(6))
def test_the_index_answers_as_a_dict_of_key_strings_does(seed):
    rng = np.random.default_rng(seed)
    segments = _fake_segments(rng, 5, viewed=seed % 2 == 1)
    reference: dict[str, tuple[int, int]] = {}  # the index as it was: the first segment, then the first row, wins
    for s, seg in enumerate(segments):
        for r, key in enumerate(seg.sha256.tolist()):
            reference.setdefault(key, (s, r))
    keys_before = [seg.sha256.tolist() for seg in segments]
    index = RowIndex(segments)
    assert [seg.sha256.tolist() for seg in segments] == keys_before  # the digests now live in the index, unchanged
    stored = list(reference)
    hexes = [bytes(d).hex() for d in rng.integers(0, 256, (10, 32), dtype=np.uint8) * (rng.random((10, 32)) < 0.15)]
    queries = stored + hexes + [row_key(h, 1) for h in hexes[:3]] + [k.upper() for k in stored[:3]]
    queries += [k[:-1] for k in stored[:3]] + [k + "0" for k in stored[:3]] + ["", ":", "z" * 64]
    queries = [queries[i] for i in rng.permutation(len(queries))]
    found = index.find(queries)
    for q, g in zip(queries, found.tolist()):
        if q in reference:
            assert g >= 0 and tuple(index.locate(np.array([g]))[0].tolist()) == reference[q] == index[q]
        else:
            assert g == -1 and q not in index
    assert len(index) == len(reference) and set(index) == set(reference)
    wins = index.winners()
    for s, seg in enumerate(segments):  # what compact copies: exactly the rows the keys resolve to
        mine = wins[index.offsets[s] : index.offsets[s + 1]]
        assert mine.tolist() == [reference[k] == (s, r) for r, k in enumerate(seg.sha256.tolist())]


def test_the_index_holds_no_python_object_per_row(store):
    st, space = store
    n = 50_000
    keys = [hashlib.sha256(i.to_bytes(4, "little")).hexdigest() for i in range(n)]
    _segment(st, space, OLDER, keys, 0.0, shape=(1,))
    st.forget_index()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = st._index(space)[1]
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(index) == n
    # the key bytes and one int64 per row, plus a little per segment; a dict of hex strings held ~240 per row
    assert held / n < 32 + 8 + 8, f"{held / n:.0f} bytes per row"


class _Keys:
    """Just what :class:`RowIndex` reads of a segment: its digests and view numbers."""

    def __init__(self, digests: np.ndarray, views: np.ndarray | None):
        self.digests, self.views, self.rows = digests, views, len(digests)

    def row_keys(self, width: int) -> np.ndarray:
        from featcache.store.rowkeys import encode_keys

        return encode_keys(self.digests, self.views, width)


@pytest.mark.parametrize("viewed", [False, True])
def test_a_search_by_the_first_8_bytes_answers_as_the_whole_key_search(monkeypatch, viewed):
    """Many keys are searched by their first 8 bytes first; keys that share those with others (and equal keys in
    two segments, where the oldest wins) must resolve to the very row the 32-byte search gives."""
    import featcache.store.rowindex as ROWINDEX

    rng = np.random.default_rng(7)
    n, m = 6000, 5000
    d = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    d[: n // 3, :8] = d[0, :8]  # a third of the keys share their first 8 bytes
    d[n // 2 : n // 2 + n // 10] = d[: n // 10]  # the same keys in the newer segment
    views = rng.integers(0, 3, n).astype(np.int32) if viewed else None
    index = RowIndex([_Keys(d[: n // 2], None if views is None else views[: n // 2]),
                      _Keys(d[n // 2 :], None if views is None else views[n // 2 :])])
    stored = rng.integers(0, n, m // 2)
    q = np.concatenate([d[stored], rng.integers(0, 256, (m - m // 2, 32), dtype=np.uint8)])
    q[m // 2 : m // 2 + m // 5, :8] = d[0, :8]  # unknown keys that share the first 8 bytes of many stored ones
    qv = np.concatenate([views[stored], rng.integers(0, 3, m - m // 2).astype(np.int32)]) if views is not None else None
    monkeypatch.setattr(ROWINDEX, "_PREFIXED", 10**9)
    whole = index.find_digests(q, qv)
    monkeypatch.setattr(ROWINDEX, "_PREFIXED", 1)
    assert np.array_equal(index.find_digests(q, qv), whole)
    assert (whole[: m // 2] >= 0).all()  # the stored half is found
    keys = [row_key(bytes(k).hex(), None if qv is None else int(v)) for k, v in
            zip(q, qv if qv is not None else [None] * m)]
    assert np.array_equal(index.find(keys), whole)  # and as key strings


def test_segments_added_after_the_index_extend_it_as_a_rebuild_would_answer(store):
    """An extract's own commits extend the cached index (the newest segments, they lose every tie); a segment
    committed later under an older name, or a compaction, rebuilds it. Either way each key resolves as in a
    store opened afresh."""
    st, space = store
    keys = [_hash(str(i)) for i in range(40)]
    _segment(st, space, OLDER, keys[:20], 0.0)
    assert st.holds(space, keys[:1]).all()
    built, held = st._index(space)[1], st._index(space)[0][0]
    _segment(st, space, NEWER, keys[10:30], 100.0)  # overlaps the older one: its rows must not win
    later = "20200101T000002-cccccccc"
    _segment(st, space, later, keys[25:40] + keys[:2], 200.0)
    st.refresh_index()
    grown = st._index(space)[1]
    assert grown is not built and st._index(space)[0][0] is held  # extended: the older segment not read again
    fresh = featcache.open_store(st.url)
    probe = keys + [_hash("absent")]
    want = fresh.gather(space, keys, (3,), "float32")
    assert np.array_equal(st.gather(space, keys, (3,), "float32"), want)
    assert (grown.find(probe) == fresh._index(space)[1].find(probe)).all()
    assert np.array_equal(grown.winners(), fresh._index(space)[1].winners()) and len(grown) == 40
    assert want[:, 0].tolist()[:20] == [float(i) for i in range(20)]  # the oldest segment's rows
    _segment(st, space, "20191231T235959-dddddddd", keys[5:8], 300.0)  # committed late, under the oldest name
    st.refresh_index()
    assert st.gather(space, keys[5:8], (3,), "float32")[:, 0].tolist() == [300.0, 301.0, 302.0]


@pytest.mark.parametrize("case", ["random", "duplicates", "shared first bytes"])
def test_the_prefix_sort_orders_keys_as_a_stable_sort_of_whole_keys(case):
    from featcache.store.rowindex import sort_keys

    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (5000, 32), dtype=np.uint8)
    if case == "duplicates":  # the same key in several segments: the earliest position first
        raw[rng.integers(0, 5000, 800)] = raw[rng.integers(0, 5000, 800)]
    if case == "shared first bytes":  # a crafted store: keys that differ only after their first 8 bytes
        raw[::3, :8] = raw[0, :8]
    keys = raw.view("S32").reshape(len(raw))
    assert np.array_equal(sort_keys(keys, raw), np.argsort(keys, kind="stable"))
