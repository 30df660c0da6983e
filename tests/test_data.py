from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featcache.config import parse_split
from featcache.data import load_rgb, scan
from featcache.errors import DataError

from .helpers import make_folder


def test_scan_split_layout(folder: Path):
    m = scan(folder)
    assert m.classes == ["blue", "green", "red"]
    assert m.split_names() == ["train", "val"]
    assert len(m.items_in("train")) == 24 and len(m.items_in("val")) == 12
    assert all(len(it.sha256) == 64 and it.size > 0 for it in m.items)
    assert m.items_in("val")[0].path.startswith("val/blue/")


def test_valid_is_an_alias_of_val(tmp_path: Path):
    make_folder(tmp_path / "d", splits=(("train", 2), ("valid", 2)))
    assert scan(tmp_path / "d").split_names() == ["train", "val"]


def test_flat_folder_needs_split_and_is_stratified_and_seeded(tmp_path: Path):
    root = make_folder(tmp_path / "flat", splits=(("", 10),))
    with pytest.raises(DataError, match=r"--split 0\.8,0\.2"):
        scan(root)
    a = scan(root, "0.8,0.2", seed=1)
    b = scan(root, "0.8,0.2", seed=1)
    c = scan(root, "0.8,0.2", seed=2)
    assert [(i.path, i.split) for i in a.items] == [(i.path, i.split) for i in b.items]
    assert [(i.path, i.split) for i in a.items] != [(i.path, i.split) for i in c.items]
    for label in range(3):
        assert sum(1 for i in a.items_in("train") if i.label == label) == 8
        assert sum(1 for i in a.items_in("val") if i.label == label) == 2
    three = scan(root, "0.6,0.2,0.2", seed=0)
    assert three.split_names() == ["train", "val", "test"]


@pytest.mark.parametrize("text", ["0.8", "0.5,0.6", "a,b", "0,1", "0.2,0.2,0.2,0.4"])
def test_bad_split_fractions(text):
    with pytest.raises(DataError, match="split takes two or three"):
        parse_split(text)


def test_errors_for_empty_missing_and_mismatched_folders(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        scan(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        scan(tmp_path / "empty")
    root = make_folder(tmp_path / "d", splits=(("train", 2), ("val", 2)))
    (root / "train" / "purple").mkdir()
    with pytest.raises(DataError, match="class folders differ between train and val: only in train: \\['purple'\\]"):
        scan(root)
    (root / "val" / "purple").mkdir()
    with pytest.raises(DataError, match=r"no readable images in .*train: purple"):
        scan(root)


def test_non_images_and_hidden_files_are_left_out(folder: Path):
    (folder / "train" / "red" / "notes.txt").write_text("hello")
    (folder / "train" / "red" / ".DS_Store").write_bytes(b"\0\0")
    (folder / "train" / "red" / "empty.jpg").write_bytes(b"")
    m = scan(folder)
    assert [s.path for s in m.ignored] == ["train/red/notes.txt"]
    assert [(s.path, s.reason) for s in m.skipped] == [("train/red/empty.jpg", "empty file (0 bytes)")]
    assert len(m.items_in("train")) == 24


def test_load_rgb_converts_every_mode(tmp_path: Path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red but fully transparent → white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert load_rgb(tmp_path / "a.png").getpixel((0, 0)) == (255, 255, 255)

    Image.new("L", (3, 3), 100).save(tmp_path / "g.png")
    assert load_rgb(tmp_path / "g.png").getpixel((1, 1)) == (100, 100, 100)

    Image.new("CMYK", (3, 3), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = load_rgb(tmp_path / "c.jpg").getpixel((1, 1))
    assert r > 200 and g < 60 and b < 60

    Image.fromarray(np.full((3, 3), 65535, np.uint16)).save(tmp_path / "d.png")
    assert load_rgb(tmp_path / "d.png").getpixel((0, 0)) == (255, 255, 255)

    pal = Image.new("P", (3, 3), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.save(tmp_path / "p.gif")
    assert load_rgb(tmp_path / "p.gif").mode == "RGB"

    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(OSError, match="cannot identify image file"):
        load_rgb(tmp_path / "bad.jpg")


def test_adding_images_to_a_flat_folder_moves_few_existing_images(tmp_path):
    root = make_folder(tmp_path / "flat", splits=(("", 10),))
    before = {i.path: i.split for i in scan(root, "0.8,0.2", seed=3).items}
    make_folder(tmp_path / "more", splits=(("", 3),), seed=9)
    for f in (tmp_path / "more").rglob("*.png"):
        f.rename(root / f.parent.name / f"new_{f.name}")
    after = {i.path: i.split for i in scan(root, "0.8,0.2", seed=3).items}
    moved = sum(1 for p, s in before.items() if after[p] != s)
    assert moved <= 3 * 3  # at most the number added per class, only next to the cut
    assert sum(1 for s in after.values() if s == "val") == 3 * 3  # round(0.2 * 13) per class


def test_tiny_classes_still_get_one_image_per_split(tmp_path):
    root = make_folder(tmp_path / "flat", splits=(("", 3),))
    m = scan(root, "0.9,0.05,0.05")
    for label in range(3):
        assert [i.split for i in m.items if i.label == label].count("test") == 1
    two = make_folder(tmp_path / "two", splits=(("", 2),))
    with pytest.raises(DataError, match="cannot split class with 2 image"):
        scan(two, "0.6,0.2,0.2")
