"""A nothing-changed extract is answered from the store's record without building the model, and only
then: a replaced weights file (same size, same mtime), another library install, another torch hub
folder, a damaged or edited cache entry, a row gone from the store, views, all take the full path and
give what a fresh run gives.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import featcache
from featcache.keys import space_key

from .helpers import ROOT, make_folder

RECALL = __import__("importlib").import_module("featcache.recall")
NET = "mobilenet_v3_small"  # a registry name (the cache answers those only), fast on tiny images
RACY_TEST_NS = 50_000_000


@pytest.fixture(autouse=True)
def _short_racy_window(monkeypatch):
    monkeypatch.setattr(RECALL, "RACY_NS", RACY_TEST_NS)


@pytest.fixture
def builds(monkeypatch):
    """The names of the models built (a cache hit builds none)."""
    import featcache.backbones as backbones

    built: list[str] = []
    for name in ("create_backbone", "create_joint"):
        real = getattr(backbones, name)

        def counted(net, *args, _real=real, **kw):
            built.append(str(net))
            return _real(net, *args, **kw)

        monkeypatch.setattr(backbones, name, counted)
    return built


def _folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data", splits=(("train", 3), ("val", 1)))


def _extract(folder, store, **kw):
    kw.setdefault("backbone", NET)
    kw.setdefault("weights", "none")
    kw.setdefault("dtype", "float32")  # its random-init features underflow float16
    return featcache.extract(data=str(folder), store=str(store), workers=0, **kw)


def _same(a, b) -> dict:
    """The two results as JSON, less the time they took."""
    da, db = a.to_dict(), b.to_dict()
    for d in (da, db):
        for k in ("seconds", "images_per_s", "timings"):
            d.pop(k, None)
    assert da == db
    return da


def _entries() -> list[Path]:
    return sorted(Path(os.environ["FEATCACHE_PROVENANCE_CACHE"]).glob("*.json"))


def _settle() -> None:
    time.sleep(4 * RACY_TEST_NS / 1e9)  # files written by the test are then old enough to be trusted


def test_a_nothing_changed_extract_is_answered_from_the_record_as_the_full_extract_answers(tmp_path, builds,
                                                                                            monkeypatch):
    folder, store = _folder(tmp_path), tmp_path / "s.zarr"
    first = _extract(folder, store)
    assert first.extracted == 12 and builds == [NET] and len(_entries()) == 1
    again = _extract(folder, store)
    assert builds == [NET]  # the model was not built
    monkeypatch.setenv("FEATCACHE_PROVENANCE_CACHE", "off")
    full = _extract(folder, store)
    assert builds == [NET, NET]
    doc = _same(again, full)
    assert doc["set"] == first.set_key and doc["reused"] == 12 and doc["extracted"] == 0
    assert doc["shape"] == list(first.shape) and doc["set_bytes"] > 0


def test_several_layers_are_answered_each_as_the_full_extract_answers(tmp_path, builds, monkeypatch):
    folder, store = _folder(tmp_path), tmp_path / "s.zarr"
    layers = ["features.9", "features.12"]
    first = _extract(folder, store, layer=layers, pool="avg")
    again = _extract(folder, store, layer=layers, pool="avg")
    assert builds == [NET] and again.set_keys == first.set_keys
    monkeypatch.setenv("FEATCACHE_PROVENANCE_CACHE", "off")
    full = _extract(folder, store, layer=layers, pool="avg")
    for a, b in zip(again, full):
        _same(a, b)
    assert _extract(folder, store, layer="features.9", pool="avg").set_key == first.set_keys[0]


@pytest.mark.parametrize("how", ["rewritten in place", "renamed over"])
def test_a_weights_file_replaced_with_the_same_size_and_mtime_is_loaded_again(tmp_path, builds, how):
    import torchvision
    from safetensors.torch import save_file

    folder, store = _folder(tmp_path), tmp_path / "s.zarr"
    weights = tmp_path / "w.safetensors"
    save_file(torchvision.models.get_model(NET, weights=None).state_dict(), str(weights))
    _settle()
    first = _extract(folder, store, weights=str(weights))
    assert _extract(folder, store, weights=str(weights)).set_key == first.set_key and builds == [NET]

    before = os.stat(weights)
    data = bytearray(weights.read_bytes())
    header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
    start = 8 + struct.unpack("<Q", data[:8])[0] + header["features.0.0.weight"]["data_offsets"][0]
    data[start:start + 4] = struct.pack("<f", struct.unpack("<f", data[start:start + 4])[0] + 1.0)  # one weight
    if how == "rewritten in place":
        with open(weights, "r+b") as f:
            f.write(data)
    else:
        spare = tmp_path / "w2.safetensors"
        spare.write_bytes(data)
        os.utime(spare, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.replace(spare, weights)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(weights)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    r = _extract(folder, store, weights=str(weights))
    assert builds == [NET, NET]  # loaded again
    assert r.space != first.space and r.extracted == 12  # the new weights' own space, every row computed


def test_a_weights_file_written_in_the_clock_tick_of_the_build_is_not_remembered(tmp_path, builds, monkeypatch):
    import torch
    import torchvision

    folder, store = _folder(tmp_path), tmp_path / "s.zarr"
    weights = tmp_path / "w.pth"
    torch.save(torchvision.models.get_model(NET, weights=None).state_dict(), weights)
    monkeypatch.setattr(RECALL, "RACY_NS", 60 * 10**9)  # the file is younger than a minute: racy
    _extract(folder, store, weights=str(weights))
    assert _entries() == []
    _extract(folder, store, weights=str(weights))
    assert builds == [NET, NET]
    monkeypatch.setattr(RECALL, "RACY_NS", RACY_TEST_NS)
    _settle()
    _extract(folder, store, weights=str(weights))
    assert len(_entries()) == 1
    _extract(folder, store, weights=str(weights))
    assert builds == [NET, NET, NET]


def test_torchvision_weights_in_another_torch_hub_folder_or_replaced_there_are_loaded_again(tmp_path, builds,
                                                                                            monkeypatch):
    """Named weights come from torch hub's checkpoint folder: another ``TORCH_HOME`` is another file, and a
    checkpoint replaced there (same size, same mtime) is read again, never served from the cache."""
    import torch
    import torchvision

    enum = torchvision.models.get_model_weights(NET)
    homes = []
    for i in range(2):
        home = tmp_path / f"torch{i}"
        (home / "hub" / "checkpoints").mkdir(parents=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)
            state = torchvision.models.get_model(NET, weights=None).state_dict()
        torch.save(state, home / "hub" / "checkpoints" / enum.DEFAULT.url.rsplit("/", 1)[-1])
        homes.append(home)
    _settle()
    folder, store = _folder(tmp_path), tmp_path / "s.zarr"
    monkeypatch.setenv("TORCH_HOME", str(homes[0]))
    first = _extract(folder, store, weights="DEFAULT")
    assert _extract(folder, store, weights="DEFAULT").set_key == first.set_key and builds == [NET]

    monkeypatch.setenv("TORCH_HOME", str(homes[1]))
    other = _extract(folder, store, weights="DEFAULT")
    assert builds == [NET, NET] and other.space != first.space and other.extracted == 12

    monkeypatch.setenv("TORCH_HOME", str(homes[0]))
    assert _extract(folder, store, weights="DEFAULT").set_key == first.set_key and builds == [NET, NET]
    mine = homes[0] / "hub" / "checkpoints" / enum.DEFAULT.url.rsplit("/", 1)[-1]
    theirs = homes[1] / "hub" / "checkpoints" / mine.name
    before = os.stat(mine)
    assert os.stat(theirs).st_size == before.st_size
    spare = mine.with_suffix(".new")
    spare.write_bytes(theirs.read_bytes())
    os.utime(spare, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(spare, mine)
    r = _extract(folder, store, weights="DEFAULT")
    assert builds == [NET, NET, NET] and r.space == other.space  # what that file's weights give


@pytest.mark.parametrize("damage", ["a byte changed", "not JSON", "another key's entry", "consistent edit"])
def test_a_damaged_or_edited_cache_entry_is_ignored_and_rebuilt(tmp_path, builds, damage, caplog):
    folder, store = _folder(tmp_path), tmp_path / "s.zarr"
    first = _extract(folder, store)
    [entry] = _entries()
    doc = json.loads(entry.read_text())
    if damage == "a byte changed":
        entry.write_text(entry.read_text().replace('"shape":[', '"shape":[7,'))
    elif damage == "not JSON":
        entry.write_bytes(b"\x00garbage")
    elif damage == "another key's entry":
        _extract(folder, tmp_path / "other.zarr", pool="max")
        [theirs] = [e for e in _entries() if e != entry]
        entry.write_bytes(theirs.read_bytes())
    else:  # edited with its digest made to match: a provenance whose space holds nothing of this folder
        doc["provenances"][0]["weights"]["sha256"] = "0" * 64
        body = {k: v for k, v in doc.items() if k != "digest"}
        doc["digest"] = __import__("hashlib").sha256(RECALL._canonical(body).encode()).hexdigest()
        entry.write_text(RECALL._canonical(doc))
    n = len(builds)
    r = _extract(folder, store)
    assert len(builds) == n + 1 and r.set_key == first.set_key and r.extracted == 0
    if damage != "consistent edit":
        assert "ignoring the" in caplog.text and "provenance cache entry" in caplog.text
    _extract(folder, store)
    assert len(builds) == n + 1  # the entry was written again, whole


def test_rows_removed_from_the_store_are_computed_again_not_served(tmp_path, builds):
    """A lease-blind gc (or a damaged store) removed the set's rows while the set stayed recorded."""
    folder, store = _folder(tmp_path), tmp_path / "s.zarr"
    first = _extract(folder, store)
    assert _extract(folder, store).set_key == first.set_key and builds == [NET]
    st = featcache.open_store(str(store))
    for name, _ in st.segment_groups(first.space):
        st.remove_segment(first.space, name)
    r = _extract(folder, store)
    assert builds == [NET, NET] and r.set_key == first.set_key and r.extracted == 12
    assert featcache.open_store(str(store)).get_set(r.set_key).features("train").shape == (9, first.shape[0])


