import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import featcache
from featcache.backbones import create_backbone
from featcache.config import FitConfig
from featcache.data import load_rgb
from featcache.errors import AmbiguousSet, DataError, SetNotFound, StoreError
from featcache.tails import load_head

from .helpers import TINY, extract_tiny, make_folder


def test_extract_stores_features_labels_paths_and_provenance(folder, store_url):
    r = extract_tiny(folder, store_url, layer="features")
    assert (r.extracted, r.reused, r.splits) == (36, 0, {"train": 24, "val": 12})
    fs = featcache.open_store(store_url).get_set()
    x, y = fs.to_numpy("train")
    assert x.shape == (24, 16, 16, 16) and x.dtype == np.float32 and fs.features("train").dtype == np.float16
    assert y.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert fs.paths("val")[0] == "val/blue/blue_0.png"
    assert fs.classes == ["blue", "green", "red"]
    a = fs.attrs
    assert a["backbone"] == TINY and a["layer"] == "features" and a["dtype"] == "float16"
    assert a["weights"]["id"] == f"{TINY}()" and len(a["weights"]["sha256"]) == 64
    assert a["preprocessing"]["crop_size"] == [32]
    assert {"torch", "torchvision", "zarr", "featcache"} <= set(a["versions"])
    assert len(a["manifest_sha256"]) == 64 and a["created_by"]
    # the stored rows are what the frozen network computes for those files
    b = create_backbone(TINY, layer="features", weights="none")
    img = b.transform(load_rgb(folder / fs.paths("train")[3]))[None]
    with torch.no_grad():
        want = b.model(img)[0].numpy()
    np.testing.assert_allclose(x[3].astype(np.float32), want, rtol=1e-2, atol=1e-3)


def test_identical_rerun_is_a_cache_hit(folder, store_url):
    first = extract_tiny(folder, store_url)
    again = extract_tiny(folder, store_url)
    assert again.extracted == 0 and again.reused == 36
    assert again.set_key == first.set_key
    assert "nothing to compute (36 rows reused)" in again.summary()
    assert featcache.open_store(store_url).set_keys() == [first.set_key]


def test_same_images_elsewhere_reuse_rows_and_new_ones_are_extracted(folder, store_url, tmp_path):
    extract_tiny(folder, store_url)
    other = make_folder(tmp_path / "other", splits=(("train", 10), ("val", 4)))  # same seed: first 8 per class equal
    r = extract_tiny(other, store_url)
    assert r.extracted > 0 and r.reused > 0 and r.extracted + r.reused == 42


def test_float32_and_pooling_options(folder, store_url):
    extract_tiny(folder, store_url, layer="features", pool="max", dtype="float32")
    x, _ = featcache.open_store(store_url).get_set().to_numpy("val")
    assert x.shape == (12, 16) and x.dtype == np.float32


def test_bad_files_are_skipped_and_recorded_strict_fails_and_keeps_the_store(folder, store_url):
    (folder / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    r = extract_tiny(folder, store_url)
    assert [s.path for s in r.skipped] == ["train/red/broken.jpg"]
    assert "cannot decode" in r.skipped[0].reason
    fs = featcache.open_store(store_url).get_set()
    assert fs.attrs["skipped"][0]["path"] == "train/red/broken.jpg"
    assert "train/red/broken.jpg" not in fs.paths("train")
    (folder / "train" / "red" / "new.png").write_bytes((folder / "train" / "blue" / "blue_0.png").read_bytes()[:40])
    with pytest.raises(DataError, match="--strict"):
        extract_tiny(folder, store_url, strict=True)
    st = featcache.open_store(store_url)
    assert st.set_keys() == [fs.key] and st.get_set().to_numpy("train")[0].shape[0] == 24


def test_every_head_learns_a_separable_set(folder, store_url, tmp_path):
    extract_tiny(folder, store_url)
    for head in ("mlp", "linear", "logreg", "svm"):
        torch_options = {"epochs": 40, "lr": 1e-2} if head in ("mlp", "linear") else {}
        r = featcache.fit(head=head, store=store_url, runs=str(tmp_path / "runs"), **torch_options)
        assert r.metrics["val"]["top1"] == 1.0, head
        assert r.metrics["train"]["top1"] == 1.0, head


def test_run_directory_is_json_and_arrays_and_reloads(folder, store_url, tmp_path):
    extract_tiny(folder, store_url)
    epochs = []
    r = featcache.fit(head="mlp", store=store_url, epochs=5, runs=str(tmp_path / "runs"), on_epoch=epochs.append,
                      plots=False)
    assert sorted(p.name for p in r.run_dir.iterdir()) == [
        "config.json", "confusion_matrix.train.npy", "confusion_matrix.val.npy", "head.json", "head.npz", "history.json",
        "metrics.json"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4, 5]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "seconds"} <= set(epochs[0])
    metrics = json.loads((r.run_dir / "metrics.json").read_text())
    val = metrics["val"]
    assert set(val) == {"n", "top1", "log_loss", "balanced_accuracy", "macro", "weighted", "per_class",
                        "per_class_accuracy"}  # 3 classes: no top-5; the confusion matrix is an array file
    assert np.load(r.run_dir / "confusion_matrix.val.npy", allow_pickle=False).sum() == 12  # tables are arrays
    with np.load(r.run_dir / "head.npz", allow_pickle=False) as z:
        assert z["0.weight"].shape == (256, 32)
    head = load_head(r.run_dir)
    x = featcache.open_store(store_url).get_set().to_numpy("val")[0].astype(np.float32)
    assert np.isclose(float((head.predict(x) == featcache.open_store(store_url).get_set().labels("val")).mean()), val["top1"])
    assert json.loads((r.run_dir / "config.json").read_text())["config"] == FitConfig(
        head="mlp", store=store_url, epochs=5, runs=str(tmp_path / "runs"), plots=False).to_dict()


