"""Ways a store could hold or serve something wrong, closed: float16 underflow, set records over the
metadata cap, read-only and full stores, damaged or concurrent migrations of format-1 stores."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import featcache
from featcache.audit import verify
from featcache.cli import main

from .helpers import TINY, make_folder, one_error_line

TINY_VALUES = "tests.tiny_backbone:tiny_tiny_cnn"


def _no_rows(store_url):
    st = featcache.open_store(store_url)
    return st.set_keys() == [] and all(st.space_stats(s)["rows"] == 0 for s in st.spaces())


# ---------------------------------------------------------------- float16 underflow


def test_float16_underflow_is_refused_and_nothing_is_committed(folder, store_url):
    r = CliRunner().invoke(main, ["extract", "--backbone", TINY_VALUES, "--weights", "none", "--layer", "features",
                                  "--data", str(folder), "--store", store_url, "--workers", "0"])
    line = one_error_line(r, 2)
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
    line = one_error_line(r, 2)
    assert "underflow float16" in line and "--dtype float32" in line
    assert _no_rows(store_url)


# ---------------------------------------------------------------- set records that fit the metadata cap


def _lower_cap(monkeypatch, cap):
    import featcache.store.groups as groups

    monkeypatch.setattr(groups, "MAX_META_BYTES", cap)  # writers and readers take it from here


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
    line = one_error_line(r)
    assert "over the 2.0 KB every reader accepts, so nothing was committed" in line
    monkeypatch.undo()
    st = featcache.open_store(store_url)
    assert st.set_keys() == [] and st.set_groups() == [] and not st.warnings
    assert [p.name for p in (tmp_path / "s.zarr" / "sets").iterdir()] == ["zarr.json"]  # no half-written set left


def test_damaged_set_groups_are_named_and_their_neighbours_still_list(tmp_path, monkeypatch):
    """Every set's metadata is read at once: one garbage ``zarr.json``, one over the cap and one
    array where a group belongs each become a warning, and the sound sets still list."""
    data = make_folder(tmp_path / "d", splits=(("train", 2), ("val", 1)))
    store_url = str(tmp_path / "s.zarr")
    r = featcache.extract(data=str(data), store=store_url, backbone=TINY, layer="features", weights="none", workers=0)
    st = featcache.open_store(store_url)
    fs = st.get_set(r.set_key)
    arrays = {s: {"sha256": fs.hashes(s), "labels": fs.labels(s), "paths": np.array(fs.paths(s))} for s in fs.splits}
    record = {**fs.record.to_attrs(), "data_root": fs.record.data_root + "-b"}
    from featcache.keys import set_key

    rec = fs.record
    other = set_key(rec.space, rec.manifest_sha256, record["data_root"], rec.split_fractions, rec.split_seed,
                    rec.views, rec.view_space)
    st.write_set(other, record, arrays)
    sets = tmp_path / "s.zarr" / "sets"
    (sets / "garbage").mkdir()
    (sets / "garbage" / "zarr.json").write_text("{not json")
    (sets / "huge").mkdir()
    (sets / "huge" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                           "attributes": {"pad": "x" * 200_000}}))
    import zarr

    zarr.open_group(store_url)["sets"].create_array("an_array", shape=(2,), dtype="int8")
    _lower_cap(monkeypatch, 100_000)  # over every real set's record, under the huge one
    st = featcache.open_store(store_url)
    assert sorted(f.key for f in st.sets()) == sorted([r.set_key, other])
    warned = " ".join(st.warnings)
    assert "set garbage: unreadable metadata" in warned and "set huge: metadata is" in warned, st.warnings
    assert "an_array" not in warned


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


# ---------------------------------------------------------------- a store one may only read

_READER = r"""
import json, sys
from click.testing import CliRunner
from featcache.cli import main
out = {}
for name, args in json.loads(sys.argv[1]).items():
    r = CliRunner().invoke(main, args)
    out[name] = [r.exit_code, r.output]
