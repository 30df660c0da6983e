"""CUDA paths; skipped (and reported as skipped) on a machine without a GPU."""

import numpy as np
import pytest

import featcache

from .helpers import TINY

pytestmark = pytest.mark.gpu  # skipped without CUDA by tests/conftest.py


def test_extract_on_cuda_matches_cpu_within_autocast_precision(folder, tmp_path):
    cpu = featcache.extract(backbone=TINY, weights="none", data=str(folder), store=str(tmp_path / "c.zarr"), device="cpu")
    gpu = featcache.extract(backbone=TINY, weights="none", data=str(folder), store=str(tmp_path / "g.zarr"), device="cuda")
    a = featcache.open_store(str(tmp_path / "c.zarr")).get_set(cpu.set_key).features("train").astype(np.float32)
    b = featcache.open_store(str(tmp_path / "g.zarr")).get_set(gpu.set_key).features("train").astype(np.float32)
    np.testing.assert_allclose(b, a, rtol=5e-2, atol=5e-2)  # bf16/fp16 autocast


def test_fit_on_cuda(folder, tmp_path):
    featcache.extract(backbone=TINY, weights="none", data=str(folder), store=str(tmp_path / "s.zarr"))
    res = featcache.fit(head="mlp", store=str(tmp_path / "s.zarr"), device="cuda", epochs=40, lr=1e-2, plots=False,
                        runs=str(tmp_path / "runs"))
    assert res.metrics["val"]["top1"] == 1.0
