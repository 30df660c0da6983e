"""The manifest as columns: the same digest, rows, order and set key as the row-by-row manifest before it,
no object per image while planning, and a bounded number of bytes per image."""

from __future__ import annotations

import hashlib
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import featcache
import featcache.data.columns as COLUMNS
import featcache.data.scancache as SCANCACHE
from featcache.data import Item, Manifest, scan
from featcache.data import manifest as MANIFEST
from featcache.data.columns import Paths
from featcache.keys import set_key
from tests.helpers import extract_tiny, make_folder

RACY_TEST_NS = 50_000_000


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _flat(root: Path) -> Path:
    """Three class folders with names that JSON escapes (é, a quote, a backslash), copies within a class."""
    for c in ("ant", "bée", 'q"x\\y'):
        for i in range(7):
            _write(root / c / f"{i} é.png", f"{c}:{i}".encode())
        for name in ("dup1.png", "dup2.png", "sub/dup3.png"):
            _write(root / c / name, f"dup:{c}".encode())
    return root


def _splits(root: Path) -> Path:
    """train/val class folders, one file whose bytes two classes share, an unlabelled test split."""
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            for i in range(3):
                _write(root / split / c / f"{c}{i}.jpg", f"{split}/{c}/{i}".encode())
    _write(root / "train" / "cat" / "same.jpg", b"shared")
    _write(root / "train" / "dog" / "same.jpg", b"shared")
    for i in range(2):
        _write(root / "test" / f"{i}.jpg", f"test{i}".encode())
    return root


def _row_by_row_digest(m: Manifest) -> str:
    """The manifest digest as it was computed before the columns: JSON of every Item."""
    rows = [[it.split, it.path, it.label, it.sha256] for it in m.items]
    return hashlib.sha256(json.dumps({"classes": m.classes, "rows": rows}, separators=(",", ":")).encode()).hexdigest()


def test_the_digest_is_the_one_earlier_versions_recorded(tmp_path):
    # computed by the row-by-row manifest (c4844e1) on these very folders: the digest is part of every set's
    # key, so a set recorded before the columns must be found again by a re-run
    flat = _flat(tmp_path / "flat")
    assert scan(flat, "0.6,0.2,0.2", seed=5).digest() == \
        "2a8298da820ccde82d632338a4c29897c8e3925670ec56976d619f04e9ad5f7d"
    assert scan(flat, whole=True).digest() == "262c501b9e9d97f938dcb02e6388706df211a89f9170006b8bf09e979613d5d3"
    m = scan(_splits(tmp_path / "splits"))
    assert m.digest() == "889a9efe951c7f25ed2d571fcfb5d3e6baee35300ffd2883de8e6f4eb36a17ca"
    assert [(s.path, s.reason) for s in m.skipped] == [
        ("train/dog/same.jpg", "same bytes as train/cat/same.jpg (class cat): conflicting labels")]


@pytest.mark.parametrize("block", [1, 4, 8192])
def test_the_streamed_digest_is_the_json_of_every_row(tmp_path, monkeypatch, block):
    monkeypatch.setattr(COLUMNS, "_CHUNK", block)  # rows streamed a few at a time: block edges inside the folder
    flat = _flat(tmp_path / "flat")
    for m in (scan(flat, "0.6,0.2,0.2", seed=5), scan(flat, whole=True), scan(_splits(tmp_path / "splits"))):
        assert m.digest() == _row_by_row_digest(m)


def test_the_columns_and_the_items_say_the_same(tmp_path):
    m = scan(_flat(tmp_path / "flat"), "0.6,0.2,0.2", seed=5)
    items = m.items
    assert len(m) == len(items) == 30
    assert [m.item(i) for i in range(len(m))] == items
    assert items == sorted(items, key=lambda it: (["train", "val", "test"].index(it.split), it.label, it.path))
    assert m.split_names() == ["train", "val", "test"]
    for s in m.split_names():
        assert m.items_in(s) == [it for it in items if it.split == s]
    again = Manifest.from_items(m.root, m.classes, items)
    assert again.items == items and again.digest() == m.digest()
    # copies: the first row of each content, in row order
    first = m.first_of_each()
    seen: dict[str, int] = {}
    for i, it in enumerate(items):
        seen.setdefault(it.sha256, i)
    assert first.tolist() == sorted(seen.values()) and m.distinct() == len(seen) == 24
    sub = m.select(np.array([it.split == "val" for it in items]))
    assert sub.items == m.items_in("val")


def test_paths_blob_round_trips_any_text(tmp_path):
    names = ["a.png", "é/ü.png", 'q"\\.png', "x" * 300, "日本/猫.jpg", ""]
    paths = COLUMNS.Paths.of(names)
    assert list(paths) == names and paths[1] == names[1] and paths.raw(1) == names[1].encode()
    assert list(paths.take(np.array([4, 0, 2]))) == [names[4], names[0], names[2]]


