"""Datasets as people download them, each rebuilt in miniature: what extract records, that fit
runs on it, and each refusal as one ``Error:`` line with the fix."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import featcache
from featcache.cli import main
from featcache.config import ExtractConfig
from featcache.data import DECODE_RECIPE, ImageTooLarge, decode_bytes, load_rgb, scan

from .helpers import TINY, extract_tiny

COLOURS = {"cat": (220, 40, 40), "dog": (40, 40, 220), "ant": (40, 200, 40), "bee": (200, 200, 40)}
REPO = Path(__file__).resolve().parents[1]


def _image(path: Path, colour=(128, 128, 128), seed: int = 0, size=(24, 30)) -> Path:
    rng = np.random.default_rng(zlib.crc32(f"{'/'.join(path.parts[-4:])}:{seed}".encode()))  # same on every run
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.clip(np.array(colour) + rng.integers(-30, 30, size + (3,)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _images(folder: Path, name: str, n: int, pattern: str = "{name}.{i}.jpg", colour=None) -> None:
    for i in range(n):
        _image(folder / pattern.format(name=name, i=i), colour or COLOURS.get(name.rstrip("s"), (128, 128, 128)))


def _set(store):
    return featcache.open_store(str(store)).get_set()


def _fits(store, tmp_path) -> dict:
    return featcache.fit(head="logreg", store=str(store), runs=str(tmp_path / "runs"), plots=False).metrics


def _cli(*args):
    return CliRunner().invoke(main, ["extract", "--backbone", TINY, "--weights", "none", "--workers", "0", *args],
                              catch_exceptions=False)


def _last_error(result) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    return result.output.strip().splitlines()[-1]


@pytest.fixture
def catdog(tmp_path) -> Path:
    """Kaggle "cat-and-dog": training_set/training_set/{cats,dogs}, test_set/test_set/{cats,dogs}."""
    root = tmp_path / "catdog"
    for split, n in (("training_set", 6), ("test_set", 2)):
        for cls in ("cats", "dogs"):
            _images(root / split / split / cls, cls, n, "{i}.jpg")
    return root


@pytest.fixture
def dvc(tmp_path) -> Path:
    """Kaggle "Dogs vs. Cats": train/cat.0.jpg, train/dog.0.jpg, unlabelled test1/1.jpg."""
    root = tmp_path / "dvc"
    for cls in ("cat", "dog"):
        _images(root / "train", cls, 6)
    _images(root / "test1", "x", 3, "{i}.jpg")
    return root


def test_kaggle_cat_and_dog_split_folders_wrapping_themselves(catdog, tmp_path):
    store = tmp_path / "s.zarr"
    r = extract_tiny(catdog, store, split="0.8,0.2")
    fs = _set(store)
    assert fs.classes == ["cats", "dogs"] and r.splits == {"train": 10, "val": 2, "test": 4}
    assert fs.paths("test")[0] == "test_set/test_set/cats/0.jpg"
    assert fs.labels("test").tolist() == [0, 0, 1, 1] and fs.unlabelled == []
    assert set(_fits(store, tmp_path)) == {"train", "val", "test"}
    assert extract_tiny(catdog, tmp_path / "t.zarr").splits == {"train": 12, "test": 4}  # no --split: no val


def test_the_layout_line_comes_before_the_work(catdog, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _cli("--data", str(catdog), "--store", "s.zarr")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == ("layout: split folders training_set/training_set (train), test_set/test_set (test); "
                        "2 classes: cats, dogs")
    assert lines[-3].startswith("set ") and lines[-2].startswith("time: ") and lines[-1].startswith("next: featcache fit --set ")


def test_dogs_vs_cats_labels_from_names_and_an_unlabelled_test_split(dvc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _cli("--data", "dvc", "--labels-from-name", "--split", "0.8,0.2", "--store", "s.zarr")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == (
        "layout: split folders train (train), test1 (test, unlabelled); labels from file names (^([^._]+)[._]); "
        "val carved out of train by --split 0.8,0.2 (seed 0); 2 classes: cat, dog")
    fs = _set(tmp_path / "s.zarr")
    assert fs.classes == ["cat", "dog"] and fs.splits == ["train", "val", "test"]
    assert fs.unlabelled == ["test"] and fs.attrs["unlabelled"] == ["test"]
    assert fs.labels("test").tolist() == [-1, -1, -1]
    assert sorted(fs.paths("test")) == ["test1/0.jpg", "test1/1.jpg", "test1/2.jpg"]
    assert all(p.split("/")[1].startswith(("cat.", "dog.")) for p in fs.paths("train"))
    assert [fs.classes[y] for y in fs.labels("val")] == [p.split("/")[1].split(".")[0] for p in fs.paths("val")]
    assert set(_fits(tmp_path / "s.zarr", tmp_path)) == {"train", "val"}  # no metrics on unlabelled images


def test_labels_from_name_with_a_regular_expression(tmp_path):
    root = tmp_path / "named"
    for cls in ("ant", "bee"):
        _images(root, cls, 5, "img-{i}-{name}.png")
    m = scan(root, "0.6,0.4", labels_from_name=r"-(\w+)\.png$")
    assert m.classes == ["ant", "bee"] and len(m.items_in("train")) == 6 and len(m.items_in("val")) == 4


def test_caltech_wrapper_folder_and_an_excluded_class(tmp_path):
    root = tmp_path / "caltech"
    for cls in ("ant", "bee", "cat", "BACKGROUND_Google"):
        _images(root / "101_ObjectCategories" / cls, cls, 5, "image_{i:04d}.jpg")
    store = tmp_path / "s.zarr"
    extract_tiny(root, store, split="0.8,0.2", exclude_class=("BACKGROUND_Google",))
    fs = _set(store)
    assert fs.classes == ["ant", "bee", "cat"] and fs.attrs["splits"] == {"train": 12, "val": 3}
    assert all(p.startswith(("101_ObjectCategories/ant/image_", "101_ObjectCategories/bee/image_",
                             "101_ObjectCategories/cat/image_")) for p in fs.paths("train"))
    assert _fits(store, tmp_path)["val"]["n"] == 3
    m = scan(root, "0.8,0.2", classes="ant,cat")
    assert m.classes == ["ant", "cat"] and {it.label for it in m.items} == {0, 1}
    assert m.describe() == ("layout: class folders in 101_ObjectCategories; split 0.8,0.2 (seed 0); 2 classes: ant, "
                            "cat; excluded: BACKGROUND_Google, bee")


def test_a_csv_of_labels_found_beside_the_images(tmp_path):
    root = tmp_path / "csvset"
    rows = []
    for cls in ("cat", "dog"):
        for i in range(5):
            _image(root / "images" / f"{cls}{i}.jpg", COLOURS[cls])
            rows.append([f"images/{cls}{i}.jpg", cls])
    _image(root / "images" / "stray.jpg")
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], *rows])
    store = tmp_path / "s.zarr"
    extract_tiny(root, store, split="0.6,0.4")
    fs = _set(store)
    assert fs.classes == ["cat", "dog"] and fs.attrs["splits"] == {"train": 6, "val": 4}
    assert fs.attrs["ignored"] == [{"path": "images/stray.jpg", "reason": "not listed in labels.csv"}]
    assert _fits(store, tmp_path)["val"]["n"] == 4


def test_hugging_face_metadata_csv_given_with_labels_and_split_folders(tmp_path):
    root = tmp_path / "hf"
    for split, n in (("train", 4), ("test", 2)):
        with_rows = [["file_name", "label"]]
        for cls in ("ant", "bee"):
            for i in range(n):
                _image(root / split / f"{cls}_{i}.png", COLOURS[cls])
                with_rows.append([f"{split}/{cls}_{i}.png", cls if split == "train" else ""])
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(with_rows)
    merged = root / "all.csv"
    merged.write_text((root / "train.csv").read_text() + "".join((root / "test.csv").read_text().splitlines(True)[1:]))
    m = scan(root, labels=merged)
    assert m.classes == ["ant", "bee"] and m.split_names() == ["train", "test"] and m.unlabelled == ["test"]
    assert m.items_in("train")[0].path == "train/ant_0.png"


def test_labelled_train_and_val_with_a_test_folder_of_loose_images(tmp_path):
    root = tmp_path / "d"
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("ant", "bee"):
            _images(root / split / cls, cls, n)
    _images(root / "test", "x", 3, "{i}.png")
    (root / "README.txt").write_text("downloaded from somewhere")
    _image(root / "train" / "loose.jpg")
    store = tmp_path / "s.zarr"
    extract_tiny(root, store)
    fs = _set(store)
    assert fs.unlabelled == ["test"] and fs.attrs["splits"] == {"train": 8, "val": 4, "test": 3}
    assert {d["path"] for d in fs.attrs["ignored"]} == {"README.txt", "train/loose.jpg"}
    assert set(_fits(store, tmp_path)) == {"train", "val"}


def test_a_store_inside_the_data_folder_is_never_data(tmp_path, monkeypatch):
    root = tmp_path / "data"
    for cls in ("ant", "bee"):
        _images(root / cls, cls, 5)
    monkeypatch.chdir(tmp_path)
    first = _cli("--split", "0.8,0.2", "--store", "data/featcache.zarr")
    again = _cli("--split", "0.8,0.2", "--store", "data/featcache.zarr")
    assert first.exit_code == 0 and again.exit_code == 0, again.output
    assert "nothing to compute" in again.output and "ignored" not in again.output.splitlines()[0]


@pytest.mark.parametrize("build,args,error", [
    (lambda r: [_images(r / "train" / c, c, 2) for c in ("ant", "bee")] + [_images(r / s / c, c, 2)
                                                                           for s in ("val", "valid") for c in ("ant", "bee")],
     [], "Error: two folders for the val split in {r}: val/ and valid/. Keep one: merge them, or move or rename the "
         "other so that it is not read as a split."),
    (lambda r: [_images(r / "train" / s / c, c, 2) for s in ("training_set", "test_set") for c in ("ant", "bee")],
     [], "Error: class folders in {r}/train look like split folders: test_set, training_set. Pass the folder that "
         "holds the split folders as --data, or rename these class folders."),
    (lambda r: _images(r / "cats", "cat", 3),
     ["--split", "0.8,0.2"], "Error: only one class folder (cats) in {r}: a classifier needs at least 2; add a folder "
                             "per class."),
    (lambda r: [_images(r / "photos" / c, c, 2) for c in ("ant", "bee")] + [_image(r / "photos" / "x.jpg")],
     ["--split", "0.8,0.2"], "Error: only one class folder (photos) in {r}: a classifier needs at least 2; pass the "
                             "folder that holds the class folders: --data {r}/photos."),
    (lambda r: [_images(r / "train", c, 4) for c in ("cat", "dog")],
     [], "Error: no class folders in {r}/train: its 8 images are not sorted into class folders, but their names give "
         "the labels cat, dog. Add --labels-from-name to use them."),
    (lambda r: [_images(r / c, c, 2) for c in ("ant", "bee")],
     [], "Error: {r} has class folders but no train/ and val/ folders. Pass --split 0.8,0.2 (or train,val,test "
         "fractions) to split it."),
    (lambda r: [_images(r / s / c, c, 2) for s in ("train", "val") for c in ("ant", "bee")],
     ["--split", "0.8,0.2"], "Error: Invalid value for '--split': {r} already has train and val splits; --split "
                             "carves val out of train only when there is no val. Drop --split."),
    (lambda r: [_images(r / s / c, c, 3) for s in ("train", "test") for c in ("ant", "bee")],
     ["--split", "0.6,0.2,0.2"], "Error: Invalid value for '--split': {r} already has a test split; give two "
                                 "fractions (train,val) to carve only val out of train, e.g. --split 0.8,0.2."),
    (lambda r: [_images(r / c, c, 3) for c in ("ant", "bee")],
     ["--split", "0.8,0.2", "--classes", "ant,wasp"], "Error: Invalid value for '--classes': --classes wasp: no such "
                                                       "class here. Classes found: ant, bee"),
    (lambda r: [_images(r / c, c, 3) for c in ("ant", "bee")],
     ["--split", "0.8,0.2", "--exclude-class", "bee"], "Error: Invalid value for '--exclude-class': --exclude-class "
                                                        "leaves 1 of 2 classes (ant); a classifier needs at least 2"),
], ids=["val-and-valid", "split-named-classes", "one-class", "one-class-wrapping-classes", "names-not-folders",
        "flat-without-split", "split-with-val", "three-fractions-with-test", "unknown-class", "excluded-to-one"])
def test_refusals_are_one_error_line_with_the_fix(tmp_path, monkeypatch, build, args, error):
    root = tmp_path / "d"
    build(root)
    monkeypatch.chdir(tmp_path)
    r = _cli("--data", "d", "--store", "s.zarr", *args)
    assert _last_error(r) == error.format(r="d")
    assert not (tmp_path / "s.zarr").exists()


def _run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def _two_classes(root: Path) -> Path:
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("ant", "bee"):
            _images(root / split / cls, cls, n)
    return root


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifos_devices_and_undecodable_names_are_skipped_without_hanging(tmp_path):
    root = _two_classes(tmp_path / "d")
    os.mkfifo(root / "train" / "ant" / "pipe.jpg")
    (root / "train" / "ant" / "zero.png").symlink_to("/dev/zero")
    bad = os.fsencode(root / "train" / "bee") + b"/caf\xe9.jpg"
    with open(bad, "wb") as f:
        f.write((root / "train" / "bee" / "bee.0.jpg").read_bytes())
    r = _run_python(f"""
        import json, featcache
        r = featcache.extract(backbone={TINY!r}, data={str(root)!r}, store={str(tmp_path / 's.zarr')!r},
                              weights="none", workers=0)
        print(json.dumps([s.to_dict() for s in r.skipped]))
    """, timeout=90)
    assert r.returncode == 0, r.stderr
    skipped = {d["path"]: d["reason"] for d in json.loads(r.stdout.splitlines()[-1])}
    assert skipped == {"train/ant/pipe.jpg": "not a regular file (FIFO)",
                       "train/ant/zero.png": "not a regular file (character device)",
                       "train/bee/caf\\xe9.jpg": "name is not valid UTF-8; rename it to include it"}


def test_an_extreme_aspect_ratio_is_skipped_within_bounded_memory(tmp_path):
    root = _two_classes(tmp_path / "d")
    Image.new("L", (1, 70000), 128).save(root / "train" / "ant" / "strip.png")  # a few hundred bytes on disk
    extract = textwrap.dedent(f"""
        import json, featcache
        r = featcache.extract(backbone={TINY!r}, data={str(root)!r}, store={str(tmp_path / 's.zarr')!r},
                              weights="none", workers=0)
        print(json.dumps([s.to_dict() for s in r.skipped]))
    """)
    # The extract runs as the child of a small fresh process: a child forked straight from this (large)
    # test process would inherit its peak RSS into ru_maxrss.
    r = _run_python(f"""
        import resource, subprocess, sys
        done = subprocess.run([sys.executable, "-c", {extract!r}], capture_output=True, text=True)
        sys.stderr.write(done.stderr)
        print(done.stdout.strip())
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    """)
    assert r.returncode == 0, r.stderr
    skipped, peak = r.stdout.splitlines()[-2:]
    assert json.loads(skipped) == [{"path": "train/ant/strip.png", "reason": (
        "cannot decode: ImageTooLarge: extreme aspect ratio: 1x70000 resized to a short side of 256 would be 4588 "
        "Mpixel, over the budget of 64 Mpixel")}]
    peak_bytes = int(peak) * (1 if sys.platform == "darwin" else 1024)
    assert peak_bytes < 1.5e9, peak_bytes  # the resize alone would need over 13 GB


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :10] = (255, 0, 0)  # stored: red on the left, blue on the right
    pixels[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    img = load_rgb(tmp_path / "phone.jpg")
    assert img.size == (10, 20)  # upright: portrait
    top, bottom = img.getpixel((5, 2)), img.getpixel((5, 17))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    assert np.array_equal(np.asarray(decode_bytes((tmp_path / "phone.jpg").read_bytes())), np.asarray(img))
    assert DECODE_RECIPE["exif_transpose"] is True


def test_the_pixel_budget_is_checked_before_decoding(tmp_path):
    Image.new("1", (9000, 9000)).save(tmp_path / "big.png")
    with pytest.raises(ImageTooLarge, match="image too large: 9000x9000 is 81 Mpixel, over the budget of 80 Mpixel"):
        load_rgb(tmp_path / "big.png")


def test_the_decode_recipe_is_part_of_the_space(tmp_path):
    root = _two_classes(tmp_path / "d")
    extract_tiny(root, tmp_path / "s.zarr")
    assert _set(tmp_path / "s.zarr").attrs["space_provenance"]["decode"] == DECODE_RECIPE


def test_layout_options_round_trip_through_the_config():
    cfg = ExtractConfig(backbone=TINY, labels="labels.csv", labels_from_name=r"(\w+)-", classes="a,b",
                        exclude_class=("c",))
    assert cfg.classes == ("a", "b") and cfg.exclude_class == ("c",)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["classes"] == ["a", "b"] and d["exclude_class"] == ["c"]
    assert ExtractConfig.from_dict(d) == cfg


def test_status_reads_the_folder_with_the_same_layout_options(dvc, tmp_path):
    store = tmp_path / "s.zarr"
    extract_tiny(dvc, store, labels_from_name=r"^([^._]+)[._]", split="0.8,0.2")
    st = featcache.status(featcache.open_store(str(store), mode="r"), data=str(dvc))
    assert st.up_to_date, st.summary()


def test_the_walk_holds_one_folders_names_at_a_time_and_finds_what_it_found(tmp_path):
    """Each folder's listing is encoded as soon as it is sorted: 20,000 files in 8 class folders (and nested
    folders) are listed holding one folder's strings at most, not a string per file below, in the same order."""
    import tracemalloc

    from featcache.data.layouts import find_layout
    from featcache.data.paths import Paths
    from featcache.data.walk import Finder

    root = tmp_path / "d"
    expected: dict[str, list[str]] = {}
    for c in range(8):
        folder = root / "train" / f"class{c}"
        (folder / "inner").mkdir(parents=True)
        names = [f"train/class{c}/{i:05d}.png" for i in range(2400)]
        names += [f"train/class{c}/inner/{i:03d}.jpg" for i in range(100)]  # a folder's own images come first
        for n in names:
            (root / n).touch()
        expected[f"class{c}"] = names
    tracemalloc.start()
    try:
        got = Finder(root).images_below(root / "train")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(got, Paths) and list(got) == [n for c in range(8) for n in expected[f"class{c}"]]
    # the folders' blobs joined once (about 2 x 33 bytes a file) and one folder's 2,400 strings; a string per
    # file below, with its list, is about 80 bytes a file (1.63 MB here, measured on the walk that held them)
    assert peak < 1_400_000, peak
    layout = find_layout(root)
    assert [(s, list(files)) for s, _, files in layout.files] == [("train", expected[f"class{c}"]) for c in range(8)]
