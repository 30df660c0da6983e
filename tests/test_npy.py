"""``featcache.npy`` reads NumPy's own files as NumPy does: every dtype a run stores (and the
others NumPy writes), both byte orders, C and Fortran order, every format version; and refuses
what NumPy would not load without pickle, never decoding it."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from featcache.errors import RunError
from featcache.npy import NpyError, RawArray, parse_npy
from featcache.persist import read_arrays, read_table

NUMERIC = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
           "float64", ">f4", ">f8", ">i8", ">u2", ">f2", "<f2"]
SHAPES = [(), (0,), (5,), (3, 4), (0, 3), (2, 3, 4)]


def _npy(a: np.ndarray, version=None) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, a, version=version, allow_pickle=True)
    return buffer.getvalue()


def _sample(dtype: str, shape: tuple, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.integers(0, 2, shape).astype(dt)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, shape, dtype=dt.newbyteorder("="), endpoint=True).astype(dt)
    return (rng.standard_normal(shape) * 100).astype(dt)


@pytest.mark.parametrize("fortran", [False, True], ids=["C", "F"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", NUMERIC)
def test_numbers_read_as_numpy_reads_them(dtype, shape, fortran):
    a = _sample(dtype, shape)
    a = np.asfortranarray(a) if fortran else a
    raw = parse_npy(_npy(a))
    assert raw.shape == a.shape and raw.kind == a.dtype.kind and raw.itemsize == a.dtype.itemsize
    assert raw.dtype == str(a.dtype)
    assert list(raw.values()) == a.ravel(order="F" if raw.fortran_order else "C").tolist()
    if a.ndim == 2:
        assert raw.rows() == a.tolist()
    back = raw.numpy()
    assert back.dtype == a.dtype and back.shape == a.shape and np.array_equal(back, a) and back.flags.writeable


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_every_format_version(version):
    a = _sample("float32", (3, 4))
    assert np.array_equal(parse_npy(_npy(a, version)).numpy(), a)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", ">f4", ">f8"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, None], ids=["nan", "inf", "-inf", "finite"])
def test_non_finite_values_are_found_as_numpy_finds_them(dtype, bad):
    a = _sample(dtype, (7, 5))
    if bad is not None:
        a[4, 2] = bad
    assert parse_npy(_npy(a)).all_finite() == bool(np.isfinite(a).all())


def test_a_sum_that_overflows_is_not_taken_for_a_non_finite_value():
    a = np.full(4, np.finfo(np.float64).max)
    with np.errstate(over="ignore"):
        assert np.isfinite(a).all() and not np.isfinite(a.sum())
    assert parse_npy(_npy(a)).all_finite()


@pytest.mark.parametrize("a", [np.array([1, "x"], dtype=object), np.array(["ab", "c"]), np.array([b"ab"]),
                               np.zeros(2, dtype=[("x", "<f4"), ("y", "<i8")]), np.zeros(3, dtype="complex64"),
                               np.array(["2026-01-01"], dtype="datetime64[D]")],
                         ids=["object", "text", "bytes", "record", "complex", "datetime"])
def test_anything_but_plain_numbers_is_named_and_never_decoded(a):
    raw = parse_npy(_npy(a))
    assert raw.kind == "" and raw.data == b""
    assert raw.dtype in (str(a.dtype), a.dtype.str, a.dtype.descr)
    with pytest.raises(NpyError):
        raw.values()


@pytest.mark.parametrize("damage, words", [
    (lambda b: b[:5], "magic"),
    (lambda b: b"\x93NUMPX" + b[6:], "magic"),
    (lambda b: b[:6] + b"\x04\x00" + b[8:], "version 4.0"),
    (lambda b: b[:-1], "bytes of data"),
    (lambda b: b + b"\0", "bytes of data"),
    (lambda b: b[:8] + b"\xff\xff" + b[10:], "too long"),
    (lambda b: b[:20], "cut short"),
    (lambda b: b.replace(b"'shape'", b"'shapf'"), "descr, fortran_order and shape"),
    (lambda b: b.replace(b"(3, 4)", b"(3,-4)"), "not a tuple of sizes"),
    (lambda b: b.replace(b"'descr'", b"print()"), "not a Python literal"),
    (lambda b: b.replace(b"False", b"0    "), "fortran_order"),
], ids=["short", "magic", "version", "truncated", "trailing", "header too long", "header cut", "keys", "shape",
        "code", "fortran"])
def test_a_damaged_file_is_refused_as_numpy_refuses_it(damage, words):
    good = _npy(np.ones((3, 4), np.float32), (1, 0))
    bad = damage(good)
    with pytest.raises(NpyError, match=words):
        parse_npy(bad)
    if words not in ("bytes of data",):  # numpy ignores trailing bytes and reads a short file's data lazily
        with pytest.raises((ValueError, EOFError, OSError)):
            np.load(io.BytesIO(bad), allow_pickle=False)


def test_of_shares_a_numpy_arrays_bytes():
    a = _sample("float32", (4, 3))
    raw = RawArray.of(a)
    assert raw.descr == "<f4" and raw.shape == (4, 3) and list(raw.values()) == a.ravel().tolist()
    a[0, 0] = np.nan
    assert not raw.all_finite()  # a view, not a copy
    assert RawArray.of(np.array([None], object)).kind == "" and RawArray.of([1.0]).kind == ""


def test_npz_as_numpy_writes_it(tmp_path):
    arrays = {"w": _sample("float32", (4, 3)), "b": _sample(">f8", (3,)), "classes": np.arange(3)}
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, **arrays)
        read = read_arrays(path, "here")
        assert sorted(read) == sorted(arrays)
        for name, a in arrays.items():
            assert read.raw(name).shape == a.shape and np.array_equal(read[name], a) and read[name].dtype == a.dtype


def test_npz_members_that_are_not_arrays_are_refused(tmp_path):
    path = tmp_path / "head.npz"
    np.savez(path, w=np.ones(2))
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("run.py", b"import os")
    with pytest.raises(RunError, match=r"member 'run\.py': it is not an array"):
        read_arrays(path, "here")


def test_a_zip_member_with_a_bad_checksum_is_refused(tmp_path):
    path = tmp_path / "head.npz"
    np.savez(path, w=np.ones(64, np.float32))
    raw = bytearray(path.read_bytes())
    at = raw.index(b"\x00\x00\x80\x3f")  # the first 1.0f of the data
    raw[at + 3] = 0x40  # 2.0: the zip's CRC no longer matches
    path.write_bytes(bytes(raw))
    with pytest.raises(RunError, match=r"not a valid \.npz file"):
        read_arrays(path, "here")


def test_tables_read_as_numpy_reads_them(tmp_path):
    path = tmp_path / "t.npy"
    for table in (np.arange(9).reshape(3, 3), np.asfortranarray(np.arange(16, dtype=np.uint16).reshape(4, 4)),
                  np.zeros((0, 0), np.int64)):
        np.save(path, table)
        assert read_table(path, "here") == table.tolist()
    np.save(path, np.arange(6).reshape(2, 3))
    with pytest.raises(RunError, match=r"holds a int64 array of shape \[2, 3\], not a square integer table"):
        read_table(path, "here")
