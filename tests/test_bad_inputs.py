"""A corpus of bad and odd inputs: each is skipped with its reason or is a clear error."""

import io
import os
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import featcache
from featcache.cli import main
from featcache.data import safe_join, scan
from featcache.errors import DataError, StoreError
from featcache.store import SetRecord
from featcache.store.groups import digest_values

from .helpers import TINY, make_folder


@pytest.fixture
def corpus(tmp_path):
    root = make_folder(tmp_path / "data")
    red = root / "train" / "red"
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(jpeg, "JPEG")
    (red / "zero.jpg").write_bytes(b"")
    (red / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (red / "random.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    Image.fromarray(np.full((8, 8), 50000, np.uint16)).save(red / "sixteen.png")
    Image.new("CMYK", (8, 8), (0, 200, 200, 0)).save(red / "cmyk.jpg")
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 0, 0] * 256)
    pal.save(red / "palette.png", transparency=0)
    Image.new("RGB", (1, 1), (210, 40, 40)).save(red / "one pixel ü.png")
    (red / "notes.txt").write_text("not an image")
    (red / ".DS_Store").write_bytes(b"\0\1")
    os.symlink(red / "loop_b.jpg", red / "loop_a.jpg")
    os.symlink(red / "loop_a.jpg", red / "loop_b.jpg")
    (root / "train" / "blue" / "copy_of_red.png").write_bytes((red / "red_0.png").read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        Image.new("1", (20000, 20000)).save(red / "bomb.png")  # 400 Mpixel: over Pillow's bomb limit
    return root


def test_corpus_is_skipped_with_reasons_and_nothing_stored_is_lost(corpus, tmp_path):
    store = str(tmp_path / "s.zarr")
    clean = make_folder(tmp_path / "clean", seed=5)
    before = featcache.extract(backbone=TINY, data=str(clean), store=store, weights="none", workers=0)
    r = featcache.extract(backbone=TINY, data=str(corpus), store=store, weights="none", workers=0)
    reasons = {s.path.split("/")[-1]: s.reason for s in r.skipped}
    assert reasons["zero.jpg"] == "empty file (0 bytes)"
    assert reasons["truncated.jpg"].startswith("cannot decode")
    assert reasons["random.jpg"] == ("cannot decode: UnidentifiedImageError: not an image in a format Pillow reads "
                                     "(the file's first bytes match none)")  # no <_io.BytesIO object at 0x...>
    assert reasons["bomb.png"].startswith("cannot decode: DecompressionBombError")
    assert reasons["loop_a.jpg"].startswith("cannot read") and reasons["loop_b.jpg"].startswith("cannot read")
    # the first copy in class order is kept, later copies with another label are skipped
    assert reasons["red_0.png"] == "same bytes as train/blue/copy_of_red.png (class blue): conflicting labels"
    fs = featcache.open_store(store).get_set(r.set_key)
    kept = {p.split("/")[-1] for p in fs.paths("train")}
    assert {"sixteen.png", "cmyk.jpg", "palette.png", "one pixel ü.png"} <= kept
    assert "notes.txt" not in kept and ".DS_Store" not in kept
    assert {d["path"].split("/")[-1] for d in fs.attrs["skipped"]} == set(reasons)
    assert fs.attrs["ignored"] == [{"path": "train/red/notes.txt", "reason": "not an image file (extension)"}]
    old = featcache.open_store(store).get_set(before.set_key)
    assert old.to_numpy("train")[0].shape == (24, 32)

    runner = CliRunner()
    res = runner.invoke(main, ["extract", "--backbone", TINY, "--weights", "none", "--data", str(corpus),
                               "--store", store, "--workers", "0", "--strict"])
    assert res.exit_code == 1 and res.output.splitlines()[-1].startswith("Error: ") and "Traceback" not in res.output
    assert featcache.open_store(store).set_keys() == [before.set_key, r.set_key]


def test_unreadable_file(corpus, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    f = corpus / "train" / "red" / "red_1.png"
    f.chmod(0)
    assert any(s.path.endswith("red_1.png") and s.reason.startswith("cannot read") for s in scan(corpus).skipped)


@pytest.mark.parametrize("rel", ["../etc/passwd", "/etc/passwd", "a/../../b", "", "x\0y"])
def test_stored_paths_never_leave_the_data_root(tmp_path, rel):
    with pytest.raises(DataError, match="refusing stored path"):
        safe_join(tmp_path, rel)


def test_links_the_named_folder_holds_are_followed_but_stored_paths_stay_plain(tmp_path):
    # The folder is one the user named: its links are theirs (extract follows them too); what a
    # store can steer is only the relative path, and that never climbs out.
    (tmp_path / "root").mkdir()
    os.symlink("/etc", tmp_path / "root" / "link")
    assert safe_join(tmp_path / "root", "link/passwd") == tmp_path / "root" / "link" / "passwd"
    for rel in ("link/../../x", "/etc/passwd", "link/../.."):
        with pytest.raises(DataError, match="refusing stored path"):
            safe_join(tmp_path / "root", rel)


def test_verify_follows_a_folder_of_links_into_an_image_pool(tmp_path):
    pool = make_folder(tmp_path / "pool")
    data = tmp_path / "data"
    for f in (pool / "train").rglob("*.png"):  # every training image a link into the pool
        (data / f.parent.relative_to(pool)).mkdir(parents=True, exist_ok=True)
        os.symlink(f, data / f.relative_to(pool))
    os.symlink(pool / "val", data / "val")  # and the val split a linked folder
    store = str(tmp_path / "s.zarr")
    featcache.extract(backbone=TINY, data=str(data), store=store, weights="none", workers=0)
    r = CliRunner().invoke(main, ["verify", "--store", store, "--data", str(data), "--sample", "36", "--backbone", TINY])
    assert r.exit_code == 0, r.output
    assert "OK" in r.output and "36 recomputed" in r.output


H = "ab" * 32
GOOD = {
    "key": "0123456789ab", "classes": ["a", "b"], "splits": {"train": 2, "val": 1}, "space": "0123456789abcdef",
    "space_provenance": {"shape": [4], "dtype": "float16", "precision": "float32"}, "dtype": "float16",
    "precision": "float32", "backbone": "x", "layer": "y", "pool": "none", "weights": {"id": "w", "sha256": H},
    "preprocessing": {}, "created_at": "2026-01-01", "created_by": "u@h", "data_root": "/d", "layout": "splits",
    "split_fractions": None, "split_seed": None, "manifest_sha256": H, "views": 0, "view_space": None,
    "augment": None, "skipped": [], "ignored": [], "config": {}, "versions": {}, "unlabelled": [],
    "integrity": {s: {"sha256": H, "labels": H, "paths_utf8": H, "paths_offsets": H} for s in ("train", "val")},
    "summary": {"total_bytes": 9, "own_bytes": 4, "rows_bytes": 5, "segments": 1},
}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(GOOD)), value=json_values)
def test_malformed_set_attributes_are_store_errors(field, value):
    SetRecord.from_attrs("k", GOOD)
    attrs = {**GOOD, field: value}
    try:
        SetRecord.from_attrs("k", attrs)
    except StoreError as e:
        message = str(e)
    else:
        return  # a value that happens to be valid for the field
    assert "malformed attribute" in message and message.startswith("set k ")