def test_top5_and_test_split_with_many_classes(tmp_path, store_url):
    colours = {f"c{i}": (i * 40 % 256, (i * 90) % 256, (i * 150) % 256) for i in range(6)}
    root = make_folder(tmp_path / "six", splits=(("train", 4), ("val", 2), ("test", 2)), classes=colours)
    extract_tiny(root, store_url)
    r = featcache.fit(head="logreg", store=store_url, runs=str(tmp_path / "runs"))
    assert "top5" in r.metrics["val"] and "top5" in r.metrics["test"]
    assert r.metrics["test"]["n"] == 12


def test_sklearn_heads_reload_with_identical_outputs(folder, store_url, tmp_path):
    extract_tiny(folder, store_url)
    x = featcache.open_store(store_url).get_set().to_numpy("val")[0].astype(np.float32)
    for kind in ("logreg", "svm"):
        r = featcache.fit(head=kind, store=store_url, runs=str(tmp_path / "runs"))
        from featcache.heads import LogRegHead, SVMHead

        assert isinstance(load_head(r.run_dir), {"logreg": LogRegHead, "svm": SVMHead}[kind])
        again = load_head(r.run_dir).predict_proba(x)
        assert again.shape == (12, 3) and np.allclose(again.sum(1), 1, atol=1e-5)
        assert np.isclose((again.argmax(1) == featcache.open_store(store_url).get_set().labels("val")).mean(),
                          r.metrics["val"]["top1"])


def test_set_selection(folder, store_url, tmp_path):
    with pytest.raises(StoreError, match="no featcache store"):
        featcache.fit(store=store_url)
    a = extract_tiny(folder, store_url).set_key
    b = extract_tiny(folder, store_url, layer="features", pool="avg").set_key
    st = featcache.open_store(store_url)
    assert st.get_set().key == b and st.get_set(a[:5]).key == a
    with pytest.raises(SetNotFound, match="no set 'zzz'"):
        st.get_set("zzz")
    with pytest.raises(AmbiguousSet, match="matches several sets"):
        st.get_set("")


def test_unknown_store_format_is_a_clear_error(store_url, folder):
    extract_tiny(folder, store_url)
    zarr.open_group(store_url, mode="a").attrs["featcache"] = {"format_version": 99}
    with pytest.raises(StoreError, match="newer featcache \\(store format 99"):
        featcache.open_store(store_url)
    plain = str(Path(store_url).with_name("plain.zarr"))
    zarr.open_group(plain, mode="w")
    with pytest.raises(StoreError, match="not a featcache store"):
        featcache.open_store(plain)


def test_uncommitted_segments_are_invisible(folder, store_url):
    r = extract_tiny(folder, store_url)
    st = featcache.open_store(store_url)
    seg = st.new_segment(r.space, 5, r.shape, "float16")
    seg.append(np.ones((5,) + r.shape, np.float16), ["f" * 64] * 5)  # never committed
    assert "f" * 64 not in st.known_hashes(r.space)
    assert st.space_stats(r.space)["rows"] == 36


@pytest.mark.slow
def test_compiled_backbone_gives_the_same_rows(folder, tmp_path):
    """--compile (torch.compile, inductor; about 30 s of compiling here) changes speed, not the features."""
    plain = extract_tiny(folder, str(tmp_path / "plain.zarr"), batch_size=16)
    compiled = extract_tiny(folder, str(tmp_path / "compiled.zarr"), batch_size=16, compile=True)
    a = featcache.open_store(str(tmp_path / "plain.zarr")).get_set(plain.set_key)
    b = featcache.open_store(str(tmp_path / "compiled.zarr")).get_set(compiled.set_key)
    assert a.key == b.key and b.attrs["config"]["compile"] is True
    for split in a.splits:
        np.testing.assert_allclose(b.features(split).astype(np.float32), a.features(split).astype(np.float32),
                                   rtol=1e-2, atol=1e-3)
