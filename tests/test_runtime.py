"""Speed settings that must not change an answer: kept memory, model processes, the direct chunk reader."""

import os
import subprocess
import sys

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

import featcache
from featcache import procs
from featcache.errors import FeatcacheError
from featcache.store.chunks import ChunkReader

from .helpers import TINY, make_folder

_FAULTS = r"""
import numpy as np, sys
from featcache.runtime import keep_memory, minor_faults
kept = keep_memory()
a = b"\x01" * (64 << 20); del a  # 64 MiB, faulted in once
before = minor_faults()
for _ in range(3):
    a = b"\x01" * (64 << 20); del a
print(kept, minor_faults() - before)
"""


def _faults(env_value: str) -> tuple[str, int]:
    env = {**os.environ, "FEATCACHE_KEEP_MEMORY": env_value}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True).stdout
    kept, faults = out.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_stops_refaulting_large_buffers():
    kept, faults = _faults("1")
    off, faults_off = _faults("0")
    assert (kept, off) == ("True", "False")
    assert faults_off > 3 * (64 << 20) // 4096 // 2  # every reallocation is faulted in again by default
    assert faults < faults_off / 20  # ... and not with the memory kept


def _rows(store: str, key: str) -> dict[str, np.ndarray]:
    fs = featcache.open_store(store).get_set(key)
    return {s: fs.features(s) for s in fs.splits}


def test_model_processes_store_the_rows_of_one_process_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setattr(procs, "usable_cores", lambda: 2)  # two model processes whatever the machine
    data = make_folder(tmp_path / "data", splits=(("train", 14), ("val", 6)))  # 60 images: 3 batches of 16 and one of 12
    common = dict(backbone=TINY, weights="none", data=str(data), batch_size=16, dtype="float32")
    many = featcache.extract(store=str(tmp_path / "a.zarr"), **common)
    one = featcache.extract(store=str(tmp_path / "b.zarr"), workers=0, **common)
    assert many.timings["processes"] == 2 and "processes" not in one.timings
    assert many.timings["forward"] > 0 and many.timings["decode"] > 0
    a, b = _rows(str(tmp_path / "a.zarr"), many.set_key), _rows(str(tmp_path / "b.zarr"), one.set_key)
    assert a.keys() == b.keys() and all(np.array_equal(a[s], b[s]) for s in a)
    # and in the same order in their segments
    sa, sb = (featcache.open_store(str(tmp_path / n)).locate(r.space, [])[0] for n, r in (("a.zarr", many), ("b.zarr", one)))
    assert [s.sha256.tolist() for s in sa] == [s.sha256.tolist() for s in sb]


@pytest.mark.slow
def test_short_batches_of_a_real_network_are_bit_for_bit_those_of_one_process(tmp_path, monkeypatch):
    """efficientnet_lite0 has 1x1 convolutions, which one thread computes with other kernels than two
    when a batch has fewer than 16 images: the short batches (the last, and one with a file that
    does not decode) and the left-over full batch must still give a one-process run's rows."""
    pytest.importorskip("efficientnet_lite_pytorch")
    monkeypatch.setattr(procs, "usable_cores", lambda: 2)
    # 51 images in batches of 16: 3 full (the third left over for the parent) and a short one
    data = make_folder(tmp_path / "data", splits=(("train", 12), ("val", 5)), size=(64, 64))
    (data / "train" / "red" / "red_3.png").write_bytes(b"not a png")  # its batch is one image short
    common = dict(backbone="efficientnet_lite0", data=str(data), batch_size=16, dtype="float32")
    many = featcache.extract(store=str(tmp_path / "a.zarr"), **common)
    one = featcache.extract(store=str(tmp_path / "b.zarr"), workers=0, **common)
    assert many.timings["processes"] == 2 and len(many.skipped) == 1
    a, b = _rows(str(tmp_path / "a.zarr"), many.set_key), _rows(str(tmp_path / "b.zarr"), one.set_key)
    assert a.keys() == b.keys() and all(np.array_equal(a[s], b[s]) for s in a)


def test_model_processes_need_batches_of_16():
    import torch

    assert procs.model_processes(torch.device("cpu"), 1000, 8, workers=None) == 0


