"""Faults: a full disk, and SIGKILL at random moments."""

import random
import signal
import subprocess
import time

import numpy as np
import pytest
from click.testing import CliRunner

import featcache
from featcache.audit import verify
from featcache.cli import main

from .helpers import SLOW, TINY, all_rows, cli_process, make_folder


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or r.returncode})")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_is_a_clear_error_and_resumes_after_freeing_space(small_disk, tmp_path):
    store = str(small_disk / "s.zarr")
    small = make_folder(tmp_path / "small", splits=(("train", 2), ("val", 1)))
    first = featcache.extract(backbone=TINY, data=str(small), store=store, weights="none", workers=0)
    big = make_folder(tmp_path / "big", splits=(("train", 200), ("val", 40)), seed=3)
    args = ["extract", "--backbone", TINY, "--weights", "none", "--layer", "features", "--dtype", "float32",
            "--data", str(big), "--store", store, "--workers", "0", "--batch-size", "8", "--checkpoint-every", "0.01"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "no space left on the device" in r.output and "Traceback" not in r.output, r.output
    st = featcache.open_store(store)
    assert st.set_keys() == [first.set_key]
    assert st.get_set(first.set_key).to_numpy("train")[0].shape == (6, 32) and verify(st, first.set_key).ok
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "reused 0," not in r.output  # rows committed before the disk filled were kept
    assert featcache.open_store(store).get_set().to_numpy("train")[0].shape == (600, 16, 16, 16)


@pytest.mark.slow
def test_sigkill_at_random_moments(tmp_path):
    folder = make_folder(tmp_path / "d", splits=(("train", 20), ("val", 6)))
    base = ["extract", "--backbone", SLOW, "--weights", "none", "--data", folder, "--workers", "0",
            "--batch-size", "4", "--checkpoint-every", "0.2"]
    clean = tmp_path / "clean.zarr"
    t = time.monotonic()
    assert cli_process(*base, "--store", clean).wait(timeout=300) == 0
    whole = time.monotonic() - t  # start-up included: the kills are spread over a run of this machine's pace
    want = all_rows(clean)
    rng = random.Random(0)
    for trial in range(4):
        store = tmp_path / f"t{trial}.zarr"
        kills = 0
        while True:
            p = cli_process(*base, "--store", store)
            try:
                p.wait(timeout=rng.uniform(0.4, 1.6) * whole)  # some kills land before any commit, some finish
                break
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
                kills += 1
                if store.exists() and featcache.open_store(str(store), mode="r").set_keys():
                    visible = all_rows(store)  # a visible set is a whole one: every row readable and right
                    assert visible.keys() == want.keys() and all(np.array_equal(visible[h], want[h]) for h in want)
            assert kills < 30
        assert p.returncode == 0, p.communicate()
        got = all_rows(store)
        assert got.keys() == want.keys() and all(np.array_equal(got[h], want[h]) for h in want), trial
