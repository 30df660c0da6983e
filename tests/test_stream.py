"""Reading rows chunk by chunk: exact loads, and streaming for sets over --max-memory."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import featcache
import featcache.store.segments
from benchmarks.throughput import synthetic_set
from featcache.cli import main
from featcache.pooling import prepare_features
from featcache.stream import RowReader, Streamed
from featcache.units import parse_size

from .helpers import TINY


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 rows of 64 float16 features, so a few hundred rows span many chunks and shards."""
    monkeypatch.setattr(featcache.store.segments, "_CHUNK_BYTES", 16 * 64 * 2)


@pytest.fixture
def synthetic(tmp_path, small_chunks):
    store = str(tmp_path / "s.zarr")
    key = synthetic_set(store, rows=600, dim=64, classes=4, val=200)
    return store, featcache.open_store(store).get_set(key)


def test_load_equals_the_gathered_rows_for_any_order_and_subset(synthetic):
    _store, fs = synthetic
    st = fs.store
    hashes = fs.hashes("train")
    rng = np.random.default_rng(1)
    for keys in (hashes, hashes[::-1], hashes[rng.permutation(len(hashes))][:123], hashes[:1]):
        got = RowReader(st, fs.space, keys, fs.shape, threads=3).load()
        want = prepare_features(st.gather(fs.space, keys, fs.shape, "float16"))
        assert got.dtype == np.float32 and np.array_equal(got, want)
    assert len(RowReader(st, fs.space, hashes, fs.shape).blocks) == 600 // 16 + 1  # 16-row chunks; 600 = 37.5 chunks


def test_load_pools_and_keeps_maps_like_prepare_features(folder, store_url):
    featcache.extract(backbone=TINY, layer="features", pool="none", weights="none", data=str(folder), store=store_url,
                      workers=0)
    fs = featcache.open_store(store_url).get_set()
    stored = fs.features("train")
    for pool in ("none", "avg", "max"):
        got = RowReader(fs.store, fs.space, fs.hashes("train"), fs.shape, pool).load()
        assert np.array_equal(got, prepare_features(stored, pool)), pool
    maps = RowReader(fs.store, fs.space, fs.hashes("train"), fs.shape, keep_shape=True).load()
    assert maps.shape == stored.shape and np.array_equal(maps, stored.astype(np.float32))


def test_streamed_epochs_visit_every_row_once_in_new_chunk_orders(synthetic):
    _store, fs = synthetic
    x_all = RowReader(fs.store, fs.space, fs.hashes("train"), fs.shape).load()
    y_all = fs.labels("train")
    row_bytes = 64 * 4
    s = Streamed(fs.store, fs.space, fs.hashes("train").tolist(), y_all, fs.shape, "none", False, window_bytes=100 * row_bytes)
    assert s.shape == (600, 64) and len(s) == 600
    rng = np.random.default_rng(0)
    firsts = []
    for _ in range(3):
        batches = list(s.epoch(rng, batch_size=32))
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        assert max(len(b[0]) for b in batches) == 32
        order = np.lexsort(x.T[::-1])
        want = np.lexsort(x_all.T[::-1])
        assert np.array_equal(x[order], x_all[want]) and np.array_equal(y[order], y_all[want])  # each row once, with its label
        firsts.append(x[:50])
    assert not np.array_equal(firsts[0], firsts[1]) and not np.array_equal(firsts[1], firsts[2])
    windows = list(s._reader(None).windows(100 * row_bytes, np.random.default_rng(0)))
    assert all(len(w) <= 100 for w, _ in windows) and sum(len(w) for w, _ in windows) == 600
    ordered = np.empty_like(x_all)
    for w, dest in s.ordered():
        ordered[dest] = w
    assert np.array_equal(ordered, x_all)


def test_fit_streams_a_set_over_max_memory(synthetic, tmp_path):
    store, fs = synthetic
    common = dict(store=store, head="mlp", epochs=4, patience=0, plots=False, device="cpu", runs=str(tmp_path / "runs"))
    in_memory = featcache.fit(**common)
    streamed = featcache.fit(**common, max_memory="60KB")  # 800 x 64 float32 = 205 KB
    assert not [n for n in in_memory.notes if n.startswith("streaming")]
    assert streamed.notes and streamed.notes[0].startswith("streaming: the set needs 204.8 KB as float32, over --max-memory 60.0 KB")
    assert streamed.metrics["val"]["top1"] >= 0.95 and in_memory.metrics["val"]["top1"] >= 0.95
    assert len(streamed.history) == 4
    # evaluation through the stream puts every probability back at its row
    head = featcache.load_head(streamed.run_dir)
    x_val = RowReader(fs.store, fs.space, fs.hashes("val"), fs.shape).load()
    assert streamed.metrics["val"]["top1"] == pytest.approx(float((head.predict(x_val) == fs.labels("val")).mean()))


def test_heads_that_need_the_whole_set_refuse_a_small_budget(synthetic, tmp_path):
    store, _fs = synthetic
    r = CliRunner().invoke(main, ["fit", "--store", store, "--head", "logreg", "--max-memory", "60KB",
                                  "--runs", str(tmp_path / "runs")])
    assert r.exit_code == 2
    assert "Invalid value for '--max-memory': --head logreg needs the whole set in memory (204.8 KB as float32)" in r.output
    assert not (tmp_path / "runs").exists()


def test_streamed_views_train_on_view_rows(folder, store_url, tmp_path):
    featcache.extract(backbone=TINY, weights="none", data=str(folder), store=store_url, workers=0, views=2)
    fs = featcache.open_store(store_url).get_set()
    s = Streamed(fs.store, fs.space, fs.hashes("train").tolist(), fs.labels("train"), fs.shape, "none", False,
                 window_bytes=1 << 20, views=2, view_space=fs.attrs["view_space"])
    x = np.concatenate([b[0] for b in s.epoch(np.random.default_rng(0), 8)])
    views = fs.view_features().astype(np.float32)  # (N, 2, D)
    plain = fs.features("train").astype(np.float32)
    as_view = [any(np.array_equal(row, v) for v in views.reshape(-1, views.shape[-1])) for row in x]
    as_plain = [any(np.array_equal(row, p) for p in plain) for row in x]
    assert all(as_view) and not any(as_plain)
    res = featcache.fit(store=store_url, head="mlp", epochs=2, plots=False, runs=str(tmp_path / "runs"), max_memory="1KB")
    assert res.notes and res.notes[0].startswith("streaming")


@pytest.mark.parametrize("text,expected", [("4GB", 4 * 10**9), ("512MiB", 512 * 2**20), ("1.5g", 1_500_000_000),
                                           ("2000000", 2_000_000), (1024, 1024)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_rest_head_streams_maps_and_probes_through_the_stream(folder, store_url, tmp_path):
    featcache.extract(backbone="resnet18", layer="layer3", weights="none", data=str(folder), store=store_url, workers=0)
    common = dict(head="rest", store=store_url, epochs=2, plots=False, runs=str(tmp_path / "runs"))
    in_memory = featcache.fit(**common)
    streamed = featcache.fit(**common, max_memory="300KB")  # 36 maps of 256x14x14 float32 = 7.2 MB
    assert streamed.notes and streamed.notes[0].startswith("streaming")
    # the probe (epoch 0) is fitted on the same rows either way, so both runs start from the same layer
    probes = [json.loads((r.run_dir / "head.json").read_text())["fitted"]["probe"] for r in (in_memory, streamed)]
    assert probes[0] == probes[1] and probes[0]["train_acc"] == 1.0
