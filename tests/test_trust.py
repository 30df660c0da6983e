"""A store every team can trust: each attack or accident of the store-trust list, done for real,
is caught with a clear error or made harmless (never exit 0 with wrong data)."""

import importlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import featcache
from featcache.audit import status, verify
from featcache.cli import main
from featcache.errors import StoreError
from featcache.keys import digest_key
from featcache.store.maintenance import gc

from .helpers import ROOT, SLOW, TINY, extract_tiny, make_folder, one_error_line

HUGE = "tests.tiny_backbone:huge_tiny_cnn"
EXTRACT = importlib.import_module("featcache.extract")


# 1 ---------------------------------------------------------------- gc against a running extract


def test_gc_never_collects_rows_a_running_extract_reuses(tmp_path):
    folder = make_folder(tmp_path / "d", splits=(("train", 6), ("val", 2)))
    store = tmp_path / "s.zarr"
    first = extract_tiny(folder, store, backbone=SLOW, batch_size=4)
    featcache.open_store(str(store)).remove_set(first.set_key)  # its rows are now referenced by no set
    rng = np.random.default_rng(7)
    for i in range(20):  # new images: the next extract runs for seconds
        Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(folder / "train" / "red" / f"new_{i}.png")
    cmd = [sys.executable, "-m", "featcache.cli", "extract", "--backbone", SLOW, "--weights", "none", "--data",
           str(folder), "--store", str(store), "--workers", "0", "--batch-size", "1"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    st = featcache.open_store(str(store))
    deadline = time.time() + 60
    while not st.leases()[0] and time.time() < deadline:  # the extract has claimed its space
        time.sleep(0.05)
    assert st.leases()[0], "the extract never took its lease"
    collected = []
    while p.poll() is None:  # gc with no grace at all, over and over, while the extract runs
        collected.append(gc(featcache.open_store(str(store)), grace_s=0))
    out, err = p.communicate()
    assert p.returncode == 0, err
    assert "reused 24" in out
    assert collected and all(r.rows_removed == 0 for r in collected)
    assert any(r.spaces_leased for r in collected)
    st = featcache.open_store(str(store))
    assert verify(st, sample=0).ok
    assert gc(st, grace_s=0).rows_removed == 0  # the committed set now holds them
    assert st.leases() == (set(), [])  # the lease went with the extract


def test_extract_recomputes_reused_rows_that_vanished_before_the_set_commit(tmp_path, monkeypatch):
    # A gc that began before the lease existed can still remove a segment the extract chose to
    # reuse; the extract re-checks its rows before and after committing the set.
    folder = make_folder(tmp_path / "d", splits=(("train", 3), ("val", 1)))
    store = tmp_path / "s.zarr"
    first = extract_tiny(folder, store)
    st = featcache.open_store(str(store))
    st.remove_set(first.set_key)
    real = EXTRACT.compute
    lost = []

    def compute_then_lose_rows(*args, **kw):
        out = real(*args, **kw)
        if lost:
            return out
        lost.append(True)
        s = featcache.open_store(str(store))
        for space in s.spaces():
            for name, group in s.segment_groups(space):
                if group.attrs.get("committed") is True:
                    s.remove_segment(space, name)  # what a lease-blind gc would do
        return out

    monkeypatch.setattr(EXTRACT, "compute", compute_then_lose_rows)
    r = extract_tiny(folder, store)
    monkeypatch.undo()
    assert r.reused == 12
    fs = featcache.open_store(str(store)).get_set(r.set_key)
    assert fs.features("train").shape == (9, 32) and verify(featcache.open_store(str(store)), sample=0).ok


# 2 ---------------------------------------------------------------- a file changes after it was hashed


def test_a_file_rewritten_after_scanning_is_skipped_not_stored_under_the_old_hash(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "d")
    store = tmp_path / "s.zarr"
    victim = folder / "train" / "red" / "red_0.png"
    old_hash = __import__("hashlib").sha256(victim.read_bytes()).hexdigest()
    real = featcache.backbones.create_backbone

    def rewrite_then_build(*args, **kw):  # runs after the scan hashed every file, before any decode
        Image.new("RGB", (24, 30), (0, 0, 255)).save(victim)  # a blue image in the red folder
        return real(*args, **kw)

    monkeypatch.setattr(featcache.backbones, "create_backbone", rewrite_then_build)
    r = extract_tiny(folder, store)
    monkeypatch.undo()
    assert [(s.path, s.reason.split(" (")[0]) for s in r.skipped] == [("train/red/red_0.png", "changed while reading")]
    st = featcache.open_store(str(store))
    assert old_hash not in st.known_hashes(r.space)  # nobody holding the old bytes gets the new image's row
    again = extract_tiny(folder, store)
    assert again.extracted == 1 and not again.skipped


# 3 ---------------------------------------------------------------- missing chunks are corruption


def _shards(store, space):
    return sorted(p for p in (Path(store) / "spaces" / space).rglob("*") if p.is_file() and "features" in p.parts
                  and "c" in p.parts)


def test_a_deleted_shard_is_corruption_named_by_segment_and_is_recomputed(folder, store_url):
    r = extract_tiny(folder, store_url)
    _shards(store_url, r.space)[0].unlink()
    st = featcache.open_store(store_url)
    report = verify(st, sample=0)
    assert not report.ok and "36 rows of set" in report.errors[0] and "shard files are missing" in report.errors[0]
    out = CliRunner().invoke(main, ["verify", "--store", store_url, "--sample", "0"])
    assert out.exit_code == 1 and "FAILED" in out.output and "0 rows of the set checksummed" in out.output
    line = one_error_line(CliRunner().invoke(main, ["fit", "--store", store_url, "--head", "logreg", "--no-plots"]))
    assert f"set {r.set_key}" in line and "missing" in line and "shard files are missing" in line
    again = extract_tiny(folder, store_url)  # the rows count as missing, so a re-run restores them
    assert again.extracted == 36 and verify(featcache.open_store(store_url), sample=0).ok


def test_a_deleted_labels_chunk_is_corruption_not_class_zero(folder, store_url):
    r = extract_tiny(folder, store_url)
    fs = featcache.open_store(store_url).get_set(r.set_key)
    chunk = next((Path(store_url) / fs.group.path / "train" / "labels" / "c").rglob("*"))
    chunk.unlink()
    with pytest.raises(StoreError, match="'labels' differs from its integrity record"):
        featcache.open_store(store_url).get_set(r.set_key).labels("train")
    report = verify(featcache.open_store(store_url), sample=0)
    assert not report.ok and "labels" in report.errors[0]
    line = one_error_line(CliRunner().invoke(main, ["fit", "--store", store_url, "--head", "logreg", "--no-plots"]))
    assert line.count(f"set {r.set_key}") == 1 and "'labels' differs from its integrity record" in line


def _poison(store_url, space, value):
    """Overwrite a segment's first chunk with ``value`` and record its CRC, as a hostile writer could."""
    from featcache.store.segments import chunk_crc

    st = featcache.open_store(store_url)
    name, group = next((n, g) for n, g in st.segment_groups(space) if g.attrs.get("committed"))
    feats = group["features"]
    block = feats[: feats.chunks[0]]
    block[0] = value
    feats[: len(block)] = block
    integrity = group.attrs["integrity"]
    integrity["features"]["crc32"][0] = chunk_crc(block)
    group.attrs["integrity"] = integrity
    return name


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_rows_fail_verify_and_fit(folder, store_url, value):
    r = extract_tiny(folder, store_url)
    name = _poison(store_url, r.space, value)
    report = verify(featcache.open_store(store_url), sample=0)
    assert not report.ok and f"segment {name}" in report.errors[0] and "1 rows hold non-finite" in report.errors[0]
    for head in ("logreg", "mlp"):
        line = one_error_line(CliRunner().invoke(main, ["fit", "--store", store_url, "--head", head, "--no-plots"]))
        assert f"set {r.set_key}" in line and "1 rows" in line and "non-finite" in line


def test_a_recomputed_nan_row_fails_verify(folder, store_url):
    r = extract_tiny(folder, store_url)
    _poison(store_url, r.space, np.nan)
    report = verify(featcache.open_store(store_url), sample=40, data=str(folder), backbone=TINY)
    assert not report.ok


# 4 ---------------------------------------------------------------- nothing stored runs code


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """A store and a run that name a module sitting in the current folder; importing it leaves a marker."""
    work = tmp_path / "work"
    work.mkdir()
    marker = tmp_path / "ran"
    (work / "teamtools.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "from tests.tiny_backbone import tiny_cnn as make\n"
    )
    folder = make_folder(tmp_path / "d")
    store = str(work / "s.zarr")
    r = extract_tiny(folder, store, layer="features")
    run = featcache.fit(head="mlp", store=store, epochs=1, out=str(tmp_path / "run"), plots=False).run_dir
    group = featcache.open_store(store).get_set(r.set_key).group
    attrs = dict(group.attrs)
    attrs["backbone"] = "teamtools:make"
    attrs["config"] = {**attrs["config"], "backbone": "teamtools:make"}
    group.attrs.update(attrs)
    for name in ("config.json",):
        info = json.loads((run / name).read_text())
        info["backbone"] = "teamtools:make"
        info["extract_config"]["backbone"] = "teamtools:make"
        (run / name).write_text(json.dumps(info))
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))  # even with the folder importable, nothing imports it
    return store, run, folder, marker


