"""A tiny run of the benchmark suite so it never rots (no timing is asserted)."""

import json

import pytest
from click.testing import CliRunner

from benchmarks.__main__ import main
from benchmarks.storage import run_storage
from benchmarks.transfer import run_transfer

from .helpers import TINY


def test_whole_process_transfer_times_featcache_and_the_plain_script(folder):
    from benchmarks.transfer import run_transfer_processes

    row = run_transfer_processes(str(folder), "resnet18", "none", "linear", epochs=1, rounds=1, workers=0)
    assert row["featcache_s"] > row["featcache_extract_s"] > 0 and row["e2e_s"] > 0
    assert row["speedup"] == row["e2e_s"] / row["featcache_s"] and len(row["speedups"]) == 1


def test_transfer_benchmark_runs_both_ways_and_they_agree(folder):
    res = run_transfer(str(folder), TINY, weights="none", epochs=(1, 2), workers=0, batch_size=8)
    assert [r["epochs"] for r in res["rows"]] == [1, 2]
    for r in res["rows"]:
        assert r["e2e_epoch_s"] > 0 and r["cached_epoch_s"] > 0 and r["extract_s"] > 0
        assert r["val_images_apart"] <= 1  # same data, seed, init and batch order


def test_storage_benchmark_round_trips_every_codec(folder):
    res = run_storage(str(folder), TINY, spatial_layer="features", weights="none", repeats=1, workers=0,
                      codecs=["none", "zstd3+shuffle"])
    assert len(res["rows"]) == 2 * 2 * 2  # spatial/pooled x float16/float32 x codecs
    assert all(r["bytes_per_image"] > 0 for r in res["rows"])


