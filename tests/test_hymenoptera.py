"""The real photo set (ants/bees, with a GIF placeholder among the ants), when present."""

import numpy as np
import pytest

import featcache
from featcache.heads import C_GRID

pytestmark = pytest.mark.slow


def test_vgg16_features_then_mlp(hymenoptera, tmp_path):
    store = str(tmp_path / "s.zarr")
    r = featcache.extract(backbone="vgg16", layer="features", weights="none", data=str(hymenoptera), store=store)
    assert r.skipped == [] and r.extracted == r.images == 398
    fs = featcache.open_store(store).get_set()
    x, y = fs.to_numpy("train")
    assert x.shape == (fs.attrs["splits"]["train"], 512, 7, 7) and x.dtype == np.float32  # stored float16, upcast
    assert "train/ants/imageNotFound.gif" in fs.paths("train")
    assert set(y.tolist()) == {0, 1} and fs.classes == ["ants", "bees"]
    rows = []
    # 3 epochs of an mlp on the flattened 25,088 values: what is checked is that it trains on the maps
    fit = featcache.fit(head="mlp", epochs=3, store=store, runs=str(tmp_path / "runs"), on_epoch=rows.append)
    assert 1 <= len(rows) <= 3 and (fit.run_dir / "metrics.json").exists()


def test_pretrained_efficientnet_lite0_logreg_reaches_92_percent(lite0_hymenoptera, tmp_path):
    store, r = lite0_hymenoptera
    assert r.images == 398 and r.skipped == []
    fit = featcache.fit(head="logreg", store=store, runs=str(tmp_path / "runs"))
    assert fit.metrics["val"]["top1"] >= 0.92, fit.metrics["val"]


# Val top-1 of the heads before they became one class each (featcache 7e065bc), efficientnet_lite0
# features, default settings and seed: the heads must give exactly these. Changed on purpose since:
# linear starts from zeros (0.9412 -> 0.9477), and logreg's C auto is chosen by cross-validation of
# train (C 0.01) instead of on this val split (C 0.001, whose 0.9608 was the score it was chosen by).
BEFORE = [("mlp", {}, 0.9477124183006536), ("linear", {}, 0.9477124183006536), ("logreg", {}, 0.9477124183006536),
          ("svm", {"C": 0.001}, 0.9477124183006536), ("logreg", {"C": 1.0}, 0.9477124183006536),
          ("mlp", {"hidden": 64, "lr": 3e-3}, 0.954248366013072)]


def test_heads_give_the_same_val_top1_as_before_on_efficientnet_lite0(lite0_hymenoptera, tmp_path):
    store, _ = lite0_hymenoptera
    for head, options, top1 in BEFORE:
        res = featcache.fit(head=head, store=store, runs=str(tmp_path / "runs"), plots=False, **options)
        assert res.metrics["val"]["top1"] == top1, (head, options, res.metrics["val"]["top1"])
    # svm's C = auto is chosen by cross-validation of train: val is held out, and says so
    auto = featcache.fit(head="svm", store=store, runs=str(tmp_path / "runs"), plots=False)
    assert auto.selection == {"chosen": [{"what": "C", "on": "5-fold cross-validated accuracy of train"}],
                              "biased": [], "score": "val"}
    assert auto.chosen_C in C_GRID and auto.metrics["val"]["top1"] >= 0.92
