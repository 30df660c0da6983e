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


# ---------------------------------------------------------------- set records that fit the metadata cap


def _lower_cap(monkeypatch, cap):
    import featcache.store.rows as rows

    monkeypatch.setattr(rows, "MAX_META_BYTES", cap)  # writers and readers take it from here


def test_a_folder_with_thousands_of_ignored_files_makes_a_readable_set(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "d", splits=(("train", 2), ("val", 1)))
    for i in range(3000):  # outside the layout: not images
        (data / "train" / "red" / f"note_{i:05d}_with_a_rather_long_name.txt").touch()
    _lower_cap(monkeypatch, 64 << 10)  # 3000 entries are ~250 KB of JSON: over this cap in attributes
    store_url = str(tmp_path / "s.zarr")
    r = featcache.extract(data=str(data), store=store_url, backbone=TINY, layer="features", weights="none", workers=0)
    st = featcache.open_store(store_url)
    fs = st.get_set(r.set_key)
    assert len(fs.ignored()) == 3000 and fs.attrs["ignored"] == fs.ignored() and not st.warnings
    assert {d["path"] for d in fs.ignored()} == {f"train/red/note_{i:05d}_with_a_rather_long_name.txt" for i in range(3000)}
    # the CLI reads it too: ls lists it, info shows the list
    out = CliRunner().invoke(main, ["info", r.set_key, "--store", store_url])
    assert out.exit_code == 0 and "note_02999" in out.output, out.output
    again = featcache.extract(data=str(data), store=store_url, backbone=TINY, layer="features", weights="none",
                              workers=0)
    assert again.set_key == r.set_key and again.cache_hit


def test_a_set_of_100000_ignored_files_is_readable_at_the_real_cap(tmp_path):
    from dataclasses import replace

    data = make_folder(tmp_path / "d", splits=(("train", 2),))
    store_url = str(tmp_path / "s.zarr")
    r = featcache.extract(data=str(data), store=store_url, backbone=TINY, layer="features", weights="none", workers=0)
    st = featcache.open_store(store_url)
    fs = st.get_set(r.set_key)
    arrays = {s: {"sha256": fs.hashes(s), "labels": fs.labels(s), "paths": fs.paths(s)} for s in fs.splits}
    many = tuple({"path": f"train/red/{i:06d}-{'x' * 100}.txt", "reason": "not an image file (extension)"}
                 for i in range(100_000))  # ~15 MB of JSON in attributes: over the 8 MiB cap
    st.remove_set(r.set_key)
    st.write_set(r.set_key, replace(fs.record, ignored=many, skipped=many[:10]), arrays)
    st = featcache.open_store(store_url)
    back = st.get_set(r.set_key)
    assert back.ignored() == list(many) and back.skipped() == list(many[:10]) and not st.warnings
    meta = next((tmp_path / "s.zarr" / "sets").glob(f"{r.set_key}-*/zarr.json"))
    assert meta.stat().st_size < 64 << 10


def test_a_set_record_over_the_cap_is_refused_at_write_and_nothing_is_committed(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "d", splits=(("train", 2),))
    store_url = str(tmp_path / "s.zarr")
    _lower_cap(monkeypatch, 2 << 10)  # smaller than any set record
    r = CliRunner().invoke(main, ["extract", "--backbone", TINY, "--weights", "none", "--layer", "features", "--data",
                                  str(data), "--store", store_url, "--workers", "0"])
    line = _one_error_line(r)
    assert "over the 2.0 KB every reader accepts, so nothing was committed" in line
    monkeypatch.undo()
    st = featcache.open_store(store_url)
    assert st.set_keys() == [] and st.set_groups() == [] and not st.warnings
    assert [p.name for p in (tmp_path / "s.zarr" / "sets").iterdir()] == ["zarr.json"]  # no half-written set left


def test_old_sets_with_lists_in_attributes_still_read(tmp_path):
    data = make_folder(tmp_path / "d", splits=(("train", 2),))
    (data / "train" / "red" / "notes.txt").touch()
    store_url = str(tmp_path / "s.zarr")
    r = featcache.extract(data=str(data), store=store_url, backbone=TINY, layer="features", weights="none", workers=0)
    import zarr

    group = next(g for k, _, g in featcache.open_store(store_url).set_groups() if k == r.set_key)
    attrs = dict(group.attrs)  # as written before: the lists in the attributes, no arrays
    attrs["ignored"] = [{"path": "train/red/notes.txt", "reason": "not an image file (extension)"}]
    attrs["skipped"] = []
    for name in ("skipped", "ignored"):
        attrs.pop(f"{name}_count")
        attrs["integrity"].pop(name)
        del group[name]
    zarr.open_group(str(group.store.root / group.path), mode="r+").attrs.put(attrs)
    fs = featcache.open_store(store_url).get_set(r.set_key)
    assert fs.ignored() == attrs["ignored"] and fs.skipped() == []