def test_no_command_imports_a_module_named_by_a_store_or_run(hostile, tmp_path):
    store, run, folder, marker = hostile
    runner = CliRunner()
    cases = [
        ["verify", "--store", store, "--data", str(folder)],
        ["fit", "--store", store, "--head", "rest", "--epochs", "1", "--no-plots"],
        ["predict", str(run), str(folder / "val")],
        ["export", str(run), str(tmp_path / "m.pt2")],
    ]
    for args in cases:
        r = runner.invoke(main, args)
        line = one_error_line(r, 2)  # a usage error pointing at the command's --backbone
        assert "never imports code" in line and "--backbone teamtools:make" in line, line
    assert not marker.exists() and "teamtools" not in sys.modules


def test_the_user_names_the_module_and_its_weights_are_checked(hostile, tmp_path):
    store, run, folder, marker = hostile
    r = CliRunner().invoke(main, ["verify", "--store", store, "--data", str(folder), "--backbone", "teamtools:make"])
    assert r.exit_code == 0 and "8 recomputed" in r.output and marker.exists()  # the user asked for it
    other = CliRunner().invoke(main, ["predict", str(run), str(folder / "val"), "--backbone", "resnet18",
                                      "--weights", "none"])
    one_error_line(other)  # another network is refused, never used in its place


