"""The real photo set (ants/bees, with a GIF placeholder among the ants), when present."""

import numpy as np
import pytest

import featcache

pytestmark = pytest.mark.slow


def test_vgg16_features_then_mlp(hymenoptera, tmp_path):
    store = str(tmp_path / "s.zarr")
    r = featcache.extract(backbone="vgg16", layer="features", weights="none", data=str(hymenoptera), store=store)
    assert r.skipped == [] and r.extracted == r.images == 398
    fs = featcache.open_store(store).get_set()
    x, y = fs.to_numpy("train")
    assert x.shape == (fs.attrs["splits"]["train"], 512, 7, 7) and x.dtype == np.float16
    assert "train/ants/imageNotFound.gif" in fs.paths("train")
    assert set(y.tolist()) == {0, 1} and fs.classes == ["ants", "bees"]
    rows = []
    fit = featcache.fit(head="mlp", epochs=30, store=store, runs=str(tmp_path / "runs"), on_epoch=rows.append)
    assert 1 <= len(rows) <= 30 and (fit.run_dir / "metrics.json").exists()


def test_pretrained_efficientnet_lite0_logreg_reaches_92_percent(hymenoptera, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    store = str(tmp_path / "s.zarr")
    r = featcache.extract(backbone="efficientnet_lite0", data=str(hymenoptera), store=store)
    assert r.images == 398 and r.skipped == []
    fit = featcache.fit(head="logreg", store=store, runs=str(tmp_path / "runs"))
    assert fit.metrics["val"]["top1"] >= 0.92, fit.metrics["val"]