def test_a_set_removed_and_collected_is_recorded_again(tmp_path, builds):
    folder, store = _folder(tmp_path), tmp_path / "s.zarr"
    first = _extract(folder, store)
    assert _extract(folder, store).set_key == first.set_key and builds == [NET]
    featcache.open_store(str(store)).remove_set(first.set_key)
    assert featcache.gc(featcache.open_store(str(store)), grace_s=0).bytes_freed > 0  # the rows are gone
    r = _extract(folder, store)
    assert builds == [NET, NET] and r.set_key == first.set_key and r.extracted == 12
    assert first.set_key in featcache.open_store(str(store)).set_keys()


def test_a_changed_folder_views_and_modules_take_the_full_path(tmp_path, builds):
    import torchvision

    folder, store = _folder(tmp_path), tmp_path / "s.zarr"
    _extract(folder, store)
    (folder / "train" / "red" / "red_0.png").unlink()
    r = _extract(folder, store)
    assert builds == [NET, NET] and r.extracted == 0 and r.images == 11  # a new set over stored rows
    _extract(folder, store, views=1)
    _extract(folder, store, views=1)
    assert builds == [NET] * 4
    module = torchvision.models.get_model(NET, weights=None)
    transform = torchvision.models.get_model_weights(NET).DEFAULT.transforms()
    for _ in range(2):
        featcache.extract(backbone=module, transform=transform, data=str(folder), store=str(store), workers=0,
                          dtype="float32")
    assert len(builds) == 6


