"""The store's small arrays (a segment's keys, a set's paths and labels) read in place, and metadata read
within its cap: what is held is what the file holds, and damage is refused as before."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest
import zarr

import featcache
from featcache.files import NotRegularFile, read_capped
from featcache.store.chunks import ChunkReader
from featcache.store.groups import MAX_META_BYTES, digest_values, read_checked, write_array
from featcache.store.sortedkeys import heads_of, sorted_search, write_sorted

from .helpers import TINY


def _group(tmp_path):
    return zarr.open_group(str(tmp_path / "g.zarr"), mode="w")


@pytest.mark.parametrize("shape,dtype,chunk_bytes", [((1000, 32), "uint8", 4 << 20), ((1000, 32), "uint8", 3200),
                                                     ((777,), "int64", 1000), ((0, 32), "uint8", 4 << 20),
                                                     ((5000,), "int32", 4 << 20), ((1,), "uint8", 1)])
def test_small_arrays_are_read_in_place_as_zarr_reads_them(tmp_path, shape, dtype, chunk_bytes):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 100, shape).astype(dtype)
    g = _group(tmp_path)
    arr = write_array(g, "a", values, chunk_bytes=chunk_bytes)
    assert ChunkReader(arr).fast  # the layout featcache writes is read directly, not through Zarr
    got = read_checked(g, "a", digest_values(values), dtype, shape[1:])
    assert got.dtype == values.dtype and np.array_equal(got, values) and np.array_equal(got, arr[...])


def test_a_big_endian_array_is_read_through_zarr_not_the_direct_reader(tmp_path):
    """Another writer may store an int64 array's bytes big-endian (the ``bytes`` codec's ``endian``): the direct
    reader, which decodes little-endian buffers, leaves such an array to Zarr."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

    values = np.arange(-500, 500, dtype=np.int64)
    g = _group(tmp_path)
    arr = g.create_array("big", shape=values.shape, dtype=values.dtype, chunks=(300,), fill_value=0,
                         serializer=BytesCodec(endian="big"), compressors=[BloscCodec(cname="zstd"), Crc32cCodec()])
    arr[...] = values
    assert not ChunkReader(arr).fast
    assert np.array_equal(read_checked(g, "big", digest_values(values), "int64"), values)


def test_a_lost_or_altered_chunk_of_a_small_array_is_refused(tmp_path):
    values = np.random.default_rng(1).integers(0, 256, (300, 32), dtype=np.uint8)
    g = _group(tmp_path)
    write_array(g, "keys", values, chunk_bytes=3200)  # 100 rows per chunk: three chunk files
    digest = digest_values(values)
    chunk = tmp_path / "g.zarr" / "keys" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[20] ^= 0x01
    chunk.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"'keys'.*CRC32C"):
        read_checked(g, "keys", digest, "uint8", (32,))
    chunk.unlink()  # read as the fill value, as Zarr reads it: the digest tells
    with pytest.raises(ValueError, match="'keys' differs from its integrity record"):
        read_checked(g, "keys", digest, "uint8", (32,))
    zeros = np.zeros((300, 32), dtype=np.uint8)
    write_array(g, "zeros", zeros, chunk_bytes=3200)
    (tmp_path / "g.zarr" / "zeros" / "c" / "2" / "0").unlink()  # a writer may leave out a chunk of fill values
    assert np.array_equal(read_checked(g, "zeros", digest_values(zeros), "uint8", (32,)), zeros)
    chunk.write_bytes(b"\x00\x01")  # shorter than its checksum
    with pytest.raises(ValueError, match="'keys'"):
        read_checked(g, "keys", digest, "uint8", (32,))


def test_a_small_array_read_holds_the_compressed_chunk_and_the_array_only(tmp_path):
    """100k keys (3.2 MB, incompressible): the read holds the chunk's compressed bytes and the array, where Zarr's
    read held its buffers and copies besides."""
    values = np.random.default_rng(2).integers(0, 256, (100_000, 32), dtype=np.uint8)
    g = _group(tmp_path)
    write_array(g, "keys", values)
    digest = digest_values(values)
    tracemalloc.start()
    try:
        got = read_checked(g, "keys", digest, "uint8", (32,))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(got, values)
    assert peak < 2.2 * values.nbytes, peak


def test_a_segments_keys_are_one_shard_read_an_inner_chunk_at_a_time(tmp_path, folder):
    """A segment's keys are one shard file of 128 KiB inner chunks: reading them holds the array and one inner
    chunk's compressed bytes, about 1x, where one plain chunk of the whole held about 2x."""
    from featcache.store.segments import KEY_CHUNK_BYTES

    values = np.random.default_rng(5).integers(0, 256, (100_000, 32), dtype=np.uint8)
    g = _group(tmp_path)
    arr = write_array(g, "sha256", values, inner_bytes=KEY_CHUNK_BYTES)
    assert arr.shards == (102_400, 32) and arr.chunks == (4096, 32)
    assert sorted(p.name for p in (tmp_path / "g.zarr" / "sha256" / "c").rglob("*") if p.is_file()) == ["0"]
    tracemalloc.start()
    try:
        got = read_checked(g, "sha256", digest_values(values), "uint8", (32,))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(got, values)
    assert peak < 1.2 * values.nbytes, peak
    # extract writes its segments so
    r = featcache.extract(data=str(folder), store=str(tmp_path / "s.zarr"), backbone=TINY, weights="none", workers=0)
    seg = featcache.open_store(str(tmp_path / "s.zarr")).locate(r.space, [])[0][0]
    keys = seg.group["sha256"]
    assert keys.shards is not None and keys.chunks == (4096, 32) and ChunkReader(keys).fast


