"""--views K: seeded augmented views of the training images, one drawn per image per epoch."""

import json

import numpy as np
import torch
from torch import nn

import featcache
from featcache.heads import LinearHead

from .helpers import extract_tiny, make_folder


def test_views_are_stored_seeded_reused_and_only_for_training(tmp_path):
    folder = make_folder(tmp_path / "d", size=(48, 64))
    r = extract_tiny(folder, tmp_path / "a.zarr", views=2)
    assert r.views_extracted == 48 and "2 views per training image (48 computed)" in r.summary()
    fs = featcache.open_store(str(tmp_path / "a.zarr")).get_set(r.set_key)
    v = fs.view_features()
    assert fs.views == 2 and v.shape == (24, 2, 32)
    assert not np.array_equal(v[:, 0], v[:, 1]) and not np.array_equal(v[:, 0], fs.features("train"))
    assert fs.attrs["augment"]["transform"] == "RandomResizedCrop+RandomHorizontalFlip" and fs.attrs["augment"]["seed"] == 0
    again = extract_tiny(folder, tmp_path / "a.zarr", views=2)
    assert (again.extracted, again.views_extracted) == (0, 0) and "nothing to compute" in again.summary()
    other = extract_tiny(folder, tmp_path / "b.zarr", views=2, workers=2)  # seeded: same views in another store
    assert np.array_equal(featcache.open_store(str(tmp_path / "b.zarr")).get_set(other.set_key).view_features(), v)
    plain = extract_tiny(folder, tmp_path / "c.zarr")
    pf = featcache.open_store(str(tmp_path / "c.zarr")).get_set(plain.set_key)
    assert np.array_equal(pf.features("val"), fs.features("val"))  # validation stays un-augmented
    assert plain.set_key != r.set_key


def test_fit_uses_views_unless_told_not_to(tmp_path):
    folder = make_folder(tmp_path / "d")
    store = str(tmp_path / "s.zarr")
    extract_tiny(folder, store, views=2)
    for use, want in ((True, 2), (False, 0)):
        res = featcache.fit(head="mlp", store=store, epochs=2, use_views=use, runs=str(tmp_path / "runs"), plots=False)
        assert json.loads((res.run_dir / "config.json").read_text())["views_used"] == want
    assert featcache.fit(head="logreg", store=store, runs=str(tmp_path / "runs"), plots=False).metrics["val"]["top1"] == 1.0


def test_each_epoch_draws_one_view_per_image():
    class Spy(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.lin = nn.Linear(1, c)
            self.seen = []

        def forward(self, x):
            if self.training:
                self.seen.append(x[:, 0].clone())
            return self.lin(x)

    class SpyHead(LinearHead):
        def _build_module(self, d, c, weights=None):
            self.spy = Spy(c)
            return self.spy

    n = 50
    views = np.stack([np.zeros((n, 1)), np.ones((n, 1))], axis=1).astype(np.float32)  # view k holds the value k
    head = SpyHead(epochs=3, batch_size=n, patience=0)
    head.fit(np.full((n, 1), 7, np.float32), np.arange(n) % 2, classes=[0, 1], train_views=views)
    assert len(head.spy.seen) == 3
    for epoch in head.spy.seen:
        assert len(epoch) == n and set(epoch.tolist()) == {0.0, 1.0}  # one view per image, both views drawn
    assert not torch.equal(head.spy.seen[0], head.spy.seen[1])
