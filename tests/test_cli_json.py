"""Scripts and shared stores: --json on every command that prints results, one spelling for a
set, distinct names for store-time and train-time pooling, and the default set's rule."""

from __future__ import annotations

import importlib
import json

import pytest
from click.testing import CliRunner

import featcache
from featcache.cli import main
from featcache.errors import AmbiguousSet

from .helpers import TINY, make_folder

EXTRACT = importlib.import_module("featcache.extract")


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEATCACHE_STORE", str(tmp_path / "s.zarr"))

    def invoke(*args):
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    return invoke


def _extract_as(monkeypatch, folder, store, user: str) -> str:
    monkeypatch.setattr(EXTRACT, "created_by", lambda: f"{user}@host")
    return featcache.extract(backbone=TINY, weights="none", data=str(folder), store=str(store), workers=0).set_key


def test_extract_json_chains_into_fit_json(cli, folder):
    r = cli("extract", "--backbone", TINY, "--weights", "none", "--data", str(folder), "--workers", "0", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # one JSON document on stdout; the phase lines went to stderr
    assert {"set", "splits", "extracted", "reused", "set_bytes", "next", "seconds"} <= set(doc)
    assert doc["next"] == f"featcache fit --set {doc['set']}" and doc["extracted"] == 36
    assert "hashing 36 files" in r.stderr
    r = cli("fit", "--set", doc["set"], "--head", "mlp", "--epochs", "3", "--no-plots", "--json")
    fit = json.loads(r.stdout)
    assert fit["set"] == doc["set"] and fit["epochs_run"] == 3 and 0 <= fit["metrics"]["val"]["top1"] <= 1
    assert fit["next"] == f"featcache report {fit['run']}" and "epoch 1/3" in r.stderr
    again = json.loads(cli("extract", "--backbone", TINY, "--weights", "none", "--data", str(folder), "--workers", "0",
                           "--json").stdout)
    assert (again["extracted"], again["reused"]) == (0, 36)


def test_store_commands_speak_json(cli, folder):
    key = json.loads(cli("extract", "--backbone", TINY, "--weights", "none", "--data", str(folder), "--workers", "0",
                         "--json").stdout)["set"]
    ls = json.loads(cli("ls", "--json").stdout)
    assert [s["set"] for s in ls["sets"]] == [key] and ls["sets"][0]["classes"] == ["blue", "green", "red"]
    assert ls["sets"][0]["data_root"] == str(folder.resolve()) and ls["sets"][0]["bytes"] > 0
    assert json.loads(cli("info", "--set", key, "--json").stdout)["key"] == key
    assert json.loads(cli("info", key[:4]).stdout)["key"] == key  # the positional KEY stays an alias
    st = json.loads(cli("status", "--data", str(folder), "--json").stdout)
    assert st["set"] == key and st["up_to_date"] is True
    v = json.loads(cli("verify", "--set", key, "--sample", "0", "--json").stdout)
    assert v["ok"] is True and v["rows"] == 36
    gc = json.loads(cli("gc", "--dry-run", "--json").stdout)
    assert gc["dry_run"] is True and gc["bytes_freed"] == 0
    r = cli("rm")
    assert r.exit_code == 2 and "name the set to remove" in r.output
    assert cli("rm", "--set", key).exit_code == 0


def test_fit_pool_is_the_train_time_pooling_and_pool_still_works(tmp_path, monkeypatch, cli, folder):
    cli("extract", "--backbone", TINY, "--layer", "features", "--pool", "none", "--weights", "none", "--data", str(folder),
        "--workers", "0")
    r = cli("fit", "--head", "logreg", "--fit-pool", "avg", "--no-plots", "--json")
    assert r.exit_code == 0, r.output
    r = cli("fit", "--head", "logreg", "--pool", "avg", "--no-plots", "--json")
    assert r.exit_code == 0 and "fit --pool is deprecated: use --fit-pool" in r.stderr
    run = json.loads(r.stdout)["run"]
    assert json.loads((tmp_path / run / "config.json").read_text())["config"]["pool"] == "avg"
    r = cli("fit", "--pool", "avg", "--fit-pool", "max")
    assert r.exit_code == 2 and "give one of them" in r.output


def test_default_set_on_a_shared_store(tmp_path, monkeypatch):
    """--data picks the newest set made from that folder; else the user's own newest; else ambiguity."""
    store = tmp_path / "team.zarr"
    a, b = make_folder(tmp_path / "a"), make_folder(tmp_path / "b", seed=1)
    mine = _extract_as(monkeypatch, a, store, "me")
    theirs = _extract_as(monkeypatch, b, store, "colleague")  # the newest set in the store
    monkeypatch.setattr(featcache.store.store, "created_by", lambda: "me@laptop")
    st = featcache.open_store(str(store))
    assert st.get_set().key == mine  # my own newest, never a colleague's newer one
    assert st.get_set(data=b).key == theirs
    monkeypatch.setattr(featcache.store.store, "created_by", lambda: "newcomer@host")
    with pytest.raises(AmbiguousSet, match=f"no set made by newcomer .* 2 sets by others, newest first: {theirs}"):
        st.get_set()
    r = CliRunner().invoke(main, ["fit", "--store", str(store), "--head", "logreg"], catch_exceptions=False)
    assert r.exit_code == 2 and "Invalid value for '--set'" in r.output and "--data" in r.output
    with pytest.raises(AmbiguousSet, match="no set made from"):
        st.get_set(data=make_folder(tmp_path / "c"))


def test_ls_is_an_aligned_table_within_100_columns(tmp_path, monkeypatch):
    store = tmp_path / "s.zarr"
    long = make_folder(tmp_path / ("a_folder_with_a_rather_long_name_" * 2))
    _extract_as(monkeypatch, long, store, "someone_with_a_long_user_name")
    r = CliRunner().invoke(main, ["ls", "--store", str(store)], catch_exceptions=False)
    lines = r.output.splitlines()
    assert len(lines) == 2 and max(map(len, lines)) <= 100
    assert lines[1].split()[1].endswith("…") and lines[1].split()[-1] == "someo…"
    wide = CliRunner().invoke(main, ["ls", "--store", str(store), "--wide"], catch_exceptions=False).output
    assert long.name in wide and "someone_with_a_long_user_name" in wide and "classifier.2" in wide