def test_the_whole_sorted_table_is_held_as_twelve_bytes_per_row(tmp_path):
    rows = 50_000
    keys = np.random.default_rng(3).integers(0, 256, (rows, 32), dtype=np.uint8).view("S32").reshape(rows)
    g = _group(tmp_path)
    g.attrs["sorted"] = write_sorted(g, keys)
    search = sorted_search(g, rows)
    assert search is not None
    asked = np.random.default_rng(4).choice(rows, 500, replace=False)  # in most chunks: the table is read whole
    tracemalloc.start()
    try:
        which, found = search.candidates(heads_of(keys[asked]), limit=4 * rows)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(np.sort(which), np.arange(len(asked)))
    assert np.array_equal(keys[found], keys[asked][which])  # every head found at a row holding it
    assert search.reads == -(-rows // 1024)
    # heads and rows (12 bytes a row), one 16 KiB chunk buffer and its compressed bytes, the small query's arrays
    assert peak < 12 * rows + (64 << 10), peak


def test_metadata_is_read_whole_within_its_cap_allocating_what_the_file_holds(tmp_path):
    small, big = tmp_path / "small.json", tmp_path / "big.json"
    small.write_bytes(b'{"a": 1}')
    big.write_bytes(b"x" * 5000)
    tracemalloc.start()
    try:
        assert read_capped(small, MAX_META_BYTES) == b'{"a": 1}'
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 16, peak  # not the 8 MiB cap up front
    assert read_capped(big, 1000) == b"x" * 1001  # over the cap: the cap and one byte, for the caller to refuse
    assert read_capped(big, 5000) == b"x" * 5000


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_refused_at_once_not_waited_on(tmp_path):
    pipe = tmp_path / "zarr.json"
    os.mkfifo(pipe)
    done: list = []
    def read() -> None:
        try:
            read_capped(pipe, 100)
        except NotRegularFile as e:
            done.append(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(30)
    if not done:  # unblock the thread before failing
        with open(pipe, "wb"):
            pass
    assert done and "FIFO" in str(done[0]), "reading a FIFO blocked"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_ls_with_a_fifo_for_a_sets_metadata_names_it_and_lists_the_others(tmp_path, folder):
    store = tmp_path / "s.zarr"
    a = featcache.extract(data=str(folder), store=str(store), backbone=TINY, weights="none", workers=0)
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    b = featcache.extract(data=str(other), store=str(store), backbone=TINY, weights="none", workers=0)
    assert a.set_key != b.set_key
    sets = store / "sets"
    victim = next(p for p in sets.iterdir() if p.name.startswith(b.set_key))
    meta = victim / "zarr.json"
    meta.unlink()
    os.mkfifo(meta)
    run = subprocess.run([sys.executable, "-m", "featcache.cli", "ls", "--store", str(store)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert a.set_key in run.stdout
    assert victim.name in run.stdout + run.stderr and "NotRegularFile" in run.stdout + run.stderr


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_chunk_replaced_by_a_fifo_or_a_huge_file_is_refused_unread(tmp_path):
    """A hostile store: a FIFO where a chunk file was is refused at once (not waited on), and a sparse file of
    a gigabyte is refused by its size, before anything is read (a chunk cannot be larger than it decodes to)."""
    values = np.random.default_rng(6).integers(0, 256, (1000, 32), dtype=np.uint8)
    g = _group(tmp_path)
    write_array(g, "keys", values)
    chunk = tmp_path / "g.zarr" / "keys" / "c" / "0" / "0"
    digest = digest_values(values)
    chunk.unlink()
    with open(chunk, "wb") as f:
        f.truncate(1 << 30)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="more than a chunk"):
            read_checked(g, "keys", digest, "uint8", (32,))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    chunk.unlink()
    os.mkfifo(chunk)
    done: list = []

    def read() -> None:
        try:
            read_checked(g, "keys", digest, "uint8", (32,))
        except ValueError as e:
            done.append(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(30)
    if not done:
        with open(chunk, "wb"):  # unblock the reader before failing
            pass
    assert done and "not a regular file" in str(done[0])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("where", ["split", "segment keys"])
def test_a_fifo_inside_the_store_is_damage_not_a_wait(tmp_path, folder, where):
    """Every read of a local store opens regular files only (store/localfiles.py): a FIFO where a split's or a
    segment array's metadata should be makes fit a clear error, where Zarr's own store waited forever."""
    store = tmp_path / "s.zarr"
    r = featcache.extract(data=str(folder), store=str(store), backbone=TINY, weights="none", workers=0)
    if where == "split":
        meta = next(p for p in (store / "sets").iterdir() if p.is_dir()) / "train" / "zarr.json"
    else:
        meta = next((store / "spaces").glob("*/segments/*/sha256")) / "zarr.json"
    meta.unlink()
    os.mkfifo(meta)
    run = subprocess.run([sys.executable, "-m", "featcache.cli", "fit", "--head", "logreg", "--set", r.set_key,
                          "--store", str(store), "--out", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode != 0
    assert "NotRegularFile" in run.stderr + run.stdout