def test_a_rerun_finds_the_set_recorded_before_and_makes_no_object_per_image(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "d", splits=(("train", 3), ("val", 2)))
    store = str(tmp_path / "s.zarr")
    first = extract_tiny(data, store)
    # the key the row-by-row planner gave this folder: its digest from Items as JSON
    m = scan(data)
    old = set_key(first.space, _row_by_row_digest(m), str(Path(data).resolve()), None, None)
    assert first.set_key == old
    fs = featcache.open_store(store).get_set(first.set_key)
    for s in ("train", "val"):
        assert list(fs.hashes(s)) == [it.sha256 for it in m.items_in(s)]
        assert list(fs.paths(s)) == [it.path for it in m.items_in(s)]
        assert list(fs.labels(s)) == [it.label for it in m.items_in(s)]
        stored = fs.group[s]
        assert (stored["sha256"].dtype, stored["labels"].dtype, stored["paths_utf8"].dtype) == (np.uint8, np.int32,
                                                                                                np.uint8)

    made = []
    real = COLUMNS.Item

    class Counted(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            made.append(args[0] if args else kwargs.get("path"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(COLUMNS, "Item", Counted)
    again = extract_tiny(data, store)
    assert again.set_key == first.set_key and again.extracted == 0
    assert made == []  # nothing computed: no Item for any image
    make_folder(tmp_path / "more", splits=(("train", 1),), seed=1)
    (tmp_path / "more" / "train" / "red" / "red_0.png").rename(data / "train" / "red" / "new.png")
    third = extract_tiny(data, store)
    assert third.extracted == 1 and made == ["train/red/new.png"]  # only the image computed


@pytest.mark.slow
def test_planning_an_unchanged_folder_holds_a_few_hundred_bytes_per_image(tmp_path, monkeypatch):
    """The scan of a folder whose files the cache knows: what it holds at its peak, per image (tracemalloc
    counts Python objects and numpy arrays alike). A Path and an Item per file held about 1,500-2,500."""
    n = 10_000
    root = tmp_path / "many"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
    for i in range(n):
        split = "train" if i < 0.8 * n else "val"
        (root / split / ("a", "b")[i % 2] / f"{i:06d}.png").write_bytes(i.to_bytes(4, "little"))
    monkeypatch.setattr(SCANCACHE, "RACY_NS", RACY_TEST_NS)
    time.sleep(3 * RACY_TEST_NS / 1e9)
    scan(root)  # hashes every file and fills the cache
    tracemalloc.start()
    try:
        m = scan(root)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(m) == n and m.digest() == _row_by_row_digest(m)
    assert kept / n < 120  # the columns: 32 + 8 + 4 + 1 bytes and a path of 11 characters with its offset
    print(f"{kept / n:.0f} bytes per image kept, {peak / n:.0f} at the peak of the scan")
    assert peak / n < 600


def test_an_item_is_what_it_was():
    it = Item("train/a/0.png", "train", 0, "ab" * 32, 5)
    assert (it.path, it.split, it.label, it.sha256, it.size) == ("train/a/0.png", "train", 0, "ab" * 32, 5)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from("ab/é.0_\u4e2d"), min_size=1, max_size=12), max_size=40),
       st.integers(0, 2**32 - 1))
def test_the_manifest_order_is_split_label_then_path_bytes(names, seed):
    """The scan's order (split code, label, then the path's UTF-8 bytes), found without a Python object per
    path: the check that the walk's order already is it, and the fixed-width byte sort when it is not."""
    rng = np.random.default_rng(seed)
    paths = Paths.of(names)
    codes = rng.integers(-1, 2, len(names)).astype(np.int8)
    labels = rng.integers(-1, 3, len(names)).astype(np.int32)
    rows = np.flatnonzero(rng.random(len(names)) < 0.8)
    expected = sorted(rows.tolist(), key=lambda i: (int(codes[i]), int(labels[i]), names[i].encode("utf-8")))
    by_path = MANIFEST._by_path(paths, rows)
    assert [names[i].encode() for i in by_path] == sorted(names[i].encode() for i in rows)
    got = by_path[np.lexsort((labels[by_path], codes[by_path]))]
    assert [(codes[i], labels[i], names[i]) for i in got] == [(codes[i], labels[i], names[i]) for i in expected]
    assert MANIFEST._in_order(paths, rows, codes, labels) == (
        [(codes[i], labels[i], names[i].encode()) for i in rows] == [(codes[i], labels[i], names[i].encode())
                                                                     for i in expected])
    ordered = np.array(expected, dtype=np.int64)
    assert MANIFEST._in_order(paths, ordered, codes, labels)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=6), min_size=1, max_size=4),
       st.dictionaries(st.sampled_from(["train", "val", "test"]),
                       st.lists(st.tuples(st.text(max_size=10), st.integers(-1, 5), st.text(max_size=3)), max_size=20)))
def test_a_sets_view_digest_streamed_is_the_json_it_always_hashed(classes, splits):
    """The set's view check streams the text a block at a time (no list per row): the same SHA-256 as
    ``json.dumps`` of the whole, for any names (quotes, backslashes, non-ASCII)."""
    from featcache.store.sets import _view_digest

    arrays = {s: (np.array([y for _, y, _ in rows], dtype=np.int32), [p for p, _, _ in rows],
                  np.array([x for _, _, x in rows], dtype=object)) for s, rows in splits.items()}
    rows = [[s, p, int(y), x] for s, (labels, paths, hashes) in arrays.items()
            for y, p, x in zip(labels.tolist(), paths, hashes.tolist())]
    want = hashlib.sha256(json.dumps({"classes": classes, "rows": rows}, separators=(",", ":")).encode()).hexdigest()
    assert _view_digest(classes, arrays) == want