def test_a_failing_model_process_is_an_error_not_missing_rows(tmp_path, monkeypatch):
    import contextlib

    from featcache import pipeline

    monkeypatch.setattr(procs, "usable_cores", lambda: 2)
    data = make_folder(tmp_path / "data", splits=(("train", 14), ("val", 6)))
    parent = os.getpid()

    @contextlib.contextmanager
    def breaks_in_children(*args):
        if os.getpid() != parent:
            raise RuntimeError("boom in the model")
        yield

    monkeypatch.setattr(pipeline, "autocast", breaks_in_children)  # entered around each forward
    with pytest.raises(FeatcacheError, match="model process 0 failed: RuntimeError: boom in the model"):
        featcache.extract(backbone=TINY, weights="none", data=str(data), store=str(tmp_path / "s.zarr"), batch_size=16)
    assert featcache.open_store(str(tmp_path / "s.zarr")).sets() == []


def test_model_processes_only_where_they_help():
    import torch

    cpu, n = torch.device("cpu"), 1000
    assert procs.model_processes(cpu, n, 64, workers=2) == 0  # workers chosen: the DataLoader way
    assert procs.model_processes(cpu, 64, 64, workers=None) == 0  # one batch
    assert procs.model_processes(torch.device("cuda"), n, 64, workers=None) == 0
    expected = min(procs.usable_cores(), 8)
    assert procs.model_processes(cpu, n, 64, workers=None) == (expected if expected >= 2 else 0)


def test_chunk_reader_reads_what_zarr_reads_and_falls_back_for_other_codecs(tmp_path, folder, store_url):
    r = featcache.extract(backbone=TINY, weights="none", data=str(folder), store=store_url, batch_size=8)
    seg = featcache.open_store(store_url).locate(r.space, [])[0][0]
    assert seg.chunks.fast
    whole = seg.features[:]
    got = np.concatenate([seg.read_chunk(i, r.space).copy() for i in range(-(-len(whole) // seg.chunk_rows))])
    assert np.array_equal(got, whole)
    other = zarr.create_array(str(tmp_path / "other.zarr"), shape=whole.shape, chunks=(5,) + whole.shape[1:],
                              dtype=whole.dtype, compressors=[ZstdCodec(level=1)])
    other[:] = whole
    reader = ChunkReader(other)
    assert not reader.fast
    assert np.array_equal(np.concatenate([reader.read(i).copy() for i in range(-(-len(whole) // 5))]), whole)


def test_a_flipped_byte_in_a_shard_is_refused_by_the_direct_reader(folder, store_url):
    from featcache.errors import StoreError
    from featcache.stream import RowReader

    r = featcache.extract(backbone=TINY, weights="none", data=str(folder), store=store_url, batch_size=8)
    st = featcache.open_store(store_url)
    fs = st.get_set(r.set_key)
    seg = st.locate(r.space, [])[0][0]
    shard = next(p for p in (seg.chunks._shard_path(0),) if p.exists())
    raw = bytearray(shard.read_bytes())
    raw[40] ^= 0xFF  # inside the first chunk's compressed bytes
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"cannot read segment .* chunk 0"):
        RowReader(st, fs.space, fs.hashes("train"), fs.shape).load()


class _Bar:
    """Records what a progress bar was told."""

    def __init__(self, total: int):
        self.n, self.total, self.seen, self.closed = 0, total, [], False

    def update(self, k: int) -> None:
        assert k > 0 and not self.closed
        self.n += k
        self.seen.append(self.n)

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("workers", [None, 0], ids=["model-processes", "one-process"])
def test_the_bar_moves_within_a_batch_and_ends_at_the_total(tmp_path, monkeypatch, workers):
    from featcache import pipeline

    monkeypatch.setattr(procs, "usable_cores", lambda: 2)
    bars: list[_Bar] = []
    monkeypatch.setattr(pipeline, "progress_bar", lambda total, enabled, desc="extract": bars.append(_Bar(total)) or bars[-1])
    data = make_folder(tmp_path / "data", splits=(("train", 8), ("val", 4)))  # 36 images: batches of 16, 16, 4
    r = featcache.extract(backbone="tests.tiny_backbone:stepped_tiny_cnn", weights="none", data=str(data),
                          store=str(tmp_path / "s.zarr"), batch_size=16, workers=workers, progress=True)
    assert ("processes" in r.timings) == (workers is None)
    (bar,) = bars
    assert bar.closed and bar.total == 36 and bar.seen[-1] == 36 and bar.seen == sorted(set(bar.seen))
    assert any(n % 16 for n in bar.seen[:-1]), bar.seen  # seen between batch ends: per image, not per batch