print(json.dumps(out))
"""


def _tree(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def _reader_commands(data, store_url, run, runs):
    base = ["--backbone", TINY, "--weights", "none", "--workers", "0", "--data", str(data), "--store", store_url]
    new = data.parent / "new"
    return {
        "extract": ["extract", *base],
        "ls": ["ls", "--store", store_url],
        "info": ["info", "--store", store_url],
        "verify": ["verify", "--store", store_url, "--data", str(data), "--backbone", TINY],
        "fit": ["fit", "--store", store_url, "--head", "logreg", "--runs", str(runs), "--no-plots"],
        "evaluate": ["evaluate", str(run), "--data", str(data), "--backbone", TINY],
        "evaluate_new_images": ["evaluate", str(run), "--data", str(new), "--backbone", TINY],
        "predict": ["predict", str(run), str(data / "val" / "red" / "red_0.png"), "--backbone", TINY],
        "extract_new_layer": ["extract", *base, "--layer", "avgpool"],
        "extract_new_images": ["extract", *base[:-4], "--data", str(new), "--store", store_url],
    }


def _prepare_reader_case(tmp_path):
    data = make_folder(tmp_path / "d", splits=(("train", 4), ("val", 2)))
    make_folder(tmp_path / "new", splits=(("train", 2), ("val", 1)), seed=5)
    store_url = str(tmp_path / "s.zarr")
    featcache.extract(data=str(data), store=store_url, backbone=TINY, weights="none", workers=0)
    run = featcache.fit(store=store_url, head="logreg", runs=str(tmp_path / "runs"), plots=False).run_dir
    return data, store_url, run


def _check_reader_results(results, store_url):
    for name in ("extract", "ls", "info", "verify", "fit", "evaluate", "evaluate_new_images", "predict"):
        code, output = results[name]
        assert code == 0 and "Traceback" not in output, (name, output)
    assert "computed rows are not added to it" in results["evaluate_new_images"][1]
    assert "nothing to compute" in results["extract"][1]
    for name in ("extract_new_layer", "extract_new_images"):
        code, output = results[name]
        errors = [line for line in output.splitlines() if line.startswith("Error:")]
        assert code == 1 and len(errors) == 1 and "Traceback" not in output, (name, output)
        assert errors[0].startswith(f"Error: the store at {store_url} is read-only: "), errors[0]


@pytest.mark.slow
def test_a_read_only_store_serves_every_reader_and_refuses_writes_in_one_line(tmp_path):
    import json
    import os
    import shutil
    import stat
    import subprocess
    import sys
    from pathlib import Path

    data, store_url, run = _prepare_reader_case(tmp_path)
    store = Path(store_url)
    before = _tree(store)
    for p in [store, *store.rglob("*")]:  # chmod -R a-w
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    prefix = []
    if os.geteuid() == 0:  # root writes through permissions; without CAP_DAC_OVERRIDE it is held to them
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permissions cannot make the store read-only")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    root = Path(__file__).resolve().parents[1]
    cmds = _reader_commands(data, store_url, run, tmp_path / "runs2")
    try:
        p = subprocess.run([*prefix, sys.executable, "-c", _READER, json.dumps(cmds)], cwd=root, capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}, timeout=600)
    finally:
        for q in [store, *store.rglob("*")]:
            q.chmod(q.stat().st_mode | stat.S_IWUSR)
    assert p.returncode == 0, p.stderr
    _check_reader_results(json.loads(p.stdout.strip().splitlines()[-1]), store_url)
    assert _tree(store) == before  # nothing was written, not even a lease


def test_a_store_on_a_read_only_mount_serves_readers(tmp_path, monkeypatch):
    # EROFS (a read-only mount) from every write the store's Zarr layer makes, in this process
    import errno
    import json

    import zarr.storage._local as local

    data, store_url, run = _prepare_reader_case(tmp_path)
    before = _tree(tmp_path / "s.zarr")

    def read_only_mount(path, *a, **k):
        if str(path).startswith(store_url):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_put(path, *a, **k)

    real_put = local._put
    monkeypatch.setattr(local, "_put", read_only_mount)
    results = {}
    for name, args in _reader_commands(data, store_url, run, tmp_path / "runs2").items():
        r = CliRunner().invoke(main, args)
        results[name] = [r.exit_code, r.output]
    _check_reader_results(json.loads(json.dumps(results)), store_url)
    assert "Read-only file system" in results["extract_new_layer"][1]
    assert _tree(tmp_path / "s.zarr") == before


# ---------------------------------------------------------------- migrating damaged, hostile or busy format-1 stores

V1 = __import__("pathlib").Path(__file__).parent / "data" / "v1store.zarr"


def _v1_copy(tmp_path):
    import shutil

    url = tmp_path / "old.zarr"
    shutil.copytree(V1, url)
    return url


def _v1_meta(path):
    import json

    return json.loads(path.read_text())


def _write_meta(path, meta):
    import json

    path.write_text(json.dumps(meta))


def _first_set(url):
    return sorted((url / "sets").glob("*/zarr.json"))[0].parent


def _segment_of_set(url, set_dir):
    space = _v1_meta(set_dir / "zarr.json")["attributes"]["space"]
    return sorted((url / "spaces" / space / "segments").glob("*/features"))[0].parent


def _lose_features_chunk(url):
    seg = _segment_of_set(url, _first_set(url))
    for f in (seg / "features" / "c").rglob("*"):
        if f.is_file():
            f.unlink()
    return seg.name


def _lose_sha256_chunk(url):
    seg = _segment_of_set(url, _first_set(url))
    for f in (seg / "sha256" / "c").rglob("*"):
        if f.is_file():
            f.unlink()
    return seg.name


def _lose_set_hashes_chunk(url):
    for f in (_first_set(url) / "train" / "sha256" / "c").rglob("*"):
        if f.is_file():
            f.unlink()
    return _first_set(url).name


def _set_without_key(url):
    meta_path = _first_set(url) / "zarr.json"
    meta = _v1_meta(meta_path)
    del meta["attributes"]["key"]
    _write_meta(meta_path, meta)
    return _first_set(url).name


def _hostile_split(url):
    meta_path = _first_set(url) / "zarr.json"
    meta = _v1_meta(meta_path)
    splits = meta["attributes"]["splits"]
    splits["../../spaces"] = splits.pop("val")
    _write_meta(meta_path, meta)
    return _first_set(url).name


def _non_hex_row_key(url):
    import zarr

    seg = _segment_of_set(url, _first_set(url))
    arr = zarr.open_array(str(seg / "sha256"), mode="r+")
    keys = arr[:].tolist()
    keys[0] = "not-a-hash/../" + "z" * 50
    arr[:] = np.array(keys, dtype=object)
    return seg.name


def _more_rows_than_keys(url):
    import zarr

    seg = _segment_of_set(url, _first_set(url))
    arr = zarr.open_array(str(seg / "sha256"), mode="r+")
    keys = arr[:].tolist()
    arr.resize((len(keys) - 1,))
    return seg.name


DAMAGE = {"lost features chunk": (_lose_features_chunk, "chunks of 'features' are missing"),
          "lost sha256 chunk": (_lose_sha256_chunk, "chunks of 'sha256' are missing"),
          "lost set hashes chunk": (_lose_set_hashes_chunk, "chunks of 'sha256' are missing"),
          "set without key": (_set_without_key, "it has no set key"),
          "split ../../spaces": (_hostile_split, "its splits are not counts per split name"),
          "non-hex row key": (_non_hex_row_key, "is not a SHA-256 in hex"),
          "more rows than keys": (_more_rows_than_keys, "rows but")}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_format_1_store_is_refused_in_one_line_and_left_unchanged(tmp_path, damage):
    url = _v1_copy(tmp_path)
    make_damage, why = DAMAGE[damage]
    name = make_damage(url)
    before = _tree(url)
    r = CliRunner().invoke(main, ["migrate", "--store", str(url)])
    line = one_error_line(r)
    assert why in line and name in line and "--drop-damaged" in line and "Nothing of the format-1 store was changed" in line
    assert _tree(url) == before


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_drop_damaged_migrates_the_rest_and_never_writes_a_row_it_could_not_read(tmp_path, damage):
    url = _v1_copy(tmp_path)
    make_damage, why = DAMAGE[damage]
    make_damage(url)
    r = CliRunner().invoke(main, ["migrate", "--store", str(url), "--drop-damaged"])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert "left out" in r.output and why in r.output
    st = featcache.open_store(str(url))
    for space in st.spaces():  # every row migrated is a row format 1 held, none is a lost chunk's zeros
        for name, group in st.segment_groups(space):
            x = group["features"][...]
            assert not (x.reshape(len(x), -1) == 0).all(axis=1).any(), name
    report = verify(st, sample=0)
    if damage in ("lost features chunk", "lost sha256 chunk", "non-hex row key", "more rows than keys"):
        assert not report.ok and any("missing" in e for e in report.errors), report.errors  # told, not zeros
    assert "migration_left_out" in st.root.attrs["featcache"]


_SLOW_MIGRATE = r"""
import sys, time
from pathlib import Path
import featcache.store.migrate as m
real = m.Store.write_set
def slow(self, *a, **k):  # the migration stops for a while with its segments copied, before its sets
    Path(sys.argv[2]).touch()
    time.sleep(float(sys.argv[3]))
    return real(self, *a, **k)
