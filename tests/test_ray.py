"""``extract --engine ray`` on a real local Ray cluster (started and stopped here, bound to 127.0.0.1):
the same set and bit-identical rows as the one-process engine, with actors, write tasks, the driver
and nodes lost on the way, a straggler, and the store on the local S3 server.

One cluster serves the module (a head with 2 CPUs; a test adds and removes a node). Faults are
done for real inside the Ray workers (tests/ray_helpers.py): SIGKILL of a model actor, SIGKILL of
a write task between its rows and its commit marker, SIGKILL of the driver, removal of a node."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray engine needs Ray Data: pip install 'featcache[ray]'")
pytest.importorskip("ray.data", reason="the Ray engine needs Ray Data: pip install 'featcache[ray]'")

from featcache import ray_engine, ray_hash  # noqa: E402
from featcache.store import open_store  # noqa: E402
from featcache.store.maintenance import gc  # noqa: E402

from .helpers import ROOT, TINY, extract_tiny, make_folder  # noqa: E402

pytestmark = pytest.mark.slow
PROBE = "tests.ray_helpers:probe_cnn"
SLOW_PROBE = "tests.ray_helpers:slow_probe_cnn"
LOOPBACK = {"127.0.0.1", "::1"}


def _listening(pids: set[int]) -> set[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state that the processes ``pids`` hold (from /proc)."""
    out = set()
    for pid in pids:
        try:
            inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
                      if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
        except OSError:
            continue  # ended meanwhile
        for table, v6 in (("tcp", False), ("tcp6", True)):
            try:
                lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                f = line.split()
                if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                    continue
                hexip, hexport = f[1].split(":")
                raw = bytes.fromhex(hexip)
                if v6:  # four 32-bit words, each in host (little-endian) order
                    addr = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
                    ip = str(addr.ipv4_mapped or addr)
                else:
                    ip = ".".join(str(b) for b in raw[::-1])
                out.add((pid, ip, int(hexport, 16)))
    return out


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray cluster on 127.0.0.1 (head: 2 CPUs, no dashboard, no usage stats) and, when moto is installed,
    a local S3 server its workers reach; faults are armed in ``faults``."""
    from ray.cluster_utils import Cluster

    faults = tmp_path_factory.mktemp("ray-faults")
    saved = dict(os.environ)
    server = s3 = None
    # Ray's files of this cluster, its sockets and the record of its address (which a command given no address
    # joins) in a folder of its own: not another Ray's on this machine, nor theirs ours (short: socket paths)
    ray_tmp = tempfile.mkdtemp(prefix="fcray-", dir="/tmp")
    env = {"RAY_USAGE_STATS_ENABLED": "0", "FEATCACHE_RAY_TEST_DIR": str(faults), "HF_HUB_OFFLINE": "1",
           "RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    try:
        import boto3
        import s3fs
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        env.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
        boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                     aws_access_key_id="test", aws_secret_access_key="test").create_bucket(Bucket="feats")
        s3 = "s3://feats"
    except ImportError:
        pass
    # Ray turns a loopback address it is asked to join into this machine's address unless told that this
    # is no multi-machine setup: the drivers (this one, and the commands the tests start) stay on loopback
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = ray._private.ray_constants
    cluster_ips = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    os.environ.update(env)  # the nodes' processes (and so every worker) inherit it
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                                      "include_dashboard": False})
    try:
        ray.init(address=c.address, _node_ip_address="127.0.0.1", log_to_driver=False,
                 runtime_env={"worker_process_setup_hook": "tests.ray_helpers.setup_worker"})
        yield SimpleNamespace(cluster=c, faults=faults, s3=s3)
    finally:
        ray.shutdown()
        c.shutdown()
        constants.ENABLE_RAY_CLUSTER = cluster_ips
        if server is not None:
            server.stop()
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps filesystems by their arguments, not the endpoint
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture
def faults(cluster):
    for f in cluster.faults.iterdir():
        f.unlink()
    return cluster.faults


def _rows(url: str, key: str) -> dict[str, np.ndarray]:
    fs = open_store(url).get_set(key)
    out = {}
    for split in fs.splits:
        x = fs.features(split)
        for h, row in zip(fs.hashes(split).tolist(), x):
            out[str(h)] = row
    return out


def _same(a_url: str, a, b_url: str, b) -> None:
    assert b.set_key == a.set_key
    ra, rb = _rows(a_url, a.set_key), _rows(b_url, b.set_key)
    assert ra.keys() == rb.keys()
    for h in ra:
        assert ra[h].dtype == rb[h].dtype and ra[h].tobytes() == rb[h].tobytes(), h


def _verify(url: str) -> None:
    from click.testing import CliRunner

    from featcache.cli import main

    r = CliRunner().invoke(main, ["verify", "--store", url])
    assert r.exit_code == 0, r.output


def _committed(url: str) -> dict[str, list[str]]:
    store = open_store(url)
    store.forget_index()
    return {s: [k for k, g in store.segment_groups(s) if g.attrs.get("committed") is True] for s in store.spaces()}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_ray_gives_the_local_set_and_rows(cluster, tmp_path, dtype):
    """float16 into a local folder; float32 with an augmented view per training image into the S3 server.
    Afterwards every socket a Ray process of the cluster listens on is on loopback."""
    data = make_folder(tmp_path / "data", splits=(("train", 12), ("val", 5)))  # 51 images: 3 full batches + 3
    with open(data / "train" / "red" / "broken.png", "wb") as f:
        f.write(b"not an image")
    kw = {"batch_size": 16, "dtype": dtype, "views": 1 if dtype == "float32" else 0}
    url = str(tmp_path / "b.zarr")
    if dtype == "float32":
        if cluster.s3 is None:
            pytest.skip("the local S3 server needs moto[server] and s3fs")
        url = f"{cluster.s3}/ray-{tmp_path.name}.zarr"
    local = extract_tiny(data, tmp_path / "a.zarr", **kw)
    remote = extract_tiny(data, url, engine="ray", **kw)
    _same(str(tmp_path / "a.zarr"), local, url, remote)
    assert [s.path for s in remote.skipped] == [s.path for s in local.skipped] == ["train/red/broken.png"]
    if kw["views"]:
        a, b = open_store(str(tmp_path / "a.zarr")), open_store(url)
        va, vb = a.get_set(local.set_key).view_features(), b.get_set(remote.set_key).view_features()
        assert va.shape == vb.shape and va.tobytes() == vb.tobytes()
    record = open_store(url).get_set(remote.set_key).record
    assert record.config["engine"] == "ray" and "engine" not in json.dumps(record.space_provenance)
    _verify(url)
    again = extract_tiny(data, url, engine="ray", **kw)
    assert again.set_key == remote.set_key and again.extracted == 0
    found = _listening(_descendants(os.getpid()) | {os.getpid()})
    assert len({pid for pid, _, _ in found}) >= 3, found  # the GCS, the raylet, the agents, the workers
    assert {ip for _, ip, _ in found} <= LOOPBACK, sorted(found)


def test_several_layers_and_a_module_passed_in_python(cluster, tmp_path, monkeypatch, caplog):
    """Several layers in one pass (each set as the one-process engine makes it), and a module object
    (shipped to the actors as it is, since no name rebuilds it). The extract's files are hashed by Ray
    tasks, a block of paths each."""
    from tests.tiny_backbone import TinyCNN

    data = make_folder(tmp_path / "data", splits=(("train", 7), ("val", 3)))  # 30 images: a batch of 16 and 14
    kw = {"batch_size": 16, "layer": "features,avgpool", "pool": "none"}
    local = extract_tiny(data, tmp_path / "a.zarr", **kw)
    monkeypatch.setattr(ray_hash, "HASH_BLOCK", 8)
    with caplog.at_level(logging.INFO, logger="featcache.extract"):
        remote = extract_tiny(data, tmp_path / "b.zarr", engine="ray", rehash=True, **kw)
    assert "hashing 30 files on Ray (4 tasks of up to 8)" in caplog.text, caplog.text
    assert [r.layer for r in remote] == ["features", "avgpool"]
    for a, b in zip(local, remote):
        _same(str(tmp_path / "a.zarr"), a, str(tmp_path / "b.zarr"), b)
    module = TinyCNN()  # its own random weights: the same object both ways
    local = extract_tiny(data, tmp_path / "c.zarr", backbone=module, weights="DEFAULT", batch_size=16)
    remote = extract_tiny(data, tmp_path / "d.zarr", backbone=module, weights="DEFAULT", batch_size=16, engine="ray")
    _same(str(tmp_path / "c.zarr"), local, str(tmp_path / "d.zarr"), remote)


def test_a_killed_model_actor_is_restarted_and_the_rows_are_the_same(cluster, faults, tmp_path):
    data = make_folder(tmp_path / "data", splits=(("train", 16), ("val", 6)))  # 66 images: 5 batches
    (faults / "kill-forward").touch()
    remote = extract_tiny(data, tmp_path / "b.zarr", backbone=PROBE, engine="ray", batch_size=16)
    assert list(faults.glob("kill-forward.taken-*")), "no actor was killed"
    local = extract_tiny(data, tmp_path / "a.zarr", backbone=PROBE, batch_size=16)
    _same(str(tmp_path / "a.zarr"), local, str(tmp_path / "b.zarr"), remote)
    calls = (faults / "calls.log").read_text().split()
    assert len(calls) > 5  # the lost batch ran again, in another process
    assert len(set(calls)) >= 2
    _verify(str(tmp_path / "b.zarr"))


def test_a_write_task_killed_before_its_marker_loses_nothing(cluster, faults, tmp_path, monkeypatch):
    monkeypatch.setattr(ray_engine, "SEGMENT_IMAGES", 32)  # a segment per two batches of 16
    data = make_folder(tmp_path / "data", splits=(("train", 16), ("val", 6)))
    url = str(tmp_path / "b.zarr")
    (faults / "kill-commit").touch()
    remote = extract_tiny(data, url, backbone=PROBE, engine="ray", batch_size=16)
    assert list(faults.glob("kill-commit.taken-*")), "no write task was killed"
    store = open_store(url)
    space = remote.space
    groups = store.segment_groups(space)
    uncommitted = [k for k, g in groups if g.attrs.get("committed") is not True]
    assert uncommitted, "the killed write left no segment behind"  # its rows are on storage, unmarked
    local = extract_tiny(data, tmp_path / "a.zarr", backbone=PROBE, batch_size=16)
    _same(str(tmp_path / "a.zarr"), local, url, remote)  # the retried write committed the rows
    _verify(url)
    before = _committed(url)
    with store.lease([space]):  # an extract holds the space: gc removes nothing of it
        gc(store, grace_s=0.0)
    assert _committed(url) == before
    gc(open_store(url), grace_s=0.0)  # then the unmarked leftover goes, nothing committed with it
    assert _committed(url) == before
    assert not [k for k, g in open_store(url).segment_groups(space) if g.attrs.get("committed") is not True]
    _same(str(tmp_path / "a.zarr"), local, url, remote)


def test_a_write_ray_gives_up_on_is_run_again_as_planned(cluster, faults, tmp_path, monkeypatch, caplog):
    """A write task SIGKILLed before its marker with no retry left (Ray gives up on it, as on a node gone for
    good): its batches run again, each as planned, and the set is the one-process engine's."""

    monkeypatch.setattr(ray_engine, "SEGMENT_IMAGES", 32)  # a segment per two batches of 16: writes of 2, 2, 1
    monkeypatch.setattr(ray_engine, "WRITE_RETRIES", 0)
    data = make_folder(tmp_path / "data", splits=(("train", 16), ("val", 6)))  # 66 images: 5 batches
    (faults / "kill-commit").touch()
    with caplog.at_level(logging.WARNING, logger="featcache.extract"):
        remote = extract_tiny(data, tmp_path / "b.zarr", backbone=PROBE, engine="ray", batch_size=16)
    assert list(faults.glob("kill-commit.taken-*")), "no write task was killed"
    assert "batches run again" in caplog.text, caplog.text
    local = extract_tiny(data, tmp_path / "a.zarr", backbone=PROBE, batch_size=16)
    _same(str(tmp_path / "a.zarr"), local, str(tmp_path / "b.zarr"), remote)
    _verify(str(tmp_path / "b.zarr"))


