import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from featcache.cli import main

from .helpers import TINY


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEATCACHE_STORE", raising=False)
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, list(args), catch_exceptions=False)

    return invoke


def test_the_two_product_commands_end_to_end(run, folder, tmp_path):
    """`featcache extract --backbone vgg16 --layer features` then `featcache fit --head mlp --epochs 30`."""
    r = run("extract", "--backbone", "vgg16", "--layer", "features", "--weights", "none", "--data", str(folder))
    assert r.exit_code == 0, r.output
    assert re.search(r"^layout: split folders .*\nhashing 36 files\nloading vgg16 \(layer features\)\n"
                     r"extracting 24 train \+ 12 val\n", r.output)  # a phase line as each phase starts
    assert re.search(r"set (\w{12}): 36 images \(train 24, val 12\); extracted 36 \([\d.]+ images/s\), reused 0; "
                     r"[\d.]+ s; [\d.]+ [KM]B on disk\ntime: [^\n]+\nnext: featcache fit --set \1\n$", r.output)
    assert (tmp_path / "featcache.zarr" / "zarr.json").exists()  # the default store

    r = run("fit", "--head", "mlp", "--epochs", "30", "--patience", "0")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 30
    assert re.match(r"epoch  1/30  train loss [\d.]+ acc [\d.]+  val loss [\d.]+ acc [\d.]+  [\d.]+ s", epochs[0])
    assert lines[-3] == "ran 30 epochs; kept epoch 30 (lowest val loss)" or re.match(r"ran 30 epochs; kept epoch \d+ ", lines[-3])
    assert re.match(r"run runs/\d{8}-\d{6}-mlp; val top-1 [\d.]+ \(selection-biased: chose the kept epoch\); "
                    r"load [\d.]+ s, fit [\d.]+ s", lines[-2])
    run_dir = lines[-2].split(";")[0].removeprefix("run ")
    assert lines[-1] == f"next: featcache report {run_dir}"
    assert len(json.loads((tmp_path / run_dir / "history.json").read_text())) == 30

    r = run("evaluate", run_dir)
    assert r.exit_code == 0 and "val per class: blue" in r.output and "confusion matrix" in r.output
    r = run("ls")
    header, row = r.output.splitlines()
    assert header.split() == ["set", "data", "classes", "train/val/test", "backbone/layer", "dtype", "size", "age", "by"]
    assert row.split()[1:6] == ["data", "3", "24/12/0", "vgg16/features", "f16"]
    assert [header.index(h) for h in ("data", "backbone/layer", "dtype")] == [row.index(v) for v in ("data ", "vgg16", "f16")]
    assert max(map(len, r.output.splitlines())) <= 100


def test_store_from_environment(run, folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATCACHE_STORE", str(tmp_path / "env.zarr"))
    assert run("extract", "--backbone", TINY, "--weights", "none", "--data", str(folder), "--workers", "0").exit_code == 0
    assert (tmp_path / "env.zarr").is_dir()
    assert run("fit", "--head", "logreg").exit_code == 0


def test_bad_option_value_is_a_usage_error_for_that_option(run, folder):
    """The full message for one case; tests/test_cli_options.py runs every option of every command."""
    r = run("extract", "--backbone", "vgg16", "--layer", "feature", "--weights", "none", "--data", str(folder))
    assert r.exit_code == 2
    assert r.output == (
        "layout: split folders train (train), val (val); 3 classes: blue, green, red\n"  # found before the backbone
        "hashing 36 files\nloading vgg16 (layer feature)\n"
        "Usage: main extract [OPTIONS]\nTry 'main extract --help' for help.\n\n"
        "Error: Invalid value for '--layer': Unknown layer 'feature' for vgg16. Layers: features, avgpool, flatten, "
        "classifier (and their sub-layers, e.g. features.20). See: featcache layers vgg16\n"
    )
    r = run("fit", "--head", "forest")
    assert r.exit_code == 2 and "Invalid value for '--head': 'forest' is not one of 'mlp', 'linear', 'rest', 'logreg', 'svm'" in r.output
    r = run("extract", "--data", str(folder))
    assert r.exit_code == 2 and "Missing option '--backbone'" in r.output


def test_other_mistakes_are_one_error_line(run, folder):
    assert run("extract", "--backbone", TINY, "--weights", "none", "--data", str(folder), "--workers", "0").exit_code == 0
    r = run("fit", "--head", "rest", "--pool", "avg")
    assert r.exit_code == 2 and "Invalid value for '--head': --head rest trains the network after the cached layer" in r.output
    Path("run").mkdir()
    r = run("evaluate", "run")
    assert r.exit_code == 2 and "not a featcache run directory" in r.output
    (Path("run") / "metrics.json").write_text("{")
    (Path("run") / "config.json").write_text("{}")
    r = run("evaluate", "run")
    assert r.exit_code == 1 and r.output.startswith("Error: run: unreadable run files") and "Traceback" not in r.output


def test_skipped_files_are_named_with_their_reason(run, folder):
    (folder / "train" / "red" / "zz.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    r = run("extract", "--backbone", TINY, "--weights", "none", "--data", str(folder), "--workers", "0")
    assert r.exit_code == 0
    assert "skipped train/red/zz.png: cannot decode" in r.output
    r = run("extract", "--backbone", TINY, "--weights", "none", "--data", str(folder), "--workers", "0", "--strict")
    assert r.exit_code == 1 and "Error: train/red/zz.png: cannot decode" in r.output


def test_backbones_layers_and_sample(run, tmp_path):
    r = run("backbones")
    assert r.exit_code == 0 and "resnet50\n" in r.output and "efficientnet_lite0\n" in r.output
    r = run("layers", "resnet18")
    lines = [ln.split() for ln in r.output.splitlines()]
    assert r.exit_code == 0 and ["layer3", "256x14x14"] in lines and ["avgpool", "512x1x1"] in lines
    assert ["flatten", "512", "(default)"] in lines and lines[-1] == ["84", "layers;", "default:", "flatten"]
    r = run("sample", "--out", "digits")
    assert r.exit_code == 0 and r.output == "digits sample in digits: train 1078, val 359, test 360\n"
    assert len(list(Path("digits/test/7").glob("*.png"))) == 36
    assert run("sample", "--out", "digits").exit_code == 0  # idempotent
    Path("other").mkdir()
    (Path("other") / "x").write_text("mine")
    r = run("sample", "--out", "other")
    assert r.exit_code == 2 and "Invalid value for '--out'" in r.output and "not the sample folder" in r.output
    assert (Path("other") / "x").read_text() == "mine"
