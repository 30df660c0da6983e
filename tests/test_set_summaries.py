"""``ls`` and ``info`` read set records only: each set's size is measured once, when it is committed,
and kept in its record (``summary``), so listing a store never reads a set's arrays or its space's rows.
Stores are damaged for real on disk: rows and arrays deleted, records edited."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import featcache
from featcache.cli import main
from featcache.keys import set_key
from featcache.units import human_bytes

from .helpers import extract_tiny, make_folder


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, list[str]]:
    """A store with three sets: two folders over one space (shared rows), and one of another layer."""
    top = tmp_path_factory.mktemp("summaries")
    data = make_folder(top / "data")
    other = top / "other"
    shutil.copytree(data, other)
    (other / "train" / "red" / "red_0.png").unlink()
    store = top / "s.zarr"
    keys = [extract_tiny(data, store).set_key, extract_tiny(other, store).set_key,
            extract_tiny(data, store, layer="features").set_key]
    return store, keys


@pytest.fixture
def store(made, tmp_path) -> tuple[str, list[str], dict[str, int]]:
    """A copy of the made store, its set keys and each set's size measured from its rows (the old way)."""
    copy = tmp_path / "s.zarr"
    shutil.copytree(made[0], copy)
    st = featcache.open_store(str(copy))
    sizes = {k: st.set_bytes(st.get_set(k)) for k in made[1]}
    return str(copy), made[1], sizes


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _attrs_file(store: str, key: str) -> Path:
    [path] = (Path(store) / "sets").glob(f"{key}-*/zarr.json")
    return path


def _edit_attrs(store: str, key: str, edit) -> None:
    path = _attrs_file(store, key)
    meta = json.loads(path.read_text())
    edit(meta["attributes"])
    path.write_text(json.dumps(meta))


def test_commit_records_the_size_measured_from_the_rows(store):
    url, keys, sizes = store
    st = featcache.open_store(url)
    a, b, c = (st.get_set(k) for k in keys)
    assert a.space == b.space != c.space
    for fs in (a, b, c):
        s = fs.record.summary
        assert s is not None and s.total_bytes == sizes[fs.key] == s.own_bytes + s.rows_bytes
        assert s.own_bytes > 0 and s.rows_bytes > 0 and s.segments >= 1
    r = extract_tiny(Path(a.record.data_root), url)
    assert r.set_key == a.key and r.set_bytes == sizes[a.key]


def test_ls_and_info_read_set_records_only(store):
    """Every space's rows and every set's per-split arrays deleted: ls and info still show every set
    with the size recorded at commit (the old ls read them all, and showed 'damaged')."""
    url, keys, sizes = store
    st = featcache.open_store(url)
    shapes = {k: "x".join(map(str, st.get_set(k).shape)) for k in keys}
    shutil.rmtree(Path(url) / "spaces")
    for split in (Path(url) / "sets").glob("*/*/"):
        if split.name in ("train", "val", "test"):
            shutil.rmtree(split)
    r = _cli("ls", "--store", url, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert {s["set"]: s["bytes"] for s in doc["sets"]} == sizes and doc["warnings"] == [] and doc["notes"] == []
    r = _cli("ls", "--store", url, "--wide")
    assert r.exit_code == 0 and r.stderr == "", r.output
    for k in keys:
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith(k))
        assert human_bytes(sizes[k]) in line and f" {shapes[k]} " in line  # size and row shape, from the record
    info = _cli("info", keys[1], "--store", url)
    assert info.exit_code == 0, info.output
    got = json.loads(info.stdout)
    assert got["bytes_on_disk"] == sizes[keys[1]] and got["summary"]["total_bytes"] == sizes[keys[1]]
    # the damage is real: measuring now cannot read the sets, and fit cannot either
    measured = json.loads(_cli("ls", "--store", url, "--sizes", "--json").stdout)
    assert [s["bytes"] for s in measured["sets"]] == [None] * 3
    assert "damaged" in _cli("ls", "--store", url, "--sizes").stdout
    assert _cli("info", keys[1], "--store", url, "--sizes").exit_code == 1


