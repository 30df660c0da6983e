"""The shared store: reuse, staleness, concurrency, crashes, maintenance, remote, permissions."""

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import featcache
from featcache.audit import status, verify
from featcache.cli import main
from featcache.store.maintenance import gc

from .helpers import ROOT, SLOW, TINY, all_rows, cli_process, extract_tiny, make_folder


def test_incremental_add_change_and_remove(folder, store_url):
    extract_tiny(folder, store_url)
    make_folder(folder / "extra", splits=(("train", 0),))  # nothing yet
    extra = folder / "train" / "red" / "new.png"
    extra.write_bytes((folder / "train" / "red" / "red_0.png").read_bytes()[:-1] + b"\0")  # new bytes
    r = extract_tiny(folder, store_url)
    assert (r.extracted, r.reused) == (1, 36) or (r.extracted + len(r.skipped), r.reused) == (1, 36)
    # same name, other bytes: re-extracted; a removed file leaves the view
    from PIL import Image

    Image.new("RGB", (20, 20), (1, 2, 3)).save(folder / "train" / "blue" / "blue_0.png")
    (folder / "val" / "green" / "green_3.png").unlink()
    r = extract_tiny(folder, store_url)
    assert r.extracted == 1
    fs = featcache.open_store(store_url).get_set(r.set_key)
    assert "val/green/green_3.png" not in fs.paths("val") and len(fs.paths("val")) == 11


def test_status_and_check_data(folder, store_url, tmp_path, monkeypatch):
    extract_tiny(folder, store_url)
    st = featcache.open_store(store_url)
    assert status(st, data=str(folder)).up_to_date
    (folder / "train" / "red" / "red_1.png").unlink()
    from PIL import Image

    Image.new("RGB", (20, 20), (9, 9, 9)).save(folder / "train" / "red" / "red_new.png")
    Image.new("RGB", (20, 20), (7, 7, 7)).save(folder / "train" / "blue" / "blue_2.png")
    s = status(st, data=str(folder))
    assert (s.added, s.removed, s.changed, s.to_extract) == (
        ["train/red/red_new.png"], ["train/red/red_1.png"], ["train/blue/blue_2.png"], 2)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    r = runner.invoke(main, ["status", "--store", store_url, "--data", str(folder)])
    assert r.exit_code == 0 and "1 added, 1 removed, 1 changed; 2 images need extracting" in r.output
    r = runner.invoke(main, ["fit", "--store", store_url, "--check-data", str(folder), "--head", "logreg"])
    last = r.output.splitlines()[-1]  # after the phase lines of the scan
    assert r.exit_code == 1 and last.startswith("Error: set ") and "1 added, 1 removed" in last
    assert runner.invoke(main, ["fit", "--store", store_url, "--head", "logreg"]).exit_code == 0


def test_status_shows_moves_between_splits_and_files_extract_will_skip(tmp_path, store_url):
    """A flat folder split by --split: images added next to a cut move others to another split. Each
    path is named once, as moved with both splits, never as both added and removed; a new empty file
    that extract would skip is named with its reason."""
    from PIL import Image

    folder = make_folder(tmp_path / "flat", splits=((None, 10),))
    extract_tiny(folder, store_url, split=(0.7, 0.3))
    st = featcache.open_store(store_url)
    (folder / "green" / "empty.png").write_bytes(b"")
    rng = np.random.default_rng(1)
    for i in range(40):  # add red images one at a time until one lands next to a cut and moves another
        Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(folder / "red" / f"more_{i}.png")
        s = status(st, data=str(folder))
        added = {p.split("/", 1)[1] for p in s.added}
        removed = {p.split("/", 1)[1] for p in s.removed}
        assert not added & removed, (s.added, s.removed)
        assert removed == set() and len(added) == i + 1
        if s.moved:
            break
    assert s.moved, "40 more red images moved none of the first 10 across the cut"
    for line in s.moved:
        path, splits = line.rsplit(" (", 1)
        assert path.startswith("red/") and splits in ("train -> val)", "val -> train)"), line
    assert s.skipped == ["green/empty.png: empty file (0 bytes)"]
    assert not s.up_to_date
    r = CliRunner().invoke(main, ["status", "--store", store_url, "--data", str(folder)])
    assert r.exit_code == 0, r.output
    assert f"moved {s.moved[0]}" in r.output and "will skip green/empty.png: empty file (0 bytes)" in r.output
    assert f"{len(s.moved)} moved between splits, 1 to be skipped" in r.output


