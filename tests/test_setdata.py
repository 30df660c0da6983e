"""A set's rows where torch, pandas and Hugging Face users work: float32 by default, pooled on
request, ``len(fs)``, a torch Dataset and an IterableDataset for sets larger than memory."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import featcache
import featcache.store.segments
from benchmarks.throughput import synthetic_set
from featcache.errors import FeatcacheError

from .helpers import TINY, make_folder


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """The tiny network's 16x16x16 feature maps, stored float16: 3 classes x (8 train + 4 val)."""
    root = tmp_path_factory.mktemp("setdata")
    folder = make_folder(root / "d")
    store = str(root / "s.zarr")
    featcache.extract(backbone=TINY, layer="features", data=str(folder), store=store, weights="none", workers=0)
    return featcache.open_store(store).get_set()


def test_torch_users_get_float32_rows_nn_linear_takes(maps):
    x, y = maps.to_torch("train")
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and tuple(x.shape) == (24, 16, 16, 16)
    stored = maps.features("train")
    assert stored.dtype == np.float16 and np.array_equal(x.numpy(), stored.astype(np.float32))  # exact upcast
    logits = nn.Linear(16 * 16 * 16, 3)(x.flatten(1))
    nn.CrossEntropyLoss()(logits, y).backward()
    half, _ = maps.to_torch("train", dtype="float16")
    assert half.dtype == torch.float16 and np.array_equal(half.numpy(), stored)
    xn, yn = maps.to_numpy("val")
    assert xn.dtype == np.float32 and np.array_equal(yn, maps.labels("val"))
    with pytest.raises(ValueError, match="dtype must be one of float32, float16; got 'float64'"):
        maps.to_numpy("val", dtype="float64")


def test_pool_is_a_parameter(maps):
    stored = maps.features("val").astype(np.float32)
    avg, _ = maps.to_numpy("val", pool="avg")
    mx, _ = maps.to_torch("val", pool="max")
    assert avg.shape == (12, 16) and np.allclose(avg, stored.mean(axis=(2, 3)), rtol=1e-6, atol=1e-6)
    assert np.array_equal(mx.numpy(), stored.max(axis=(2, 3)))
    with pytest.raises(ValueError, match="pool must be one of none, avg, max; got 'mean'"):
        maps.to_numpy("val", pool="mean")


def test_len_and_a_map_style_dataset(maps):
    assert len(maps) == 36
    ds = maps.dataset("train", pool="avg")
    assert len(ds) == 24
    x0, y0 = ds[5]
    want, labels = maps.to_numpy("train", pool="avg")
    assert np.array_equal(x0.numpy(), want[5]) and int(y0) == labels[5]
    xb, yb = next(iter(DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))))
    assert xb.shape == (8, 16) and xb.dtype == torch.float32 and yb.dtype == torch.int64


def test_float16_on_request_is_refused_where_values_do_not_fit():
    from featcache.stream import as_dtype

    assert as_dtype(np.array([1.5, -2.0], np.float32), "float16", "x").dtype == np.float16
    with pytest.raises(FeatcacheError, match=r"values up to 1e\+06 do not fit float16 .*use dtype='float32'"):
        as_dtype(np.array([1.0, 1e6], np.float32), "float16", "set s split train")


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    """400 train rows in chunks of 16 rows: a split that spans many chunks."""
    monkeypatch.setattr(featcache.store.segments, "_CHUNK_BYTES", 16 * 64 * 2)
    store = str(tmp_path / "s.zarr")
    key = synthetic_set(store, rows=400, dim=64, classes=4, val=200)
    return featcache.open_store(store).get_set(key)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_iterable_dataset_streams_every_row_once_per_epoch(chunked, workers):
    fs = chunked
    want, labels = fs.to_numpy("train")
    ds = fs.iterable_dataset("train", max_memory="8KB")  # windows of 4 KB: a few chunks at a time
    assert len(ds) == len(labels) == 400
    orders = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        xs, ys = zip(*DataLoader(ds, batch_size=32, num_workers=workers))
        x, y = torch.cat(xs).numpy(), torch.cat(ys).numpy()
        assert x.dtype == np.float32 and len(x) == 400
        # every row exactly once, with its own label: match rows by content
        index = {r.tobytes(): i for i, r in enumerate(want)}
        got = [index[r.tobytes()] for r in x]
        assert sorted(got) == list(range(400)) and np.array_equal(y, labels[got])
        orders.append(got)
    assert orders[0] != orders[1] and orders[0] != sorted(orders[0])  # shuffled, anew each epoch


def test_to_pandas_says_how_when_pandas_is_missing(maps, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(FeatcacheError, match=r"^to_pandas needs pandas: pip install pandas$"):
        maps.to_pandas()


def test_to_pandas(maps):
    pytest.importorskip("pandas", reason="pandas is optional (pip install pandas)")
    df = maps.to_pandas(pool="avg")
    assert len(df) == 36 and list(df.columns) == ["path", "split", "label", "label_id", "sha256", "features"]
    val = df[df["split"] == "val"]
    x, y = maps.to_numpy("val", pool="avg")
    assert np.array_equal(np.stack(val["features"].to_numpy()), x) and val["label_id"].tolist() == y.tolist()
    assert val["label"].tolist() == [maps.classes[i] for i in y] and val["path"].tolist() == maps.paths("val")


def test_to_hf_says_how_when_datasets_is_missing(maps, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(FeatcacheError, match=r"^to_hf needs datasets: pip install datasets$"):
        maps.to_hf("train")


def test_to_hf(maps):
    pytest.importorskip("datasets", reason="Hugging Face datasets is optional (pip install datasets)")
    dd = maps.to_hf(pool="max")
    assert set(dd) == {"train", "val"}
    train = dd["train"].with_format("numpy")
    x, y = maps.to_numpy("train", pool="max")
    assert train.features["label"].names == maps.classes and len(train) == 24
    assert np.array_equal(train["features"], x) and np.array_equal(train["label"], y)
    assert list(dd["train"]["path"]) == maps.paths("train")
