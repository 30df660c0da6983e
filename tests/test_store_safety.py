"""Ways a store could hold or serve something wrong, closed: float16 underflow, set records over the
metadata cap, read-only and full stores, damaged or concurrent migrations of format-1 stores."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import featcache
from featcache.cli import main
from featcache.store.maintenance import verify

from .conftest import TINY, make_folder

TINY_VALUES = "tests.tiny_backbone:tiny_tiny_cnn"


def _one_error_line(r, exit_code=1):
    assert r.exit_code == exit_code, r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.output
    return errors[0]


def _no_rows(store_url):
    st = featcache.open_store(store_url)
    return st.set_keys() == [] and all(st.space_stats(s)["rows"] == 0 for s in st.spaces())


# ---------------------------------------------------------------- float16 underflow


def test_float16_underflow_is_refused_and_nothing_is_committed(folder, store_url):
    r = CliRunner().invoke(main, ["extract", "--backbone", TINY_VALUES, "--weights", "none", "--layer", "features",
                                  "--data", str(folder), "--store", store_url, "--workers", "0"])
    line = _one_error_line(r, 2)
    assert "features underflow float16 at layer features" in line and "--dtype float32" in line
    assert _no_rows(store_url)
    ok = featcache.extract(data=str(folder), store=store_url, backbone=TINY_VALUES, layer="features", weights="none",
                           workers=0, dtype="float32")
    x = featcache.open_store(store_url).get_set(ok.set_key).features("train")
    assert (np.abs(x).max(axis=tuple(range(1, x.ndim))) > 0).all()  # the signal is there in float32
    assert verify(featcache.open_store(store_url), ok.set_key, sample=0).ok


def test_float16_keeps_rows_of_ordinary_values(folder, store_url):
    # the check does not refuse what float16 holds well (the tiny CNN's rows are of order 0.1-1)
    ok = featcache.extract(data=str(folder), store=store_url, backbone=TINY, layer="features", weights="none", workers=0)
    assert ok.extracted == 36


@pytest.mark.slow
def test_float16_underflow_of_mobilenet_v3_small_without_weights_is_refused(tmp_path):
    data = make_folder(tmp_path / "d", splits=(("train", 2),))
    store_url = str(tmp_path / "s.zarr")
    r = CliRunner().invoke(main, ["extract", "--backbone", "mobilenet_v3_small", "--weights", "none", "--data",
                                  str(data), "--store", store_url, "--workers", "0"])
    line = _one_error_line(r, 2)
    assert "underflow float16" in line and "--dtype float32" in line
    assert _no_rows(store_url)