PROBE = """
import json, sys
from featcache.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "torchvision": "torchvision" in sys.modules}), file=sys.stderr)
"""


def _cli(args: list[str], cwd: Path, path_first: Path | None = None) -> tuple[int, bool, str]:
    """Run the command line in a fresh process: (exit code, whether torchvision was imported, output)."""
    paths = [str(p) for p in (path_first, ROOT) if p is not None] + [os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    p = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, env=env, capture_output=True, text=True)
    last = json.loads(p.stderr.strip().splitlines()[-1])
    return last["code"], last["torchvision"], p.stdout + p.stderr


@pytest.mark.slow
def test_a_cache_hit_imports_no_torchvision_and_another_library_install_is_a_miss(tmp_path):
    """The command line as a user runs it. A library that builds the network, installed again as another
    release (its metadata first on the path: what ``pip install torchvision==...`` leaves), is a miss, and
    an editable install of it is never answered from the cache."""
    folder, store = _folder(tmp_path), tmp_path / "s.zarr"
    first = _extract(folder, store)
    args = ["extract", "--backbone", NET, "--weights", "none", "--data", str(folder), "--store", str(store),
            "--dtype", "float32", "--workers", "0", "--no-progress"]
    code, imported, out = _cli(args, tmp_path)
    assert code == 0 and not imported, out
    assert f"set {first.set_key}" in out and "the model was not loaded" in out and "loading" not in out
    shadow = tmp_path / "site" / "torchvision-0.0.1.dist-info"
    shadow.mkdir(parents=True)
    (shadow / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.0.1\n")
    (shadow / "RECORD").write_text("")
    code, imported, out = _cli(args, tmp_path, path_first=tmp_path / "site")
    assert code == 0 and imported and f"loading {NET}" in out and f"set {first.set_key}" in out, out
    (shadow / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.29.1\n")
    (shadow / "direct_url.json").write_text('{"url": "file:///src/vision", "dir_info": {"editable": true}}')
    for _ in range(2):  # an editable install changes its code without its version: never answered from the cache
        code, imported, out = _cli(args, tmp_path, path_first=tmp_path / "site")
        assert code == 0 and imported and f"loading {NET}" in out, out


def test_the_answer_names_the_space_of_the_cached_provenance(tmp_path):
    """What the entry holds is the provenance the build made: its space key is the set's."""
    folder, store = _folder(tmp_path), tmp_path / "s.zarr"
    first = _extract(folder, store)
    [entry] = _entries()
    assert [space_key(p) for p in json.loads(entry.read_text())["provenances"]] == [first.space]