def test_command_writes_json(folder, tmp_path, monkeypatch):
    import benchmarks.transfer

    # The command's whole-process comparison trains 10 epochs of resnet18 from pixels, 3 rounds by
    # default; one epoch, one round runs the same code (its figures are checked by
    # test_whole_process_transfer_times_featcache_and_the_plain_script).
    whole = benchmarks.transfer.run_transfer_processes
    monkeypatch.setattr(benchmarks.transfer, "run_transfer_processes",
                        lambda data, backbone, weights, head, epochs, **kw: whole(data, backbone, weights, head, 1, **kw))
    r = CliRunner().invoke(main, ["transfer", "--data", str(folder), "--case", f"{TINY}@none", "--epochs", "1",
                                  "--repeats", "1", "--workers", "0", "--batch-size", "8", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("machine: ") and "| backbone |" in r.output
    saved = list(tmp_path.glob("transfer-*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["rows"][0]["epochs"] == 1
    assert json.loads(saved[0].read_text())["processes"]["e2e_s"] > 0  # the whole-process comparison ran


def test_store_benchmark_reports_reuse_and_files(folder):
    from benchmarks.store import compaction, files_per_10k, run_store

    r = run_store(str(folder), TINY, weights="none", workers=0)
    assert r["second_extracted"] == 0 and r["added_images"] == 3  # every 10th of 24 training images
    files = files_per_10k(rows=300)
    assert [f["shape"] for f in files] == ["pooled 1280", "vgg16 features 512x7x7", "spatial 1280x7x7"]
    assert all(f["files"] >= 4 for f in files)
    c = compaction(str(folder), TINY, weights="none", workers=0, checkpoint_s=1e-9, batch_size=4)
    assert c["segments_before"] > 1 and c["segments_after"] == 1 and c["files_after"] < c["files_before"]


def test_throughput_benchmark_smoke(folder):
    from benchmarks.throughput import extract_vs_forward, fit_vs_bare, reader_vs_path

    r = extract_vs_forward(str(folder), TINY, weights="none", batch_size=8, workers=0, repeats=2)
    assert r["images"] == 36 and r["bare_forward_ips"] > 0 and r["extract_ips"] > 0
    rd = reader_vs_path(str(folder), TINY, weights="none", repeats=1)
    assert rd["images"] == 36 and rd["path_ips"] > 0 and rd["reader_ips"] > 0
    f = fit_vs_bare(rows=200, dim=64, classes=3, epochs=1, batch_size=32)
    assert f["fit_epoch_s"] > 0 and f["bare_epoch_s"] > 0 and f["load_gbs"] > 0


def test_views_benchmark_smoke(folder):
    from benchmarks.views import run_views

    rows = run_views(str(folder), TINY, weights="none", ks=(0, 2), epochs=1, workers=0)
    assert [r["views"] for r in rows] == [0, 2] and rows[1]["view_rows"] == 48 and rows[1]["view_bytes"] > 0


def test_memory_benchmark_smoke():
    from benchmarks.memory import run_memory

    rows = run_memory(rows=300, val=100, dim=64, budgets=("auto", "20KB"), epochs=1)
    assert [r["streamed"] for r in rows] == [False, True]
    assert all(r["peak_rss_mb"] >= r["base_rss_mb"] > 0 and r["val_acc"] > 0.5 for r in rows)


def test_scaleout_benchmark_smoke(folder):
    from benchmarks.scaleout import run_scaleout

    rows = run_scaleout(str(folder), TINY, None, "none", procs=(1, 2), batch_size=8)
    assert [r["processes"] for r in rows] == [1, 2] and all(r["images"] == 36 and r["wall_s"] > 0 for r in rows)


def test_predict_benchmark_smoke(folder, tmp_path):
    from benchmarks.predict import make_images, run_predict

    made = make_images(folder, tmp_path / "made", 5)
    assert len(list(made.glob("*.jpg"))) == 5
    rows = run_predict(str(folder), TINY, "none", counts=(4, 12), workers=(0,))
    assert [r["images"] for r in rows] == [4, 12] and all(r["computed"] == r["images"] for r in rows)
    assert all(r["peak_rss_mb"] >= r["base_rss_mb"] > 0 and r["failed"] == 0 for r in rows)


def test_layers_benchmark_smoke(folder, tmp_path):
    from benchmarks.layers import run_layers

    r = run_layers(str(folder), TINY, ["features", "avgpool"], "none", repeats=2, workers=0, batch_size=8)
    assert r["k"] == 2 and r["images"] == 36 and len(r["ratios"]) == 2 and r["one_pass_s"] > 0 and r["separate_s"] > 0
    out = CliRunner().invoke(main, ["layers", "--data", str(folder), "--case", f"{TINY}/features,avgpool@none",
                                    "--repeats", "1", "--workers", "0", "--out", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "| k extracts / one pass (median) |" in out.output and len(list(tmp_path.glob("layers-*.json"))) == 1
    bad = CliRunner().invoke(main, ["layers", "--data", str(folder), "--case", f"{TINY}@none"])
    assert bad.exit_code == 2 and "needs a case with several layers" in bad.output


def test_peers_benchmark_smoke(folder):
    import featcache
    from benchmarks.peers import extract_ways, fit_ways, has_datasets, load_ways

    rows = extract_ways(str(folder), TINY, weights="none", batch_size=8, workers=1, repeats=1)
    ways = [r["way"] for r in rows]
    assert ways[0] == "featcache extract (no env)" and ways[-1].startswith("bare forward")
    assert ("HF datasets .map + malloc env" in ways) == has_datasets()
    assert all(r["images"] == 36 and r["ips"] > 0 and r["peak_rss_mb"] > 0 for r in rows)
    assert rows[0]["over_fastest_peer"] > 0 and rows[0]["over_bare"] > 0
    store = str(folder.parent / "s.zarr")
    key = featcache.extract(backbone=TINY, weights="none", data=str(folder), store=store, batch_size=8).set_key
    load = load_ways(store, key, "pooled", repeats=1)  # every way is checked to return the same rows
    assert [r["way"] for r in load][:2] == ["featcache", "np.load"] and all(r["gbs"] > 0 for r in load)
    assert load[0]["bytes_per_image"] < load[1]["bytes_per_image"]  # compressed float16 against float32
    fit = fit_ways(store, key, epochs=1, batch_size=8, repeats=1)
    assert fit[0]["rows"] == 24 and fit[0]["featcache_epoch_s"] > 0 and fit[0]["bare_epoch_s"] > 0


def test_cli_benchmark_times_whole_processes(folder):
    from benchmarks.cli import run_cli

    rows = run_cli(str(folder), TINY, "none", rounds=1, workers=0)
    assert [r["command"] for r in rows][:4] == ["python -c pass", 'python -c "import click"',
                                                'python -c "import numpy"', 'python -c "import torch"']
    assert [r["command"] for r in rows][4:] == ["featcache --help", "featcache --version", "featcache ls",
                                                "featcache fit --head logreg", "featcache runs", "featcache backbones",
                                                "featcache extract (a mistyped --backbone)",
                                                "featcache extract (nothing to compute)"]
    assert all(r["median_s"] > 0 and r["over_pass"] > 0 for r in rows)


def test_sweep_benchmark_smoke(folder):
    from benchmarks.sweep import run_sweep

    row = run_sweep(str(folder), TINY, weights="none", grid={"head": ["logreg", "mlp"], "lr": [1e-3]}, epochs=2,
                    workers=0)
    assert row["combinations"] == 2 and row["same_val_top1"] == "2/2"
    assert row["sweep_s"] > 0 and row["separate_s"] > 0 and row["ratio"] > 0


def test_formats_benchmark_writes_and_reads_each_format_with_its_own_code(folder):
    import shutil
    import subprocess

    from benchmarks.formats import OLD_REV, ROOT, run_formats

    if shutil.which("git") is None or subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", OLD_REV],
                                                     capture_output=True).returncode != 0:
        pytest.skip(f"needs this repository's history (commit {OLD_REV}) and git")
    rows = run_formats(str(folder), TINY, "none", rounds=1, workers=0)
    assert [r["format"] for r in rows] == [1, 2] and rows[0]["code"] == OLD_REV
    assert all(r["same_rows"] for r in rows)  # both versions read back the same features and labels
    assert all(r["extract_s"] > 0 and r["read_gbs"] > 0 and r["files"] > 0 for r in rows)


@pytest.mark.slow
def test_scale_benchmark_smoke(tmp_path):
    """One tiny size through the command: every step runs in its own process and the table and JSON come out."""
    r = CliRunner().invoke(main, ["scale", "--sizes", "24", "--repeats", "1", "--workers", "0", "--ls-sets", "3",
                                  "--new-set", "16", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "| images | re-run, nothing changed s |" in r.output
    saved = json.loads(next(tmp_path.glob("scale-*.json")).read_text())
    row = saved["code"]["rows"][0]
    assert row["images"] == 24 and row["load_rows"] == 24 and row["files"] > 0
    assert row["plan_bytes_per_image_warm"] <= row["plan_bytes_per_image"]  # above a start that built a model too
    assert 0 < row["rerun_scan_s"] < row["rerun_s"] and row["rerun_peak_mb"] > 0 and row["ls_s"] > 0
    assert row["ls_sets"] == 3 and row["ls_many_s"] > 0 and row["ls_many_over_one"] == row["ls_many_s"] / row["ls_s"]
    assert row["new_set_images"] == 16 and row["new_set_space_rows"] == 24  # a new set into that store and an empty one
    assert row["new_load_ratio"] == row["new_load_full_s"] / row["new_load_empty_s"] and row["new_extract_peak_full_mb"] > 0


def test_rowindex_benchmark_smoke(tmp_path):
    """A space of a few hundred rows, one lookup process: the rows it read and the missing keys it counted."""
    from benchmarks.rowindex import run_rowindex

    out = run_rowindex(rows=250, lookups=20, rounds=1, tmp=str(tmp_path))
    assert out["code"]["rows_read"] == 20 and out["code"]["missing"] == 20  # of 40 keys, half stored
    assert out["code"]["first_lookup_s"] > 0 and out["code"]["peak_above_start"] >= 0


@pytest.mark.slow
def test_ray_benchmark_smoke(folder, tmp_path, monkeypatch):
    """``python -m benchmarks ray`` end to end on a tiny folder: the default engine, --engine ray (a local Ray
    instance of its own) and a run whose model actor the benchmark SIGKILLs, all giving the same set."""
    pytest.importorskip("ray.data", reason="the Ray engine needs Ray Data: pip install 'featcache[ray]'")
    import benchmarks.ray_engine

    whole = benchmarks.ray_engine.run_ray
    # the actor is killed as soon as it is seen (after 15 s by default: longer than this whole run)
    monkeypatch.setattr(benchmarks.ray_engine, "run_ray", lambda *a, **kw: whole(*a, **kw, kill_after_s=0.0))
    r = CliRunner().invoke(main, ["ray", "--data", str(folder), "--case", f"{TINY}@none", "--batch-size", "8",
                                  "--repeats", "1", "--hash-files", "30", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "| wall / default |" in r.output
    saved = list(tmp_path.glob("ray-*.json"))
    assert len(saved) == 1
    rows = json.loads(saved[0].read_text())["rows"]
    assert [row["actor_killed"] for row in rows] == [False, False, True]
    assert all(row["same_set"] and row["extracted"] == row["images"] == 36 for row in rows)
    assert all(row["cpu_s"] > 0 and row["peak_rss_mb"] > 0 for row in rows)
    hashing = json.loads(saved[0].read_text())["hashing"]
    assert [h["files"] for h in hashing] == [30, 30] and hashing[1]["way"] == "Ray tasks (5 of up to 7 paths)"