def test_verify_counts_the_rows_of_the_set_not_every_row_of_the_chunks_it_reads(folder, tmp_path, store_url):
    import shutil

    extract_tiny(folder, store_url)  # 36 images in one segment
    part = tmp_path / "part"
    shutil.copytree(folder / "train", part / "train")
    shutil.copytree(folder / "val", part / "val")
    for f in sorted((part / "train" / "red").glob("*.png"))[:5]:
        f.unlink()
    small = extract_tiny(part, store_url)
    assert small.extracted == 0 and small.images == 31
    v = verify(featcache.open_store(store_url), small.set_key)
    assert v.ok and v.rows == 31 and v.stored_rows == 36
    assert "31 rows of the set checksummed (in 36 stored rows read)" in v.summary()


def test_an_open_store_sees_segments_other_writers_commit_change_and_remove(folder, store_url):
    """The row index is cached between loads; a commit, a changed segment or a removal by another
    writer (another Store here, another process in use) is seen on the next lookup."""
    first = extract_tiny(folder, store_url)
    st = featcache.open_store(store_url)
    old = st.known_hashes(first.space)
    make_folder(folder, splits=(("train", 3),), seed=7)  # 9 images rewritten: 9 new rows
    second = extract_tiny(folder, store_url)
    assert second.space == first.space
    new = st.known_hashes(first.space)
    assert old < new and len(new) == len(old) + 9  # committed meanwhile: seen without re-opening
    other = featcache.open_store(store_url)
    segments, where = other.locate(first.space, sorted(new - old)[:1])
    name = segments[int(where[0, 0])].key  # the second extract's segment (names sort by second, then at random)
    group = other.root["spaces"][first.space]["segments"][name]
    group.attrs["committed"] = False  # no longer committed: its rows count as missing
    assert st.known_hashes(first.space) == old
    group.attrs["committed"] = True
    assert st.known_hashes(first.space) == new
    other.remove_segment(first.space, name)
    assert st.known_hashes(first.space) == old


def test_concurrent_writers_lose_and_duplicate_nothing(tmp_path):
    a = make_folder(tmp_path / "a", seed=1)
    b = make_folder(tmp_path / "b", seed=2)
    store = tmp_path / "s.zarr"
    featcache.open_store(str(store))  # exists before the race, as a shared store would
    procs = [
        cli_process("extract", "--backbone", TINY, "--weights", "none", "--data", d, "--store", store, "--workers", "0",
             "--checkpoint-every", "0.01", "--batch-size", "4", *extra)
        for d, extra in ((a, ()), (a, ()), (b, ()), (b, ("--dtype", "float32")))
    ]
    for p in procs:
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    st = featcache.open_store(str(store))
    assert len(st.set_keys()) == 3  # a, b in float16 and b in float32
    for key in st.set_keys():
        fs = st.get_set(key)
        x, _y = fs.to_numpy("train")
        assert x.shape[0] == 24 and np.isfinite(x).all()
    # a reader sees each image once per space, whichever writer finished first
    for space in st.spaces():
        index = st._index(space)[1]
        assert len(index) == len(st.known_hashes(space))