def test_a_set_without_a_summary_shows_an_unknown_size_and_how_to_measure_it(store):
    """Sets committed before summaries: '?' and null, one note naming ls --sizes, which measures it."""
    url, keys, sizes = store
    _edit_attrs(url, keys[0], lambda a: a.pop("summary"))
    assert featcache.open_store(url).get_set(keys[0]).record.summary is None
    r = _cli("ls", "--store", url)
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith(keys[0]))
    assert " ? " in line and human_bytes(sizes[keys[1]]) in r.stdout
    assert r.stderr.count("note: ") == 1 and "1 set(s) committed before" in r.stderr and "featcache ls --sizes" in r.stderr
    doc = json.loads(_cli("ls", "--store", url, "--json").stdout)
    assert [s["bytes"] for s in doc["sets"]] == [None, sizes[keys[1]], sizes[keys[2]]] and len(doc["notes"]) == 1
    doc = json.loads(_cli("ls", "--store", url, "--json", "--sizes").stdout)
    assert {s["set"]: s["bytes"] for s in doc["sets"]} == sizes and doc["notes"] == []
    info = _cli("info", keys[0], "--store", url)
    assert info.exit_code == 0 and json.loads(info.stdout)["bytes_on_disk"] is None
    assert "featcache info --sizes" in info.stderr
    assert json.loads(_cli("info", keys[0], "--store", url, "--sizes").stdout)["bytes_on_disk"] == sizes[keys[0]]


@pytest.mark.parametrize("summary, field", [
    ({"total_bytes": -1, "own_bytes": 0, "rows_bytes": 0, "segments": 0}, "summary.total_bytes"),
    ({"total_bytes": 10, "own_bytes": 4, "rows_bytes": 5, "segments": 1}, "summary.total_bytes"),
    ({"total_bytes": "9", "own_bytes": 4, "rows_bytes": 5, "segments": 1}, "summary.total_bytes"),
    ({"total_bytes": 2**70, "own_bytes": 2**69, "rows_bytes": 2**69, "segments": 1}, "summary.own_bytes"),
    ({"total_bytes": 9, "own_bytes": 4, "rows_bytes": 5, "segments": True}, "summary.segments"),
    ({"total_bytes": 4, "own_bytes": 4, "rows_bytes": 0, "segments": 3}, "summary.segments"),
    ({"total_bytes": 9, "own_bytes": 4, "rows_bytes": 5}, "summary.segments"),
    ([1, 2, 3], "summary"),
])
def test_a_damaged_or_hostile_summary_is_refused(store, summary, field):
    url, keys, _ = store
    _edit_attrs(url, keys[0], lambda a: a.__setitem__("summary", summary))
    r = _cli("ls", "--store", url, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [s["set"] for s in doc["sets"]] == keys[1:]  # the others are listed; the damaged one is named
    assert any(keys[0] in w and repr(field) in w for w in doc["warnings"]), doc["warnings"]
    r = _cli("info", keys[0], "--store", url)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.startswith(f"Error: set {keys[0]} has a malformed attribute {field!r}"), r.output


def test_the_writer_measures_the_summary_and_never_takes_the_callers(store):
    """A set written with a made-up summary in its record gets the one measured from its rows."""
    url, keys, _ = store
    st = featcache.open_store(url)
    fs = st.get_set(keys[0])
    r = fs.record
    attrs = {**r.to_attrs(), "data_root": r.data_root + "-copy", "skipped": fs.skipped(), "ignored": fs.ignored(),
             "summary": {"total_bytes": 1, "own_bytes": 1, "rows_bytes": 0, "segments": 0}}
    key = set_key(r.space, r.manifest_sha256, attrs["data_root"], r.split_fractions, r.split_seed, r.views,
                  r.view_space)
    arrays = {s: {"sha256": fs.hashes(s), "labels": fs.labels(s), "paths": np.array(fs.paths(s))} for s in fs.splits}
    copy = st.write_set(key, attrs, arrays)
    want = st.set_bytes(copy)
    assert copy.record.summary is not None and copy.record.summary.total_bytes == want
    assert copy.record.summary.rows_bytes == fs.record.summary.rows_bytes  # the same rows, the same segments