def test_a_straggler_gets_few_batches(cluster, faults, tmp_path):
    data = make_folder(tmp_path / "data", splits=(("train", 40), ("val", 8)), size=(8, 8))  # 144 images: 9 batches
    (faults / "slow-forward").touch()
    remote = extract_tiny(data, tmp_path / "b.zarr", backbone=PROBE, engine="ray", batch_size=16,
                          ray_max_actors=2)
    slow = [int(p.name.rsplit("-", 1)[1]) for p in faults.glob("slow-forward.taken-*")]
    assert slow, "no actor became slow"
    calls = Counter(int(p) for p in (faults / "calls.log").read_text().split())
    assert len(calls) == 2, calls  # two actors shared the batches
    assert calls[slow[0]] < sum(calls.values()) / 2, calls  # the others took most of them
    local = extract_tiny(data, tmp_path / "a.zarr", backbone=PROBE, batch_size=16)
    _same(str(tmp_path / "a.zarr"), local, str(tmp_path / "b.zarr"), remote)


def _cli(data: Path, url: str, address: str, checkpoint_s: float) -> list[str]:
    """The extract command on the test cluster, with the engine's default segment size (SEGMENT_IMAGES)."""
    return [sys.executable, "-m", "featcache.cli", "extract", "--backbone", SLOW_PROBE, "--weights", "none", "--data",
            str(data), "--store", url, "--batch-size", "8", "--engine", "ray", "--ray-address", address,
            "--checkpoint-every", str(checkpoint_s), "--no-progress", "--json"]


