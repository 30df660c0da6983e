"""The scan cache: unchanged files are not read again, and a changed file is never served a stale hash.

Each stale-hash case below changes a file in a way that leaves part of its stat signature as
it was (same size, same mtime put back, same path), then checks the manifest's hash against
the bytes on disk: a cache keyed by less than size, mtime, ctime, inode and device, or one
without the racy-entry rule, fails one of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import featcache
from featcache.cli import main
from featcache.data import manifest as MANIFEST
from featcache.data import scan
from featcache.data import scancache as SCANCACHE
from featcache.data.columns import Paths
from featcache.data.scancache import SUFFIX, ScanCache, read_file, write_file

from .helpers import TINY, extract_tiny

RACY_TEST_NS = 50_000_000  # 50 ms: far above a clock tick, so tests need not wait 2 s for entries to be trusted


def _img(path: Path, colour: tuple[int, int, int], size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _folder(root: Path) -> Path:
    """train/val x two classes, all files the same size (8x8 BMPs)."""
    for split in ("train", "val"):
        for k, cls in enumerate(("a", "b")):
            for i in range(3):
                _img(root / split / cls / f"{i}.bmp", (40 * i + 10, 100 * k + 20, 7 if split == "train" else 90))
    return root


@pytest.fixture
def reads(monkeypatch):
    """The paths whose bytes the scan read to hash them."""
    seen: list[str] = []
    real = MANIFEST._hash_signed

    def counting(path):
        seen.append(Path(path).as_posix())
        return real(path)

    monkeypatch.setattr(MANIFEST, "_hash_signed", counting)
    monkeypatch.setattr(SCANCACHE, "RACY_NS", RACY_TEST_NS)
    return seen


def _trusted(root: Path, reads: list[str]) -> None:
    """Scan once with every file safely older than the scan, so every entry is trusted next time."""
    time.sleep(3 * RACY_TEST_NS / 1e9)
    scan(root)
    reads.clear()


def _hashes(m) -> dict[str, str]:
    return {it.path: it.sha256 for it in m.items}


def _truth(root: Path, m) -> dict[str, str]:
    return {it.path: hashlib.sha256((root / it.path).read_bytes()).hexdigest() for it in m.items}


def test_a_rerun_reads_no_unchanged_file_and_gives_the_same_manifest(tmp_path, reads):
    root = _folder(tmp_path / "d")
    time.sleep(3 * RACY_TEST_NS / 1e9)
    first = scan(root)
    assert len(reads) == 12
    reads.clear()
    again = scan(root)
    assert reads == [] and again.items == first.items and again.digest() == first.digest()
    assert not any(p.suffix == SUFFIX or p.name.startswith(".") for p in root.rglob("*"))  # nothing beside the data
    assert len(list(Path(os.environ["FEATCACHE_SCAN_CACHE"]).glob(f"*{SUFFIX}"))) == 1


def test_same_size_rewrite_with_mtime_put_back_is_rehashed(tmp_path, reads):
    root = _folder(tmp_path / "d")
    _trusted(root, reads)
    victim = root / "train" / "a" / "0.bmp"
    before = victim.stat()
    _img(victim, (250, 250, 250))  # different pixels, same size: an 8x8 BMP
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = victim.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    m = scan(root)
    assert _hashes(m) == _truth(root, m) and reads == [victim.as_posix()]


def test_swapped_names_of_files_with_the_same_size_and_mtime_are_rehashed(tmp_path, reads):
    root = _folder(tmp_path / "d")
    a, b = root / "train" / "a" / "0.bmp", root / "train" / "a" / "1.bmp"
    t = a.stat().st_mtime_ns
    os.utime(b, ns=(t, t))
    _trusted(root, reads)
    old = scan(root)
    os.rename(a, root / "tmp.bmp")
    os.rename(b, a)
    os.rename(root / "tmp.bmp", b)
    m = scan(root)
    assert _hashes(m) == _truth(root, m) and _hashes(m)["train/a/0.bmp"] == _hashes(old)["train/a/1.bmp"]
    assert sorted(reads) == sorted([a.as_posix(), b.as_posix()])


def test_touch_is_rehashed(tmp_path, reads):
    root = _folder(tmp_path / "d")
    _trusted(root, reads)
    victim = root / "val" / "b" / "2.bmp"
    victim.touch()
    m = scan(root)
    assert reads == [victim.as_posix()] and _hashes(m) == _truth(root, m)


def test_a_file_copied_over_with_cp_p_same_size_and_mtime_is_rehashed(tmp_path, reads):
    root = _folder(tmp_path / "d")
    victim, other = root / "train" / "b" / "0.bmp", root / "train" / "b" / "1.bmp"
    t = victim.stat().st_mtime_ns
    os.utime(other, ns=(t, t))
    _trusted(root, reads)
    inode = victim.stat().st_ino
    shutil.copy2(other, victim)  # what `cp -p other victim` does: same inode, bytes and mtime from `other`
    st = victim.stat()
    assert (st.st_ino, st.st_mtime_ns, st.st_size) == (inode, t, other.stat().st_size)
    m = scan(root)
    assert _hashes(m) == _truth(root, m) and _hashes(m)["train/b/0.bmp"] == _hashes(m)["train/b/1.bmp"]


def test_a_deleted_and_recreated_file_is_rehashed(tmp_path, reads):
    root = _folder(tmp_path / "d")
    _trusted(root, reads)
    victim = root / "val" / "a" / "0.bmp"
    before = victim.stat()
    victim.unlink()
    _img(victim, (1, 2, 3))
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    m = scan(root)
    assert reads == [victim.as_posix()] and _hashes(m) == _truth(root, m)


def test_an_entry_written_too_soon_after_its_file_changed_is_not_trusted(tmp_path, reads):
    """git's racy rule: a file changed in the clock tick of its hashing could change again, keeping its
    stat signature; an entry younger than the margin before its scan started is hashed again next time."""
    root = _folder(tmp_path / "d")
    _trusted(root, reads)
    fresh = root / "train" / "a" / "2.bmp"
    _img(fresh, (9, 9, 9))
    scan(root)  # hashes `fresh`; its ctime is within the margin of this scan's start
    assert reads == [fresh.as_posix()]
    reads.clear()
    scan(root)
    assert reads == [fresh.as_posix()]  # still racy: read again
    reads.clear()
    time.sleep(3 * RACY_TEST_NS / 1e9)
    scan(root)
    reads.clear()
    scan(root)
    assert reads == []  # once safely old when it was hashed, it is trusted


def test_rehash_reads_every_file(tmp_path, reads):
    root = _folder(tmp_path / "d")
    _trusted(root, reads)
    scan(root, rehash=True)
    assert len(reads) == 12
    reads.clear()
    scan(root)
    assert reads == []  # a rehash writes a fresh cache


def test_extract_rehash_option_reads_every_file(tmp_path, reads):
    root = _folder(tmp_path / "d")
    store = tmp_path / "s.zarr"
    extract_tiny(root, store)
    time.sleep(3 * RACY_TEST_NS / 1e9)
    extract_tiny(root, store)
    reads.clear()
    assert extract_tiny(root, store).cache_hit and reads == []
    args = ["extract", "--backbone", TINY, "--weights", "none", "--workers", "0", "--data", str(root),
            "--store", str(store)]
    r = CliRunner().invoke(main, args + ["--rehash"])
    assert r.exit_code == 0, r.output
    assert len(reads) == 12 and "nothing to compute" in r.output
    reads.clear()
    assert extract_tiny(root, store, rehash=True).cache_hit and len(reads) == 12


def _rewrite(file: Path, change) -> None:
    """Read a cache file, let ``change(footer, arrays)`` alter it, write it back whole (with fresh CRCs)."""
    footer, arrays = read_file(file)
    change(footer, arrays)
    write_file(file, {k: v for k, v in footer.items() if k != "arrays"}, arrays)


def _flip(file: Path, name: str) -> None:
    """One byte of the array ``name`` changed in place: its CRC no longer holds."""
    footer, arrays = read_file(file)
    at = footer["arrays"][name]["offset"] + arrays[name].nbytes // 2
    data = bytearray(file.read_bytes())
    data[at] ^= 0x5A
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "other folder", "digests flipped",
                                    "stats flipped", "keys flipped", "footer flipped", "listing changed"])
def test_a_damaged_cache_is_ignored_with_a_note_and_rewritten(tmp_path, reads, caplog, damage):
    root = _folder(tmp_path / "d")
    _trusted(root, reads)
    file = next(Path(os.environ["FEATCACHE_SCAN_CACHE"]).glob(f"*{SUFFIX}"))
    good = file.read_bytes()
    if damage == "garbage":
        file.write_bytes(b"FCSCAN2\n not really" * 10)
    elif damage == "truncated":
        file.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        file.write_bytes(b"")
    elif damage == "other folder":
        _rewrite(file, lambda footer, _: footer.update(root="/elsewhere"))
    elif damage == "footer flipped":
        file.write_bytes(good.replace(b'"entries": 12', b'"entries": 13'))
    elif damage == "listing changed":  # a cache whose order is not the listing's, yet claims it is
        def reverse(footer, arrays):
            for k in arrays:
                arrays[k] = arrays[k][::-1].copy()
        _rewrite(file, reverse)
    else:
        _flip(file, damage.split()[0])
    if damage == "keys flipped":  # the keys are read only when the listing changed
        (root / "train" / "a" / "0.bmp").rename(root / "train" / "a" / "9.bmp")
        time.sleep(3 * RACY_TEST_NS / 1e9)  # a rename sets the file's ctime: let it be safely old
    with caplog.at_level(logging.WARNING, logger="featcache.data"):
        m = scan(root)
    assert _hashes(m) == _truth(root, m)
    assert len(reads) == 12
    if damage != "listing changed":  # entries out of the listing's order: no signature matches its file (inodes)
        assert any("scan cache" in rec.getMessage() and "hashing every file" in rec.getMessage()
                   for rec in caplog.records)
    reads.clear()
    scan(root)
    assert reads == []


def test_a_listing_that_changed_is_served_by_path_and_written_in_the_new_order(tmp_path, reads):
    root = _folder(tmp_path / "d")
    _trusted(root, reads)
    new = _img(root / "train" / "a" / "10.bmp", (1, 1, 1))
    (root / "val" / "b" / "2.bmp").unlink()
    m = scan(root)
    assert reads == [new.as_posix()] and _hashes(m) == _truth(root, m)
    file = next(Path(os.environ["FEATCACHE_SCAN_CACHE"]).glob(f"*{SUFFIX}"))
    footer, arrays = read_file(file)
    assert footer["entries"] == 12 and (arrays["stats"][:, 0] >= 0).sum() == 12
    reads.clear()
    time.sleep(3 * RACY_TEST_NS / 1e9)
    scan(root)
    assert reads == [new.as_posix()]  # it was racy when hashed; now safely old
    reads.clear()
    scan(root)
    assert reads == []


def _as_version_1(root: Path, file: Path) -> Path:
    """The cache file of version 1 that the earlier code would have written for the same entries: an .npz of
    8-byte BLAKE2b path keys (sorted), the paths as offsets and one blob, signatures, hashes and a header."""
    footer, arrays = read_file(file)
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.bmp"))
    mine = SCANCACHE._path_keys(Paths.of(paths))
    at = [int(np.flatnonzero(np.all(arrays["keys"] == k, axis=1))[0]) for k in mine]
    short = [int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little") for p in paths]
    order = np.argsort(np.array(short, dtype=np.uint64), kind="stable")
    blob = "".join(paths[i] for i in order).encode()
    offsets = np.concatenate([[0], np.cumsum([len(paths[i].encode()) for i in order])]).astype(np.int64)
    header = {"format": "featcache-scan-cache", "version": 1, "root": footer["root"], "device": footer["device"],
              "started_ns": footer["started_ns"], "entries": len(paths)}
    old = file.with_suffix(".npz")
    with open(old, "wb") as f:
        np.savez(f, keys=np.array(short, dtype=np.uint64)[order], offsets=offsets,
                 paths=np.frombuffer(blob, np.uint8), stats=arrays["stats"][[at[i] for i in order]],
                 digests=arrays["digests"][[at[i] for i in order]],
                 header=np.frombuffer(json.dumps(header).encode(), np.uint8))
    file.unlink()
    return old


def test_a_cache_of_the_earlier_version_serves_once_and_is_replaced(tmp_path, reads):
    """An upgrade re-reads no unchanged file: the version-1 file's entries are matched by path (a changed
    file is still read), then version 2 is written and the old file removed."""
    root = _folder(tmp_path / "d")
    _trusted(root, reads)
    file = next(Path(os.environ["FEATCACHE_SCAN_CACHE"]).glob(f"*{SUFFIX}"))
    old = _as_version_1(root, file)
    touched = root / "val" / "a" / "1.bmp"
    touched.touch()
    m = scan(root)
    assert reads == [touched.as_posix()] and _hashes(m) == _truth(root, m)
    assert file.exists() and not old.exists()


def test_a_damaged_cache_of_the_earlier_version_is_ignored_with_a_note(tmp_path, reads, caplog):
    root = _folder(tmp_path / "d")
    _trusted(root, reads)
    file = next(Path(os.environ["FEATCACHE_SCAN_CACHE"]).glob(f"*{SUFFIX}"))
    old = _as_version_1(root, file)
    old.write_bytes(old.read_bytes()[:200])
    with caplog.at_level(logging.WARNING, logger="featcache.data"):
        m = scan(root)
    assert len(reads) == 12 and _hashes(m) == _truth(root, m)
    assert any("earlier version" in rec.getMessage() for rec in caplog.records)
    assert file.exists() and not old.exists()


def test_a_cache_that_holds_a_wrong_hash_is_caught_when_the_file_is_decoded(tmp_path, reads):
    """The reader hashes the bytes it decodes: even a scan hash that is wrong (here forged into the
    cache) never puts an image's features under another image's hash."""
    root = _folder(tmp_path / "d")
    _trusted(root, reads)
    file = next(Path(os.environ["FEATCACHE_SCAN_CACHE"]).glob(f"*{SUFFIX}"))
    stale = hashlib.sha256(b"not these bytes").hexdigest()
    key = SCANCACHE._path_keys(Paths.of(["train/a/0.bmp"]))[0]

    def forge(footer, arrays):
        j = int(np.flatnonzero(np.all(arrays["keys"] == key, axis=1))[0])
        arrays["digests"][j] = np.frombuffer(bytes.fromhex(stale), np.uint8)
    _rewrite(file, forge)
    assert _hashes(scan(root))["train/a/0.bmp"] == stale  # the forged entry is served ...
    r = extract_tiny(root, tmp_path / "s.zarr")
    assert [(s.path, s.reason.split(" (")[0]) for s in r.skipped] == [("train/a/0.bmp", "changed while reading")]
    assert stale not in featcache.open_store(str(tmp_path / "s.zarr")).known_hashes(r.space)  # ... and caught


def test_concurrent_scans_leave_one_whole_cache(tmp_path):
    root = _folder(tmp_path / "d")
    for i in range(40):
        _img(root / "train" / "a" / f"x{i}.bmp", (i, 2 * i, 3 * i))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    code = "import sys; from featcache.data import scan; scan(sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root)], env=env) for _ in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    files = list(Path(os.environ["FEATCACHE_SCAN_CACHE"]).iterdir())
    assert len(files) == 1 and files[0].suffix == SUFFIX  # no temporary file left behind
    with ScanCache.open(root) as cache:
        assert cache.entries == 52


def test_the_cache_can_be_turned_off_or_unwritable_and_scans_still_hash(tmp_path, reads, monkeypatch, caplog):
    root = _folder(tmp_path / "d")
    monkeypatch.setenv("FEATCACHE_SCAN_CACHE", "off")
    time.sleep(3 * RACY_TEST_NS / 1e9)
    scan(root)
    scan(root)
    assert len(reads) == 24
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FEATCACHE_SCAN_CACHE", str(blocker / "scans"))
    reads.clear()
    with caplog.at_level(logging.WARNING, logger="featcache.data"):
        m = scan(root)
    assert len(reads) == 12 and _hashes(m) == _truth(root, m)
    assert any("could not write the scan cache" in rec.getMessage() for rec in caplog.records)