m.Store.write_set = slow
print(m.migrate(sys.argv[1]).summary())
"""


def _start_slow_migrate(url, ready, pause):
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = subprocess.Popen([sys.executable, "-c", _SLOW_MIGRATE, str(url), str(ready), str(pause)], cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 120
    while not ready.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), p.communicate()
    return p


def _reads_as_format_1(url, want):
    st = featcache.open_store(str(url))
    assert sorted(st.set_keys()) == sorted({k for k, _ in want})
    for (key, split), value in want.items():
        if split != "views":
            x, y = st.get_set(key).to_numpy(split)
            assert np.array_equal(x, value[0]) and np.array_equal(y, value[1])
    assert verify(st, sample=0).ok


def test_a_second_migrate_while_one_runs_is_refused_and_the_store_ends_whole(tmp_path):
    from featcache.errors import StoreError
    from featcache.store.migrate import migrate

    from .test_format import _v1_rows

    url = _v1_copy(tmp_path)
    want = _v1_rows(url)
    first = _start_slow_migrate(url, tmp_path / "ready", 3)
    with pytest.raises(StoreError, match=r"another featcache migrate .* is converting"):
        migrate(str(url))  # a real second migrate, while the first holds the store
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0 and "migrated" in out, err
    _reads_as_format_1(url, want)
    assert migrate(str(url)).already and not (url / "migrating").exists()


def test_a_killed_migrate_is_finished_by_the_next_one(tmp_path):
    from featcache.store.migrate import migrate

    from .test_format import _v1_rows

    url = _v1_copy(tmp_path)
    want = _v1_rows(url)
    first = _start_slow_migrate(url, tmp_path / "ready", 60)
    first.kill()  # SIGKILL mid-way: its lock and some new segments are left behind
    first.communicate()
    assert (url / "migrating").exists()
    report = migrate(str(url))  # the lock of a dead process on this machine is taken over
    assert not report.already and report.sets == 2
    _reads_as_format_1(url, want)
    assert not (url / "migrating").exists()


def test_runs_fitted_on_a_migrated_set_predict_and_evaluate(tmp_path):
    from featcache.store.migrate import migrate

    from .helpers import COLOURS

    url = _v1_copy(tmp_path)
    migrate(str(url))
    key = featcache.open_store(str(url)).set_keys()[0]
    run = featcache.fit(store=str(url), set=key, head="logreg", runs=str(tmp_path / "runs"), plots=False).run_dir
    classes = featcache.open_store(str(url)).get_set(key).classes
    data = make_folder(tmp_path / "d", splits=(("train", 2), ("val", 2)), classes={c: COLOURS[c] for c in classes})
    note = "migrated from store format 1, which did not record the compute precision"
    r = CliRunner().invoke(main, ["predict", str(run), str(data / "val" / classes[0] / f"{classes[0]}_0.png"),
                                  "--backbone", TINY])
    assert r.exit_code == 0 and "Traceback" not in r.output and note in r.output, r.output
    r = CliRunner().invoke(main, ["evaluate", str(run), "--data", str(data), "--backbone", TINY])
    assert r.exit_code == 0 and "Traceback" not in r.output and note in r.output, r.output
    assert "evaluated" in r.output


def test_the_float16_cast_check_flags_exactly_the_rows_it_loses():
    from featcache.pipeline import MAX_CAST_ERROR, cast_error

    rng = np.random.default_rng(0)
    scales = np.logspace(-12, 3, 300)
    x = (rng.standard_normal((300, 2048)) * scales[:, None]).astype(np.float32)
    x[::7, : rng.integers(1, 2048)] *= 1e-6  # rows with tiny and ordinary values mixed
    stored = x.astype(np.float16)
    x64 = x.astype(np.float64)
    exact = np.linalg.norm(x64 - stored.astype(np.float64), axis=1) / np.linalg.norm(x64, axis=1)
    got = cast_error(x, stored)
    assert ((exact > MAX_CAST_ERROR) == (got > MAX_CAST_ERROR)).all()
    assert (exact > MAX_CAST_ERROR).any() and (exact <= MAX_CAST_ERROR).any()