def _rows_in(url: str) -> int:
    store = open_store(url)
    store.forget_index()
    return sum(len(store.known_hashes(s)) for s in _committed(url))


def _calls(faults: Path) -> int:
    log = faults / "calls.log"
    return len(log.read_text().split()) if log.exists() else 0


def _wait(p: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None and not ready():
        time.sleep(0.1)
    assert p.poll() is None, f"the run ended before {what}: {p.communicate()[1].decode()[-2000:]}"


def test_a_stopped_driver_keeps_what_it_finished_and_the_same_command_resumes(cluster, faults, tmp_path):
    """As the one-process engine: SIGTERM (a scheduler's time limit) commits the batches that came out of the
    model and ends with the Interrupted line; --checkpoint-every bounds what a SIGKILLed driver loses, however
    far the segment is from its size limit; the same command then computes only the rest."""
    data = make_folder(tmp_path / "data", splits=(("train", 40), ("val", 8)), size=(8, 8))  # 144 images: 18 batches
    assert ray_engine.SEGMENT_IMAGES > 144
    url = str(tmp_path / "b.zarr")
    env = {**os.environ, "PYTHONPATH": os.environ["PYTHONPATH"]}
    # 1. no checkpoint falls due: SIGTERM after four batches went through the model
    p = subprocess.Popen(_cli(data, url, cluster.cluster.address, 3600), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait(p, lambda: _calls(faults) >= 4, "four batches")
        time.sleep(0.5)  # their rows reach the driver
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, err.decode()[-2000:]
    assert "Interrupted: finished batches are committed" in err.decode()
    stopped = _rows_in(url)
    assert stopped >= 3 * 8, (stopped, _calls(faults))  # at least the batches finished before the wait
    # 2. checkpoints every 0.2 s: killed (SIGKILL) once a checkpoint committed more rows
    p = subprocess.Popen(_cli(data, url, cluster.cluster.address, 0.2), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait(p, lambda: _rows_in(url) > stopped, "a checkpoint")
        os.killpg(p.pid, signal.SIGKILL)  # the driver, mid-run
    finally:
        p.wait()
    rows_done = _rows_in(url)
    assert stopped < rows_done < 144
    before = _committed(url)
    gc(open_store(url), grace_s=0.0)  # the dead driver's lease has not expired: gc deletes nothing committed
    assert _committed(url) == before
    # 3. the same command computes the rest
    r = subprocess.run(_cli(data, url, cluster.cluster.address, 0.2), env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["extracted"] == 144 - rows_done and out["reused"] == rows_done
    local = extract_tiny(data, tmp_path / "a.zarr", backbone=SLOW_PROBE, batch_size=8)
    assert out["set"] == local.set_key
    _same(str(tmp_path / "a.zarr"), local, url, SimpleNamespace(set_key=out["set"]))
    _verify(url)


def test_a_node_removed_and_one_added_mid_run(cluster, faults, tmp_path, monkeypatch):
    monkeypatch.setattr(ray_engine, "SEGMENT_IMAGES", 16)  # a segment per batch: the run is seen midway
    c = cluster.cluster
    node = c.add_node(num_cpus=1, node_ip_address="127.0.0.1", include_dashboard=False)
    data = make_folder(tmp_path / "data", splits=(("train", 32), ("val", 8)), size=(8, 8))  # 120 images: 8 batches
    url = str(tmp_path / "b.zarr")
    result: dict = {}

    def run():
        try:
            result["r"] = extract_tiny(data, url, backbone="tests.tiny_backbone:slow_tiny_cnn", engine="ray",
                                       batch_size=16, ray_max_actors=3)
        except BaseException as e:  # reported below
            result["e"] = e

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 300
    while t.is_alive() and time.monotonic() < deadline and not list(Path(url).glob("spaces/*/segments/*")):
        time.sleep(0.2)
    assert t.is_alive(), "the run ended before the node could be removed"
    raylet = node.all_processes["raylet"][0].process.pid
    working = [p for p in _descendants(raylet) if Path(f"/proc/{p}/cmdline").exists()
               and Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"ray::")]
    c.remove_node(node, allow_graceful=False)  # the node and every worker on it, mid-run
    assert working, "no Ray worker ran on the node that was removed"
    added = c.add_node(num_cpus=1, node_ip_address="127.0.0.1", include_dashboard=False)
    t.join(600)
    try:
        assert not t.is_alive()
        assert "e" not in result, result.get("e")
        local = extract_tiny(data, tmp_path / "a.zarr", backbone="tests.tiny_backbone:slow_tiny_cnn", batch_size=16)
        _same(str(tmp_path / "a.zarr"), local, url, result["r"])
        _verify(url)
    finally:
        c.remove_node(added)


def test_a_private_instance_listens_on_loopback_only(cluster, tmp_path):
    """--ray-address local (the default where no cluster is named or was started here): every socket any process
    of the instance the command starts listens on, sampled through the run, is on loopback. Ray's own
    single-machine switch is left out of the command's environment (the cluster fixture sets it)."""
    data = make_folder(tmp_path / "data", splits=(("train", 2), ("val", 1)), size=(8, 8))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    cmd = [sys.executable, "-m", "featcache.cli", "extract", "--backbone", TINY, "--weights", "none", "--data",
           str(data), "--store", str(tmp_path / "s.zarr"), "--batch-size", "4", "--engine", "ray", "--ray-address",
           "local", "--no-progress", "--json"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    found: set[tuple[int, str, int]] = set()
    try:
        while p.poll() is None:
            found |= _listening(_descendants(p.pid) | {p.pid})
            time.sleep(0.1)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
    assert p.returncode == 0, err.decode()[-2000:]
    assert len({pid for pid, _, _ in found}) >= 3, found  # the GCS, the raylet, the agents, the workers
    assert {ip for _, ip, _ in found} <= LOOPBACK, sorted(found)


def test_without_an_address_the_cluster_started_on_this_machine_is_joined(cluster, tmp_path):
    """No --ray-address and no RAY_ADDRESS: the command joins the cluster started here (the fixture's, whose
    address Ray records as `ray start` does) instead of starting an instance of its own."""
    data = make_folder(tmp_path / "data", splits=(("train", 2), ("val", 1)), size=(8, 8))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "featcache.cli", "extract", "--backbone", TINY, "--weights", "none", "--data",
           str(data), "--store", str(tmp_path / "s.zarr"), "--batch-size", "4", "--engine", "ray", "--no-progress",
           "--json"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    started: set[str] = set()
    try:
        while p.poll() is None:
            for pid in _descendants(p.pid):
                with contextlib.suppress(OSError):
                    started.add(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace"))
            time.sleep(0.1)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
    assert p.returncode == 0, err.decode()[-2000:]
    assert json.loads(out)["extracted"] == 9
    assert not [c for c in started if c.endswith(("gcs_server", "raylet"))], started


def test_hashing_is_spread_over_ray_tasks_in_blocks_and_the_scan_cache_needs_none(cluster, tmp_path):
    """The driver lists the folder and plans; the files go to Ray tasks a block of paths each, never one task
    per file; the manifest is the one a local scan makes (a FIFO and an empty file skipped the same way);
    the signatures the tasks saw let the scan cache serve every file on the next scan, without a task; a
    rewritten file is hashed again."""
    from featcache.data import scan
    from featcache.data.scancache import RACY_NS

    data = make_folder(tmp_path / "data", splits=(("train", 6), ("val", 3)))  # 27 images
    os.mkfifo(data / "train" / "red" / "pipe.png")
    (data / "val" / "red" / "empty.png").write_bytes(b"")
    hasher = ray_hash.RayHasher(block=4)
    remote = scan(data, hasher=hasher)
    assert hasher.tasks == -(-29 // 4)  # 29 files, 4 paths a task
    assert hasher.processes and os.getpid() not in hasher.processes
    local = scan(data, rehash=True)
    assert remote.items == local.items and len(local.items) == 27
    assert sorted((k.path, k.reason) for k in remote.skipped) == sorted((k.path, k.reason) for k in local.skipped)
    assert {k.path for k in remote.skipped} == {"train/red/pipe.png", "val/red/empty.png"}
    time.sleep(RACY_NS / 1e9)  # the files are now older than the racy-entry window: what a scan learns is trusted
    scan(data, hasher=hasher)
    again = scan(data, hasher=hasher)
    assert again.items == local.items
    assert hasher.tasks == 0  # served by the cache; the FIFO it cannot hold is fewer than a block: hashed here
    changed = data / "train" / "red" / "red_0.png"
    changed.write_bytes(changed.read_bytes() + b"\0")
    hasher = ray_hash.RayHasher(block=1)
    after = scan(data, hasher=hasher)
    assert hasher.tasks == 2  # the rewritten file and the FIFO
    rel = f"train/red/{changed.name}"
    assert {it.path: it.sha256 for it in after.items}[rel] != {it.path: it.sha256 for it in local.items}[rel]
    assert after.items == scan(data, rehash=True).items


def test_without_ray_one_clear_error(folder, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *args, **kw):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    from featcache.errors import FeatcacheError

    with pytest.raises(FeatcacheError, match=r"pip install 'featcache\[ray\]'"):
        extract_tiny(folder, tmp_path / "s.zarr", engine="ray")
    assert not (tmp_path / "s.zarr").exists() or not _committed(str(tmp_path / "s.zarr"))