def _wait_for_commit(store: Path, proc, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            pytest.fail(f"extract ended before it could be interrupted: {proc.communicate()}")
        try:
            st = featcache.open_store(str(store), mode="r")
            if any(st.space_stats(s)["rows"] for s in st.spaces()):
                return
        except Exception:
            pass
        time.sleep(0.05)
    pytest.fail("no segment was committed in time")


def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    folder = make_folder(tmp_path / "d", splits=(("train", 30), ("val", 10)))
    args = ["extract", "--backbone", SLOW, "--weights", "none", "--data", folder, "--workers", "0",
            "--batch-size", "4", "--checkpoint-every", "0.1"]
    killed = tmp_path / "killed.zarr"
    p = cli_process(*args, "--store", killed)
    _wait_for_commit(killed, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done_before = featcache.open_store(str(killed)).space_stats(featcache.open_store(str(killed)).spaces()[0])["rows"]
    assert 0 < done_before < 120
    p = cli_process(*args, "--store", killed)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert f"reused {done_before}" in out
    clean = tmp_path / "clean.zarr"
    p = cli_process(*args, "--store", clean)
    assert p.wait(timeout=300) == 0
    got, want = all_rows(killed), all_rows(clean)
    assert got.keys() == want.keys()
    for h in want:
        assert np.array_equal(got[h], want[h]), h  # bit for bit on CPU


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path):
    folder = make_folder(tmp_path / "d", splits=(("train", 30), ("val", 10)))
    store = tmp_path / "s.zarr"
    args = ["extract", "--backbone", SLOW, "--weights", "none", "--data", folder, "--workers", "0",
            "--batch-size", "4", "--checkpoint-every", "0.1", "--store", store]
    p = cli_process(*args)
    _wait_for_commit(store, p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Interrupted:" in err and "Re-run the same command to resume" in err and "Traceback" not in err
    p = cli_process(*args)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and "reused 0" not in out, out + err


def test_ls_info_rm_gc(folder, store_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = extract_tiny(folder, store_url).set_key
    b = extract_tiny(folder, store_url, layer="features").set_key
    st = featcache.open_store(store_url)
    leftover = st.new_segment(st.spaces()[0], 3, (32,), "float16")
    leftover.append(np.ones((3, 32), np.float16), ["e" * 64] * 3)
    runner = CliRunner()
    r = runner.invoke(main, ["ls", "--store", store_url])
    assert r.exit_code == 0 and a in r.output and b in r.output and "KB" in r.output
    r = runner.invoke(main, ["info", a[:6], "--store", store_url])
    assert r.exit_code == 0 and '"backbone": "tests.tiny_backbone:tiny_cnn"' in r.output
    assert runner.invoke(main, ["rm", b, "--store", store_url]).output.startswith(f"removed set {b}")
    assert featcache.open_store(store_url).set_keys() == [a]
    r = runner.invoke(main, ["gc", "--store", store_url, "--grace", "0"])
    assert r.exit_code == 0 and "segments removed 2" in r.output  # b's rows and the uncommitted leftover
    st = featcache.open_store(store_url)
    assert [k for k in st.spaces() if st.space_stats(k)["rows"]] == [st.get_set(a).space]
    assert st.get_set(a).to_numpy("train")[0].shape == (24, 32)
    assert "freed 0 B" in runner.invoke(main, ["gc", "--store", store_url, "--grace", "0"]).output


def test_gc_keeps_young_leftovers_and_rewrites_partly_used_segments(folder, store_url, tmp_path):
    extract_tiny(folder, store_url)
    (folder / "val" / "red" / "red_0.png").unlink()
    keep = extract_tiny(folder, store_url).set_key
    st = featcache.open_store(store_url)
    first = next(k for k in st.set_keys() if k != keep)
    st.remove_set(first)
    assert gc(st, grace_s=3600).rows_removed == 0  # all too young
    r = gc(st, grace_s=0)
    assert (r.segments_rewritten, r.rows_removed) == (1, 1)
    assert featcache.open_store(store_url).get_set(keep).to_numpy("val")[0].shape[0] == 11


def test_verify_detects_corruption_and_other_sets_still_work(folder, store_url, tmp_path):
    a = extract_tiny(folder, store_url, layer="features").set_key
    b = extract_tiny(folder, store_url).set_key
    st = featcache.open_store(store_url)
    report = verify(st, a, sample=4, data=str(folder), backbone=TINY)
    assert report.ok and report.compared == 4 and report.rows == 36, report.errors
    space = st.get_set(a).space
    shard = next(p for p in (Path(store_url) / "spaces" / space).rglob("*")
                 if p.is_file() and "features" in p.parts and "c" in p.parts)
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = verify(featcache.open_store(store_url), a)
    assert not report.ok and f"space {space} segment" in report.errors[0] and "chunk 0" in report.errors[0]
    r = CliRunner().invoke(main, ["verify", a, "--store", store_url])
    assert r.exit_code == 1 and "FAILED" in r.output
    assert verify(featcache.open_store(store_url), b).ok


def test_shared_directory_stays_group_writable(folder, tmp_path):
    store = tmp_path / "team.zarr"
    featcache.open_store(str(store))
    os.chmod(store, 0o2775)
    old = os.umask(0o022)
    try:
        extract_tiny(folder, store)
    finally:
        os.umask(old)
    files = [p for sub in ("spaces", "sets") for p in (store / sub).rglob("*")]  # all written after the chmod
    assert files and all(p.stat().st_mode & stat.S_IWGRP for p in files)


@pytest.fixture
def s3(monkeypatch):
    s3fs = pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    # fsspec keeps a filesystem per set of arguments, not per endpoint: one made for an earlier test's
    # server (stopped since) would otherwise be handed back here
    s3fs.S3FileSystem.clear_instance_cache()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(k, v)
    import boto3

    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="feats")
    yield "s3://feats/store.zarr"
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_store_on_loopback(folder, s3, tmp_path):
    r = extract_tiny(folder, s3)
    again = extract_tiny(folder, s3)
    assert again.extracted == 0 and again.reused == 36
    fs = featcache.open_store(s3).get_set(r.set_key)
    assert fs.to_numpy("train")[0].shape == (24, 32)
    fit = featcache.fit(head="logreg", store=s3, runs=str(tmp_path / "runs"))
    assert fit.metrics["val"]["top1"] == 1.0


def test_torchrun_two_processes_equal_one(tmp_path):
    folder = make_folder(tmp_path / "d", splits=(("train", 10), ("val", 4)))
    args = ["extract", "--backbone", TINY, "--weights", "none", "--data", folder, "--workers", "0", "--batch-size", "4"]
    one = tmp_path / "one.zarr"
    assert cli_process(*args, "--store", one).wait(timeout=300) == 0
    two = tmp_path / "two.zarr"
    # every rank counts the images it opens (an audit hook, so nothing in featcache is changed for it)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(f"""
import atexit, os, sys
opened = []
def audit(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].startswith({str(folder)!r}) and args[0].endswith(".png"):
        opened.append(args[0])
sys.addaudithook(audit)
atexit.register(lambda: open(os.path.join({str(hook)!r}, "rank" + os.environ.get("RANK", "x")), "w").write(
    "\\n".join(opened)))
""")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "featcache.cli", *map(str, args), "--store", str(two), "--rehash"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)])}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    opened = {r: (hook / f"rank{r}").read_text().split("\n") for r in (0, 1)}
    # rank 0 hashes all 42 images (and decodes its share); rank 1 decodes only its share: one scan, shared
    assert len(set(opened[0])) == 42 and 0 < len(opened[1]) <= 21, {r: len(v) for r, v in opened.items()}
    assert p.stdout.count("extracted 42 (") == 1 and "reused 0;" in p.stdout  # rank 0 reports for both
    assert p.stderr.count("extracting 30 train + 12 val") == 1  # and only rank 0 shows phase lines
    st = featcache.open_store(str(two))
    segments = st.segment_groups(st.spaces()[0])
    assert len({g.attrs["created_by"] for _, g in segments}) >= 1 and len(segments) >= 2  # each rank wrote its own
    assert featcache.open_store(str(one)).set_keys() == st.set_keys()
    got, want = all_rows(two), all_rows(one)
    assert got.keys() == want.keys() and all(np.array_equal(got[h], want[h]) for h in want)


def test_torchrun_a_rank_receives_its_share_only_not_the_manifest_or_the_index(tmp_path):
    """Rank 0 scans, reads the space's row keys and plans; rank 1 gets only its images and which of them the
    space holds: it opens no image outside its share and no key of a segment it did not write."""
    store = tmp_path / "s.zarr"
    before = make_folder(tmp_path / "before", splits=(("train", 6), ("val", 2)), seed=1)
    assert cli_process("extract", "--backbone", TINY, "--weights", "none", "--data", before, "--workers", "0",
                       "--store", store).wait(timeout=300) == 0  # the space holds rows: an index to build
    st = featcache.open_store(str(store))
    old = {g for g, _ in st.segment_groups(st.spaces()[0])}
    folder = make_folder(tmp_path / "d", splits=(("train", 8), ("val", 4)), seed=2)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(f"""
import atexit, os, sys
opened = []
def audit(event, args):
    if event == "open" and isinstance(args[0], str) and ("w" not in str(args[1])) and (
            args[0].startswith({str(folder)!r}) or "/segments/" in args[0]):
        opened.append(args[0])
sys.addaudithook(audit)
atexit.register(lambda: open(os.path.join({str(hook)!r}, "rank" + os.environ.get("RANK", "x")), "w").write(
    "\\n".join(opened)))
""")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "featcache.cli", "extract", "--backbone", TINY, "--weights", "none", "--data", str(folder),
           "--workers", "0", "--batch-size", "4", "--store", str(store), "--rehash"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)])}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    opened = {r: set(filter(None, (hook / f"rank{r}").read_text().split("\n"))) for r in (0, 1)}
    # rank 0 searched their keys (their sorted keys' chunks, or the keys themselves)
    assert all(any(f"/segments/{g}/" in path and "/c/" in path for path in opened[0]) for g in old)
    images = {r: {path for path in opened[r] if path.startswith(str(folder))} for r in (0, 1)}
    assert len(images[0]) == 36 and 0 < len(images[1]) <= 18, {r: len(v) for r, v in images.items()}
    assert not any(f"/segments/{g}/" in path for g in old for path in opened[1]), sorted(opened[1])
    assert p.stdout.count("extracted 36 (") == 1
    fs = featcache.open_store(str(store)).get_set()
    assert sum(fs.record.splits.values()) == 36 and len(all_rows(store)) == 36


def test_torchrun_a_folder_rank_0_refuses_stops_every_rank_with_its_error(tmp_path):
    """Only rank 0 scans: its refusal reaches the other rank, which stops with the same error
    instead of waiting for a manifest."""
    folder = tmp_path / "empty"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (folder / split / c).mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "featcache.cli", "extract", "--backbone", TINY, "--weights", "none", "--data", str(folder),
           "--store", str(tmp_path / "s.zarr"), "--workers", "0"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert p.stderr.count("Error: no images in") == 2, p.stderr  # each rank says it once, nobody hangs
    assert "featcache/" not in p.stderr, p.stderr  # torchrun's own report only: no featcache traceback


def test_gc_removes_partial_writes_a_killed_process_left(folder, store_url):
    extract_tiny(folder, store_url)
    stale = Path(store_url) / "zarr.0123.partial"
    stale.write_bytes(b"x" * 100)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = Path(store_url) / "zarr.4567.partial"
    fresh.write_bytes(b"y")
    r = gc(featcache.open_store(store_url), grace_s=3600)
    assert not stale.exists() and fresh.exists() and r.bytes_freed >= 100