def test_labels_out_of_range_are_refused(tmp_path):
    folder = make_folder(tmp_path / "d")
    store = str(tmp_path / "s.zarr")
    r = featcache.extract(backbone=TINY, data=str(folder), store=store, weights="none", workers=0)
    fs = featcache.open_store(store).get_set(r.set_key)
    fs.group["train"]["labels"][0] = 99
    with pytest.raises(StoreError, match="differs from its integrity record"):
        featcache.open_store(store).get_set(r.set_key).labels("train")
    # a hostile writer who also rewrites the digest still gets no label outside the classes through
    integrity = fs.group.attrs["integrity"]
    integrity["train"]["labels"] = digest_values(fs.group["train"]["labels"][:])
    fs.group.attrs["integrity"] = integrity
    with pytest.raises(StoreError, match="labels outside"):
        featcache.open_store(store).get_set(r.set_key).labels("train")


arrays = st.one_of(
    st.lists(st.integers(-5, 10), max_size=30).map(lambda v: np.array(v, dtype=np.int64)),
    st.lists(st.floats(allow_nan=True, width=32), max_size=30).map(lambda v: np.array(v, dtype=np.float32)),
    st.lists(st.text(max_size=70), max_size=30).map(lambda v: np.array(v, dtype=str)),
    st.lists(st.sampled_from(["a" * 64, "0" * 64, "../x", ""]), max_size=30).map(lambda v: np.array(v, dtype=str)),
    st.lists(st.integers(0, 255), max_size=30 * 32).map(lambda v: np.array(v[: len(v) // 32 * 32], np.uint8).reshape(-1, 32)),
    st.lists(st.integers(0, 255), max_size=90).map(lambda v: np.array(v, dtype=np.uint8)),
)


@pytest.fixture(scope="module")
def damaged_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("damaged")
    folder = make_folder(tmp / "d")
    store = str(tmp / "s.zarr")
    key = featcache.extract(backbone=TINY, data=str(folder), store=store, weights="none", workers=0).set_key
    return store, key


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(["labels", "paths_utf8", "paths_offsets", "sha256"]), values=arrays)
def test_malformed_set_arrays_are_store_errors(damaged_store, name, values):
    store, key = damaged_store
    group = featcache.open_store(store).get_set(key).group["val"]
    original = group[name][:]
    try:
        del group[name]
        arr = group.create_array(name, shape=values.shape, dtype=str if values.dtype.kind == "U" else values.dtype,
                                 chunks=(max(len(values), 1),) + values.shape[1:])
        if len(values):
            arr[:] = values
        fs = featcache.open_store(store).get_set(key)
        for read in (lambda: fs.labels("val"), lambda: fs.paths("val"), lambda: fs.hashes("val"), lambda: fs.features("val")):
            try:
                read()
            except StoreError:
                pass
    finally:
        del group[name]
        group.create_array(name, shape=original.shape, dtype=original.dtype,
                           chunks=(max(len(original), 1),) + original.shape[1:])[...] = original
