"""Attacks that used to end in a traceback, an abort, a hang or orphaned processes: each now ends
in the right result, one ``Error:`` line with the fix, or a note."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import featcache
from featcache.cli import main

from .helpers import ROOT, SLOW, TINY, make_folder


def _python(code: str, *args, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


@pytest.fixture
def run_dir(tmp_path):
    data = make_folder(tmp_path / "data")
    store = str(tmp_path / "s.zarr")
    featcache.extract(backbone=TINY, layer="features", data=str(data), store=store, weights="none", workers=0)
    return featcache.fit(head="logreg", store=store, pool="avg", runs=str(tmp_path / "runs")).run_dir


# -- export to a full disk ---------------------------------------------------------------------------

@pytest.mark.slow  # a separate process (startup included)
def test_export_past_a_file_size_limit_is_one_error_and_leaves_nothing(run_dir, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes the writes really fail (EFBIG), as a full disk does
    (ENOSPC): torch's archive writer used to abort the whole process (SIGABRT, a C++ trace)."""
    out = tmp_path / "out" / "model.pt2"
    out.parent.mkdir()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))

    p = subprocess.run([sys.executable, "-m", "featcache.cli", "export", str(run_dir), str(out), "--backbone", TINY],
                       cwd=ROOT, capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("Error: cannot write") and "Traceback" not in p.stderr, p.stderr
    assert "file too large" in p.stderr and "re-run export" in p.stderr
    assert list(out.parent.iterdir()) == []  # nothing half-written, no temporary file left
    r = CliRunner().invoke(main, ["export", str(run_dir), str(out), "--backbone", TINY])  # room again: it works
    assert r.exit_code == 0, r.output
    assert sorted(q.name for q in out.parent.iterdir()) == ["model.pt2", "model.pt2.json"]


# -- killed or terminated extract with model processes -----------------------------------------------

_EXTRACT_WITH_PROCESSES = """
import sys
import featcache.procs as procs
procs.usable_cores = lambda: 2          # two model processes whatever the machine
procs._available_memory = lambda: None
from featcache.cli import run
sys.argv = ["featcache", *sys.argv[1:]]
run()
"""


def _children(pid: int) -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow  # a separate process (startup included)
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_extract_leaves_no_model_processes_behind(tmp_path, sig):
    data = make_folder(tmp_path / "data", splits=(("train", 30), ("val", 10)))  # 120 images: 8 batches of 16
    p = _python(_EXTRACT_WITH_PROCESSES, "extract", "--backbone", SLOW, "--weights", "none", "--data", data,
                "--store", tmp_path / "s.zarr", "--batch-size", "16")
    children: set[int] = set()
    deadline = time.monotonic() + 120
    while len(children) < 2 and p.poll() is None and time.monotonic() < deadline:
        children = _children(p.pid)
        time.sleep(0.05)
    assert len(children) >= 2, p.communicate()  # the model processes run
    time.sleep(0.5)  # they are busy with (or blocked on) their batches
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    gone_by = time.monotonic() + 10
    while any(map(_alive, children)) and time.monotonic() < gone_by:
        time.sleep(0.1)
    left = [c for c in children if _alive(c)]
    for c in left:  # clean up after a failure
        os.kill(c, signal.SIGKILL)
    assert not left, f"model processes {left} outlived their extract"
    if sig == signal.SIGTERM:
        assert p.returncode == 130 and "Interrupted" in err and "Traceback" not in err, err


# -- a catastrophic --labels-from-name ---------------------------------------------------------------

@pytest.mark.slow  # a separate process (startup included)
def test_a_catastrophic_label_pattern_is_refused_not_a_hang(tmp_path):
    """``(a+)+$`` on a name of 40 a's takes 2^40 steps in Python's ``re``, which not even Ctrl-C interrupts."""
    data = tmp_path / "data"
    data.mkdir()
    from PIL import Image

    for name in ("a" * 40 + "_1.png", "cat_2.png", "dog_3.png"):
        Image.new("RGB", (8, 8), (200, 0, 0)).save(data / name)
    p = subprocess.Popen([sys.executable, "-m", "featcache.cli", "extract", "--backbone", TINY, "--weights", "none",
                          "--data", str(data), "--store", str(tmp_path / "s.zarr"), "--workers", "0",
                          "--labels-from-name", "^(a+)+$"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail("extract hung on a catastrophic --labels-from-name")
    assert p.returncode == 2 and "Traceback" not in err, err
    assert "backtracks catastrophically" in err and "a" * 40 + "_1.png" in err and "Error:" in err
    assert not (tmp_path / "s.zarr").exists() or not featcache.open_store(str(tmp_path / "s.zarr")).set_keys()


def test_labels_by_pattern_gives_the_labels_of_re():
    import re

    from featcache.data.labels import labels_by_pattern

    names = ["cat.1.jpg", "dog_2.png", "x.png", "Bird-3.jpg", "_.png"]
    for pattern in (r"^([a-z]+)[._]", r"^([A-Za-z]+)\W", r"^([^._]*)[._]", r"(\d)"):
        want = [m.group(1) if (m := re.search(pattern, n)) and m.group(1) else None for n in names]
        assert labels_by_pattern(pattern, names) == want


# -- an MLflow server that does not answer -----------------------------------------------------------

@pytest.fixture
def tiny_store(tmp_path):
    store = str(tmp_path / "s.zarr")
    featcache.extract(backbone=TINY, data=str(make_folder(tmp_path / "data")), store=store, weights="none", workers=0)
    return store


@pytest.mark.slow  # a separate process (startup included)
@pytest.mark.parametrize("server", ["closed port", "silent listener"])
def test_an_unreachable_mlflow_server_fails_in_seconds(tiny_store, tmp_path, server):
    pytest.importorskip("mlflow")
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if server == "closed port":
        sock.close()
    else:
        sock.listen(8)  # takes connections (the kernel's backlog) and never answers one
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    p = subprocess.Popen([sys.executable, "-m", "featcache.cli", "fit", "--store", tiny_store, "--head", "logreg",
                          "--runs", str(tmp_path / "runs"), "--tracker", "mlflow", "--tracking-uri",
                          f"http://127.0.0.1:{port}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    try:
        _, err = p.communicate(timeout=90)  # MLflow's own retries take about 4 minutes
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail("fit waited on an MLflow server that does not answer")
    finally:
        sock.close()
    assert p.returncode == 1 and "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("Error:")]
    assert f"http://127.0.0.1:{port}" in line and "leave out --tracker" in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# -- an S3 endpoint that goes away mid-extract -------------------------------------------------------

def _committed_segments(client, bucket: str) -> int:
    import json

    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    n = 0
    for k in keys:
        parts = k.split("/")
        if len(parts) == 6 and parts[3] == "segments" and parts[5] == "zarr.json":
            attrs = json.loads(client.get_object(Bucket=bucket, Key=k)["Body"].read()).get("attributes", {})
            n += attrs.get("committed") is True
    return n


@pytest.mark.slow
def test_an_s3_endpoint_gone_mid_extract_is_one_error_and_the_rerun_resumes(tmp_path):
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_MAX_ATTEMPTS": "2"}  # botocore's retries: seconds, not half a minute
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    # a bucket of its own: moto keeps its buckets in this process, so another test's "feats" (its committed
    # segments included) would still be there
    bucket = f"attack-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    data = make_folder(tmp_path / "data", splits=(("train", 20), ("val", 6)))
    args = [sys.executable, "-m", "featcache.cli", "extract", "--backbone", SLOW, "--weights", "none", "--data",
            str(data), "--store", f"s3://{bucket}/store.zarr", "--workers", "0", "--batch-size", "4",
            "--checkpoint-every", "0.1"]
    p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while p.poll() is None and time.monotonic() < deadline and _committed_segments(client, bucket) < 1:
            time.sleep(0.3)
        assert p.poll() is None, p.communicate()  # the endpoint goes while the extract still runs
        server.stop()
        _out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1 and "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("Error:")]
    assert "stopped answering" in line and "committed and kept" in line and "re-run the same command" in line
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # the endpoint is back
    server.start()
    try:
        again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.stop()
    assert again.returncode == 0, again.stderr
    reused = int(again.stdout.split("reused ")[1].split()[0].rstrip(",;"))
    assert reused >= 4, again.stdout  # the committed batches were kept and not computed again


# -- a sweep over a set larger than --max-memory -----------------------------------------------------

@pytest.mark.parametrize("heads", ["mlp,logreg", "logreg,mlp"])
def test_a_sweep_with_a_head_that_cannot_stream_is_refused_before_any_fit(tiny_store, tmp_path, heads):
    r = CliRunner().invoke(main, ["fit", "--store", tiny_store, "--head", heads, "--max-memory", "1KB", "--epochs", "2",
                                  "--runs", str(tmp_path / "runs")])
    assert r.exit_code == 2, r.output
    assert "--head logreg needs the whole set in memory" in r.output and "raise --max-memory" in r.output, r.output
    assert not (tmp_path / "runs").exists()  # refused before any run was written
    ok = CliRunner().invoke(main, ["fit", "--store", tiny_store, "--head", "mlp,linear", "--max-memory", "1KB",
                                   "--epochs", "2", "--runs", str(tmp_path / "runs")])
    assert ok.exit_code == 0 and "streaming" in ok.output, ok.output  # heads that stream still sweep


# -- Hugging Face folders that do not fit, a timm tag that does not exist ----------------------------

@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    import json
    import shutil

    root = tmp_path_factory.mktemp("hf")
    vit = transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=32))
    vit.save_pretrained(root / "vit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")

    def edited(name: str, file: str, **changes) -> str:
        shutil.copytree(root / "vit", root / name)
        doc = json.loads((root / name / file).read_text())
        doc.update(changes)
        (root / name / file).write_text(json.dumps(doc))
        return str(root / name)

    return {"vit": str(root / "vit"),
            "wider": edited("wider", "config.json", hidden_size=32, intermediate_size=64),  # shapes differ
            "deeper": edited("deeper", "config.json", num_hidden_layers=2),  # a layer the weights do not have
            "huge": edited("huge", "preprocessor_config.json", size={"height": 1_000_000, "width": 1_000_000})}


@pytest.mark.parametrize("kind,says", [
    ("wider", "do not fit its config.json (the shapes of its layers differ)"),
    ("deeper", "do not fit its config.json: 16 parameters are not in them"),
    ("huge", "is not an image size of 1 to 4096 pixels"),
])
def test_a_hugging_face_folder_that_does_not_fit_is_one_error(hf_folders, tmp_path, kind, says):
    data = make_folder(tmp_path / "data", splits=(("train", 2), ("val", 1)))
    store = tmp_path / "s.zarr"
    r = CliRunner().invoke(main, ["extract", "--backbone", f"hf:{hf_folders[kind]}", "--data", str(data),
                                  "--store", str(store), "--workers", "0"])
    assert r.exit_code in (1, 2) and says in r.output and "save_pretrained" in r.output, r.output
    assert not store.exists() or not featcache.open_store(str(store)).set_keys()  # nothing stored from such a model
    ok = CliRunner().invoke(main, ["extract", "--backbone", f"hf:{hf_folders['vit']}", "--data", str(data),
                                   "--store", str(store), "--workers", "0"])
    assert ok.exit_code == 0, ok.output  # the folder as saved works


def test_a_timm_tag_that_does_not_exist_is_one_error_listing_the_tags():
    pytest.importorskip("timm")
    r = CliRunner().invoke(main, ["layers", "timm:resnet18.no_such_tag"])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert "timm model resnet18 has no pretrained tag 'no_such_tag'" in r.output and "a1_in1k" in r.output
    assert "timm:resnet18 for its default" in r.output


# -- names with two $ in plots -----------------------------------------------------------------------

def test_class_and_file_names_with_dollars_are_drawn_as_written(tmp_path):
    """mathtext parsed ``a$_$b`` as a formula and failed: fit's plots and every report crashed."""
    pytest.importorskip("matplotlib")
    classes = {"pay$_$red": (220, 40, 40), "$^$green": (40, 200, 40), "blue": (40, 40, 220)}
    data = make_folder(tmp_path / "data", classes=classes)
    for f in (data / "val" / "blue").iterdir():  # a blue image among the green ones: one misclassified tile
        f.rename(f.with_name("cost$_$" + f.name))
        break
    (data / "val" / "blue" / next(p.name for p in (data / "val" / "blue").iterdir())).rename(
        data / "val" / "$^$green" / "odd$_$one.png")
    store = str(tmp_path / "s.zarr")
    featcache.extract(backbone=TINY, data=str(data), store=store, weights="none", workers=0)
    r = CliRunner().invoke(main, ["fit", "--store", store, "--head", "logreg", "--runs", str(tmp_path / "runs"),
                                  "--data", str(data)])
    assert r.exit_code == 0, r.output
    (run,) = (tmp_path / "runs").iterdir()
    assert {"confusion.png", "per_class.png", "misclassified.png"} <= {p.name for p in run.iterdir()}, r.output
    rep = CliRunner().invoke(main, ["report", str(run), "--data", str(data)])
    assert rep.exit_code == 0, rep.output


# -- featcache sample --out . ------------------------------------------------------------------------

def test_sample_into_the_current_empty_folder(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    here = tmp_path / "project"
    here.mkdir()
    monkeypatch.chdir(here)
    r = CliRunner().invoke(main, ["sample", "--out", "."])
    assert r.exit_code == 0 and r.exception is None, r.output
    assert sorted(p.name for p in here.iterdir()) == [".featcache-sample", "test", "train", "val"]  # no temporary left
    n = {s: sum(1 for _ in (here / s).rglob("*.png")) for s in ("train", "val", "test")}
    assert r.output.strip() == f"digits sample in .: train {n['train']}, val {n['val']}, test {n['test']}"
    assert sum(n.values()) == 1797
    again = CliRunner().invoke(main, ["sample", "--out", "."])  # its own output: nothing to do
    assert again.exit_code == 0 and again.output == r.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "other")
    refused = CliRunner().invoke(main, ["sample", "--out", "."])
    assert refused.exit_code == 2 and "exists and is not the sample folder" in refused.output
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]


# -- 9: a run's weights file with another suffix -----------------------------------------------------

def test_a_weights_file_a_run_names_is_read_only_when_the_user_names_it(tmp_path, monkeypatch):
    """``--weights model.ckpt`` at extract: predict and export later, in the same folder, used to read
    ``./model.ckpt`` because the run names it (only .pth/.pt/.bin/.safetensors or a / counted as files)."""
    import torch

    from tests.tiny_backbone import tiny_cnn

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(5)
    torch.save(tiny_cnn().state_dict(), "model.ckpt")
    data = make_folder(tmp_path / "data")
    featcache.extract(backbone=TINY, data=str(data), store="s.zarr", weights="model.ckpt", workers=0)
    run = str(featcache.fit(head="logreg", store="s.zarr", runs="runs").run_dir)
    images = str(data / "val" / "red")
    for args in (["predict", run, images], ["export", run, "m.pt2"]):
        r = CliRunner().invoke(main, [*args, "--backbone", TINY])
        assert r.exit_code == 2 and "weights file 'model.ckpt'" in r.output and "Pass --weights PATH" in r.output, r.output
        ok = CliRunner().invoke(main, [*args, "--backbone", TINY, "--weights", "model.ckpt"])
        assert ok.exit_code == 0, ok.output


# -- 9: predict --csv and spreadsheet formulas -------------------------------------------------------

def test_predict_csv_cells_are_never_formulas(tmp_path, monkeypatch):
    import csv
    import io

    classes = {"=1+2": (220, 40, 40), "@SUM(A1)": (40, 200, 40), "-2+3": (40, 40, 220)}
    data = make_folder(tmp_path / "data", classes=classes)
    store = str(tmp_path / "s.zarr")
    featcache.extract(backbone=TINY, data=str(data), store=store, weights="none", workers=0)
    run = str(featcache.fit(head="logreg", store=store, runs=str(tmp_path / "runs")).run_dir)
    monkeypatch.chdir(data / "val" / "=1+2")
    (data / "val" / "=1+2" / "=1+2_0.png").rename(data / "val" / "=1+2" / "=cmd.png")
    r = CliRunner().invoke(main, ["predict", run, "=cmd.png", str(data / "val" / "@SUM(A1)"), "--csv", "--top-k", "3",
                                  "--backbone", TINY])
    assert r.exit_code == 0, r.output
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == ["path", "rank", "class", "probability", "error"] and len(rows) == 1 + 5 * 3
    for row in rows[1:]:
        assert all(cell[:1] not in ("=", "+", "-", "@") for cell in row), row
    assert rows[1][0] == "'=cmd.png"
    assert {row[2] for row in rows[1:]} == {"'=1+2", "'@SUM(A1)", "'-2+3"}  # the names, one quote in front


# -- 9: café written composed and decomposed ---------------------------------------------------------

NFC, NFD = "caf\u00e9", "cafe\u0301"


def test_a_class_written_composed_in_one_split_and_decomposed_in_another_is_one_class(tmp_path):
    import unicodedata

    data = make_folder(tmp_path / "data", classes={NFC: (220, 40, 40), "tea": (40, 200, 40)})
    (data / "val" / NFC).rename(data / "val" / NFD)  # the val split copied from a Mac
    store = str(tmp_path / "s.zarr")
    r = featcache.extract(backbone=TINY, data=str(data), store=store, weights="none", workers=0,
                          classes=f"{NFD},tea")  # --classes as a Mac terminal types it
    fs = featcache.open_store(store).get_set(r.set_key)
    assert list(fs.classes) == [NFC, "tea"]
    for split in ("train", "val"):
        folders = [unicodedata.normalize("NFC", p.split("/")[-2]) for p in fs.paths(split)]
        assert [fs.classes[i] for i in fs.labels(split)] == folders and set(folders) == {NFC, "tea"}
    fit = featcache.fit(head="logreg", store=store, runs=str(tmp_path / "runs"))
    assert fit.metrics["val"]["top1"] == 1.0  # café's val images are café's, not a class of their own


def test_two_folders_whose_names_differ_only_in_unicode_form_are_refused(tmp_path):
    data = make_folder(tmp_path / "data", classes={NFC: (220, 40, 40), "tea": (40, 200, 40)})
    (data / "train" / NFD).mkdir()
    for f in list((data / "train" / NFC).iterdir())[:3]:
        f.rename(data / "train" / NFD / f.name)
    r = CliRunner().invoke(main, ["extract", "--backbone", TINY, "--weights", "none", "--data", str(data),
                                  "--store", str(tmp_path / "s.zarr"), "--workers", "0"])
    assert r.exit_code == 1, r.output
    (line,) = [x for x in r.output.splitlines() if x.startswith("Error:")]
    assert ascii(NFC) in line and ascii(NFD) in line and "Merge them" in line
    assert not (tmp_path / "s.zarr").exists()


# -- 9: FEATCACHE_STORE=memory://... -----------------------------------------------------------------

def test_a_memory_store_is_refused_on_the_command_line_and_said_in_python(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", splits=(("train", 2), ("val", 1)))
    monkeypatch.setenv("FEATCACHE_STORE", "memory://feats")
    r = CliRunner().invoke(main, ["extract", "--backbone", TINY, "--weights", "none", "--data", str(data),
                                  "--workers", "0"])
    assert r.exit_code == 2 and "what it writes is gone when it ends" in r.output and "on disk" not in r.output, r.output
    assert "Traceback" not in r.output
    res = featcache.extract(backbone=TINY, data=str(data), store="memory://feats", weights="none", workers=0)
    assert res.summary().endswith("in memory, gone when this process ends") and "on disk" not in res.summary()


# -- 6 (runs): a fit on thousands of classes writes a run every reader can read ----------------------

@pytest.mark.slow
def test_a_run_on_1800_classes_is_readable(tmp_path):
    """Its confusion matrices (1800 x 1800 per split) made metrics.json about 70 MB, over the 64 MiB every
    reader accepts: the run was written and then refused by every command."""
    from PIL import Image

    from featcache.persist import MAX_JSON_BYTES

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(1800):
            folder = tmp_path / "data" / split / f"c{c:04d}"
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / "0.png")
    store = str(tmp_path / "s.zarr")
    featcache.extract(backbone=TINY, data=str(tmp_path / "data"), store=store, weights="none", workers=0,
                      batch_size=256)
    res = featcache.fit(head="mlp", store=store, epochs=1, runs=str(tmp_path / "runs"), plots=False)
    assert all((res.run_dir / name).stat().st_size <= MAX_JSON_BYTES for name in ("metrics.json", "config.json"))
    record = featcache.read_run(res.run_dir)
    assert len(record.classes) == 1800
    table = np.asarray(record.metrics["val"]["confusion_matrix"])
    assert table.shape == (1800, 1800) and table.sum() == 1800
    r = CliRunner().invoke(main, ["evaluate", str(res.run_dir)])
    assert r.exit_code == 0, r.output


def test_a_json_record_over_the_read_cap_is_refused_when_written(tmp_path):
    from featcache.errors import RunError
    from featcache.persist import MAX_JSON_BYTES, read_json, write_json

    small = tmp_path / "ok.json"
    write_json(small, {"a": "x" * 100})
    assert read_json(small, "here") == {"a": "x" * 100}
    with pytest.raises(RunError, match=r"over the .* bytes every reader accepts"):
        write_json(tmp_path / "big.json", {"a": "x" * (MAX_JSON_BYTES + 1)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.json"]  # nothing written, no temporary left


def test_after_an_error_line_the_exit_prints_no_storage_library_traceback(tmp_path):
    """A storage library's coroutines left pending by a failure are collected at exit; after featcache's one
    Error line they print nothing ('Exception ignored ... Traceback', 'never awaited')."""
    script = (
        "import asyncio, sys\n"
        "async def wait():\n"
        "    await asyncio.sleep(60)\n"
        "async def write():\n"
        "    try:\n"
        "        await wait()\n"
        "    finally:\n"
        "        raise ConnectionError('the endpoint went away')\n"
        "loop = asyncio.new_event_loop()\n"
        "loop.create_task(write())\n"
        "loop.run_until_complete(asyncio.sleep(0))  # left pending, as zarr's writes are when S3 goes\n"
        "from featcache.cli import run\n"
        f"sys.argv = ['featcache', 'info', '--store', {str(tmp_path / 'none.zarr')!r}]\n"
        "run()\n"
    )
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr  # a usage error: no store there
    assert p.stderr.strip().splitlines()[-1].startswith("Error: "), p.stderr
    for noise in ("Traceback", "Exception ignored", "never awaited", "Task was destroyed"):
        assert noise not in p.stderr, p.stderr