def test_current_folder_is_not_put_on_sys_path(folder, tmp_path, monkeypatch):
    (tmp_path / "mymodel.py").write_text("raise SystemExit('imported')\n")
    monkeypatch.chdir(tmp_path)
    line = one_error_line(CliRunner().invoke(main, ["extract", "--backbone", "mymodel:make", "--data", str(folder)]), 2)
    assert "PYTHONPATH" in line


# 5 ---------------------------------------------------------------- stored paths never steer reading


def test_a_hostile_data_root_is_never_walked(folder, store_url, tmp_path):
    r = extract_tiny(folder, store_url)
    group = featcache.open_store(store_url).get_set(r.set_key).group
    group.attrs["data_root"] = "/"  # the key is a digest of the record: a hostile writer recomputes it too
    a = group.attrs
    group.attrs["key"] = digest_key({"space": a["space"], "view": a["manifest_sha256"], "data_root": "/",
                                     "split_fractions": None, "split_seed": None}, 12)
    runner = CliRunner()
    line = one_error_line(runner.invoke(main, ["status", "--store", store_url]), 2)
    assert "pass that folder" in line and "--data" in line
    out = runner.invoke(main, ["verify", "--store", store_url])
    assert out.exit_code == 0 and "0 recomputed" in out.output and "pass --data" in out.output
    out = runner.invoke(main, ["status", "--store", store_url, "--data", str(folder)])
    assert out.exit_code == 0 and "up to date" in out.output


# 6 ---------------------------------------------------------------- one damaged group


