import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import featcache
from featcache.cli import main
from featcache.data import load_rgb
from featcache.errors import StoreError
from featcache.predict import export, predict

from .helpers import TINY, make_folder


@pytest.fixture
def trained(folder, store_url, tmp_path):
    featcache.extract(backbone=TINY, layer="features", data=str(folder), store=store_url, weights="none", workers=0)
    runs = {}
    for head, pool in (("mlp", "none"), ("logreg", "avg")):
        torch_options = {"epochs": 20, "lr": 1e-2} if head == "mlp" else {}
        runs[head] = featcache.fit(head=head, store=store_url, pool=pool, runs=str(tmp_path / "runs"), **torch_options).run_dir
    return runs


@pytest.mark.parametrize("head", ["mlp", "logreg"])
def test_predict_matches_the_head_on_stored_features(trained, folder, store_url, head):
    run = trained[head]
    fs = featcache.open_store(store_url).get_set()
    from featcache.pooling import prepare_features

    stored = featcache.load_head(run).predict_proba(prepare_features(fs.features("val"), "avg" if head == "logreg" else "none"))
    results = predict(run, [folder / p for p in fs.paths("val")], top_k=3, backbone=TINY)
    for r, want in zip(results, stored):
        assert r.error is None and len(r.top) == 3
        got = dict(r.top)
        for j, c in enumerate(fs.classes):
            assert abs(got[c] - want[j]) < 1e-3
    assert [r.top[0][0] for r in results] == [fs.classes[i] for i in fs.labels("val")]


def test_unreadable_files_are_reported_and_the_rest_predicted(trained, folder, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    results = predict(trained["mlp"], [bad, folder / "val" / "red"], backbone=TINY)
    assert results[0].error.startswith("cannot decode") and results[0].top == []
    assert len(results) == 5 and all(r.top[0][0] == "red" for r in results[1:])


@pytest.mark.parametrize("head", ["mlp", "logreg"])
def test_exported_program_equals_predict(trained, folder, tmp_path, head):
    out = export(trained[head], tmp_path / f"{head}.pt2", backbone=TINY)
    meta = json.loads((tmp_path / f"{head}.pt2.json").read_text())
    assert meta["classes"] == ["blue", "green", "red"] and meta["preprocessing"]["crop_size"] == [32]
    program = torch.export.load(str(out)).module()
    from featcache.backbones import create_backbone

    transform = create_backbone(TINY, layer="features", weights="none").transform
    files = sorted((folder / "val").rglob("*.png"))
    batch = torch.stack([transform(load_rgb(f)) for f in files])
    proba = program(batch).detach().numpy()
    results = predict(trained[head], files, top_k=3, backbone=TINY)
    for p, r in zip(proba, results):
        for c, q in r.top:
            assert abs(p[meta["classes"].index(c)] - q) < 1e-5


def test_predict_and_export_commands(trained, folder, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["predict", str(trained["mlp"]), str(folder / "val" / "blue" / "blue_0.png"), "--json", "--backbone", TINY])
    assert r.exit_code == 0
    doc = json.loads(r.output.split("\n1 predicted")[0])
    assert doc[0]["top"][0]["class"] == "blue"
    r = runner.invoke(main, ["predict", str(trained["mlp"]), str(folder / "val" / "green"), "--csv", "--top-k", "1", "--backbone", TINY])
    assert r.exit_code == 0 and r.output.splitlines()[0] == "path,rank,class,probability,error"
    assert sum(",1,green," in line for line in r.output.splitlines()) == 4
    r = runner.invoke(main, ["export", str(trained["logreg"]), str(tmp_path / "m.pt2"), "--backbone", TINY])
    assert r.exit_code == 0 and (tmp_path / "m.pt2").is_file()


def test_predict_reads_cached_rows_and_computes_nothing(trained, folder, store_url, tmp_path, monkeypatch):
    from featcache import compute

    files = sorted((folder / "val").rglob("*.png"))
    real = compute.run_backbone

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was run although every row is in the store")

    monkeypatch.setattr(compute, "run_backbone", refuse)
    cached = predict(trained["mlp"], files, top_k=3, backbone=TINY)
    assert (cached.counts.from_store, cached.counts.computed, cached.notes) == (12, 0, [])
    monkeypatch.setattr(compute, "run_backbone", real)
    import shutil

    shutil.move(store_url, tmp_path / "moved.zarr")  # the store is gone: an error, never a silent recomputation
    with pytest.raises(StoreError, match="Pass --store with where it is now, or --recompute"):
        predict(trained["mlp"], files, top_k=3, backbone=TINY)
    fresh = predict(trained["mlp"], files, top_k=3, backbone=TINY, recompute=True)  # asked for: same answers
    assert (fresh.counts.from_store, fresh.counts.computed, fresh.notes) == (0, 12, [])
    for a, b in zip(cached, fresh):
        assert [c for c, _ in a.top] == [c for c, _ in b.top]
        assert np.allclose([p for _, p in a.top], [p for _, p in b.top], atol=1e-3)


def test_new_images_go_through_the_reader_in_worker_processes(trained, tmp_path):
    new = make_folder(tmp_path / "new", splits=(("", 3),), seed=3)
    bad = new / "red" / "broken.png"
    bad.write_bytes(b"not a png")
    results = predict(trained["logreg"], [new], top_k=1, batch_size=4, workers=1, backbone=TINY)
    assert results.counts.computed == 9 and results.counts.from_store == 0
    assert [r.path for r in results] == [str(p) for p in sorted(new.rglob("*.png"))]  # the order of the files
    assert sum(r.error is not None for r in results) == 1 and "broken.png" in next(r.path for r in results if r.error)
    assert all(r.top[0][0] == r.path.split("/")[-2] for r in results if r.error is None)


def test_predict_exits_1_when_no_file_can_be_read_and_2_for_a_missing_path(trained, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    runner = CliRunner()
    r = runner.invoke(main, ["predict", str(trained["mlp"]), str(bad), "--backbone", TINY])
    assert r.exit_code == 1 and "Error: none of the 1 file(s) could be read" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["predict", str(trained["mlp"]), str(bad), str(tmp_path / "gone.jpg"), "--backbone", TINY])
    assert r.exit_code == 2 and "Invalid value for 'PATHS...'" in r.output and "gone.jpg' does not exist" in r.output
    (tmp_path / "empty").mkdir()
    r = runner.invoke(main, ["predict", str(trained["mlp"]), str(tmp_path / "empty"), "--backbone", TINY])
    assert r.exit_code == 1 and "Error: no image files" in r.output