def test_one_damaged_group_never_takes_down_the_others(tmp_path):
    store = str(tmp_path / "s.zarr")
    sets = [extract_tiny(make_folder(tmp_path / f"d{i}", seed=i), store).set_key for i in range(4)]
    st = featcache.open_store(store)
    groups = {k: st.get_set(k).group for k in sets}
    meta = Path(store) / groups[sets[0]].path / "zarr.json"
    meta.write_text(meta.read_text()[:50])  # truncated
    deep = Path(store) / groups[sets[1]].path / "zarr.json"
    doc = json.loads(deep.read_text())
    deep.write_text(json.dumps(doc)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    huge = Path(store) / groups[sets[2]].path / "zarr.json"
    huge.write_text(json.dumps({**json.loads(huge.read_text()), "pad": "x" * (9 << 20)}))
    space = featcache.open_store(store).get_set(sets[3]).space
    seg = next((Path(store) / "spaces" / space / "segments").iterdir())
    junk = seg.parent / "20000101T000000-deadbeef"
    junk.mkdir()
    (junk / "zarr.json").write_text("{not json")
    runner = CliRunner()
    out = runner.invoke(main, ["ls", "--store", store])
    assert out.exit_code == 0 and sets[3] in out.output and "Traceback" not in out.output
    assert out.output.count("warning:") >= 3
    assert runner.invoke(main, ["verify", sets[3], "--store", store, "--sample", "0"]).exit_code == 0
    assert runner.invoke(main, ["fit", "--set", sets[3], "--store", store, "--head", "logreg", "--no-plots",
                                "--runs", str(tmp_path / "runs")]).exit_code == 0
    for key in sets[:3]:  # the damaged ones: one clear error each, no traceback
        r = runner.invoke(main, ["info", key, "--store", store])
        one_error_line(r, r.exit_code if r.exit_code in (1, 2) else 1)
    r = runner.invoke(main, ["gc", "--store", store, "--grace", "0"])
    assert r.exit_code == 0 and "cannot be read, so no committed rows were removed" in r.output


# 7 ---------------------------------------------------------------- attributes checked against arrays


def test_attributes_that_lie_about_the_arrays_are_refused(folder, store_url):
    r = extract_tiny(folder, store_url)
    group = featcache.open_store(store_url).get_set(r.set_key).group
    original = dict(group.attrs)
    for change, words in [
        ({"space_provenance": {**original["space_provenance"], "shape": [63]}}, "shape"),
        ({"classes": [f"c{i}" for i in range(1_000_000)]}, "metadata is"),
        ({"classes": [f"c{i}" for i in range(200_000)]}, "classes"),
        ({"classes": ["a", "b", "c"] + [f"x{i}" for i in range(30)]}, "classes"),
        ({"weights": {"id": "w"}}, "weights"),
        ({"created_by": ["x"]}, "created_by"),
        ({"skipped": [1, 2]}, "skipped"),
        ({"views": 3}, "view_space"),
    ]:
        group.update_attributes({**original, **change})  # one write (attrs.update writes once per key)
        runner = CliRunner()
        line = one_error_line(runner.invoke(main, ["fit", "--store", store_url, "--head", "logreg", "--no-plots"]))
        assert f"set {r.set_key}" in line and words in line, line
    group.update_attributes(original)


# 9 ---------------------------------------------------------------- float16 overflow


def test_float16_overflow_is_refused_at_extract_and_nothing_is_committed(folder, store_url):
    r = CliRunner().invoke(main, ["extract", "--backbone", HUGE, "--weights", "none", "--layer", "features",
                                  "--data", str(folder), "--store", store_url, "--workers", "0"])
    line = one_error_line(r, 2)
    assert "features overflow float16 at layer features" in line and "--dtype float32" in line
    st = featcache.open_store(store_url)
    assert st.set_keys() == [] and all(st.space_stats(s)["rows"] == 0 for s in st.spaces())
    ok = extract_tiny(folder, store_url, backbone=HUGE, layer="features", dtype="float32")
    assert verify(featcache.open_store(store_url), ok.set_key, sample=0).ok


# 10 ---------------------------------------------------------------- one set record per folder


def test_identical_copies_share_rows_but_each_folder_has_its_own_set(folder, store_url, tmp_path):
    a = extract_tiny(folder, store_url)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    b = extract_tiny(copy, store_url)
    assert b.extracted == 0 and b.reused == 36 and a.set_key != b.set_key
    st = featcache.open_store(store_url)
    assert st.get_set(b.set_key).record.data_root == str(copy.resolve())
    shutil.rmtree(folder)
    assert status(st, b.set_key, str(copy)).up_to_date


# 11 ---------------------------------------------------------------- precision is part of the space


def test_precision_is_part_of_the_space_and_verify_recomputes_under_it(folder, store_url):
    f32 = extract_tiny(folder, store_url, layer="features", precision="float32")
    bf16 = extract_tiny(folder, store_url, layer="features", precision="bfloat16")
    assert f32.space != bf16.space and bf16.extracted == 36  # not served from the float32 rows
    st = featcache.open_store(store_url)
    a, b = st.get_set(f32.set_key), st.get_set(bf16.set_key)
    assert b.record.precision == "bfloat16" and a.record.precision == "float32"
    x, y = a.features("train").astype(np.float32), b.features("train").astype(np.float32)
    rel = np.linalg.norm((x - y).reshape(len(x), -1), axis=1) / np.linalg.norm(x.reshape(len(x), -1), axis=1)
    assert np.median(rel) > 1e-3  # bf16 rows really differ from float32 rows
    report = verify(st, bf16.set_key, sample=8, data=str(folder), backbone=TINY)
    assert report.ok and report.compared == 8, report.errors
