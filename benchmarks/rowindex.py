"""The row index alone: a lookup of a few keys in a space of many rows.

A space of ``rows`` fake rows is written through the store API, as extract writes them (segments of
100k rows, random SHA-256 keys, one float16 per row, so that only the index costs show). Then, for
each checkout (``code``, and ``against`` when given, alternating, each in a fresh process so its peak
memory is its own):

* the first lookup of ``lookups`` stored keys (``locate``: reads the segments' keys and builds the index);
* the same lookup again (the index cached) and ``gather`` of those rows;
* "which of these are missing" for ``lookups`` keys, half stored and half not, as extract plans
  (``known_hashes`` and a membership test per key, or one ``contains`` call where the code has it);
* the peak memory above the process's memory after opening the store (VmHWM minus VmRSS).

``python -m benchmarks.rowindex --rows 1000000 --against /path/to/main`` (``--segment-rows`` for smaller
segments, ``--out`` to save the result as JSON)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

__all__ = ["make_space", "run_rowindex"]

REPO = Path(__file__).resolve().parents[1]
SEGMENT_ROWS = 100_000

_CHILD = r"""
import json, sys, time

def mem(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0

job = json.loads(open(sys.argv[1]).read())
import numpy as np
import featcache
st = featcache.open_store(job["store"])
space, present, absent = job["space"], job["present"], job["absent"]
base = mem("VmRSS")
out = {}
t = time.perf_counter(); st.locate(space, present); out["first_lookup_s"] = time.perf_counter() - t
t = time.perf_counter(); st.locate(space, present); out["second_lookup_s"] = time.perf_counter() - t
t = time.perf_counter(); rows = st.gather(space, present, (1,), "float16"); out["gather_s"] = time.perf_counter() - t
mixed = [k for pair in zip(present, absent) for k in pair]
t = time.perf_counter()
known = st.known_hashes(space)
if hasattr(known, "contains"):
    missing = int((~known.contains(mixed)).sum())
else:
    missing = sum(k not in known for k in mixed)
out["missing_s"] = time.perf_counter() - t
out["missing"] = missing
out["rows_read"] = len(rows)
out["peak_above_start"] = mem("VmHWM") - base
print("RESULT " + json.dumps(out))
"""


def make_space(url: str, rows: int, seed: int = 0, segment_rows: int = SEGMENT_ROWS) -> tuple[str, list[str]]:
    """A store at ``url`` with one space of ``rows`` fake rows in segments of ``segment_rows``; returns (space,
    every row key)."""
    import featcache
    from featcache.store.segments import arrays_to_keys

    st = featcache.open_store(url)
    space = st.ensure_space({"benchmark": "rowindex", "rows": rows})
    rng = np.random.default_rng(seed)
    keys: list[str] = []
    for start in range(0, rows, segment_rows):
        n = min(segment_rows, rows - start)
        part = arrays_to_keys(rng.integers(0, 256, (n, 32), dtype=np.uint8))
        writer = st.new_segment(space, n, (1,), "float16")
        writer.append(np.ones((n, 1), dtype=np.float16), part)
        writer.commit()
        keys += part
    return space, keys


def _child(job: Path, code: Path) -> dict:
    run = subprocess.run([sys.executable, "-c", _CHILD, str(job)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(code)}, cwd=str(code))
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if run.returncode != 0 or line is None:
        raise RuntimeError(f"lookup failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def run_rowindex(rows: int = 1_000_000, lookups: int = 1000, rounds: int = 3, code: str | None = None,
                 against: str | None = None, tmp: str | None = None, segment_rows: int = SEGMENT_ROWS) -> dict:
    codes = {"code": Path(code or REPO).resolve()}
    if against is not None:
        codes = {"against": Path(against).resolve(), **codes}
    top = Path(tempfile.mkdtemp(prefix="featcache-rowindex-", dir=tmp))
    try:
        t = time.perf_counter()
        space, keys = make_space(str(top / "s.zarr"), rows, segment_rows=segment_rows)
        write_s = time.perf_counter() - t
        rng = np.random.default_rng(1)
        present = [keys[i] for i in rng.choice(len(keys), lookups, replace=False).tolist()]
        from featcache.store.segments import arrays_to_keys

        absent = arrays_to_keys(rng.integers(0, 256, (lookups, 32), dtype=np.uint8))
        del keys
        job = top / "job.json"  # too long for one command-line argument
        job.write_text(json.dumps({"store": str(top / "s.zarr"), "space": space, "present": present, "absent": absent}))
        load_before = os.getloadavg()
        runs: dict[str, list[dict]] = {k: [] for k in codes}
        for _ in range(rounds):  # alternating, so both see the same load on a shared machine
            for k, c in codes.items():
                runs[k].append(_child(job, c))
    finally:
        shutil.rmtree(top, ignore_errors=True)
    out: dict = {"rows": rows, "segment_rows": segment_rows, "lookups": lookups, "rounds": rounds, "write_s": write_s,
                 "load_before": load_before, "load_after": os.getloadavg()}
    for k, rs in runs.items():
        if any(r["missing"] != lookups for r in rs):
            raise RuntimeError(f"{k}: wrong number of missing keys")
        out[k] = {f: float(np.median([r[f] for r in rs])) for f in rs[0]}
        out[k]["bytes_per_row"] = out[k]["peak_above_start"] / rows
    return out


@click.command()
@click.option("--rows", default=1_000_000, show_default=True)
@click.option("--lookups", default=1000, show_default=True)
@click.option("--rounds", default=3, show_default=True)
@click.option("--against", default=None, help="another checkout, measured alternating with this one")
@click.option("--tmp", default=None, help="folder for the temporary store")
@click.option("--segment-rows", default=SEGMENT_ROWS, show_default=True, help="rows per segment of the space")
@click.option("--out", default=None, help="also write the result to this JSON file")
def main(rows: int, lookups: int, rounds: int, against: str | None, tmp: str | None, segment_rows: int,
         out: str | None) -> None:
    result = run_rowindex(rows, lookups, rounds, against=against, tmp=tmp, segment_rows=segment_rows)
    for k in ("against", "code"):
        if k in result:
            result[k]["path"] = str(Path(against if k == "against" else REPO).resolve())
    print(json.dumps(result, indent=1))
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
    out_ = result
    sides = [k for k in ("against", "code") if k in out_]
    fields = ("first_lookup_s", "second_lookup_s", "gather_s", "missing_s", "peak_above_start", "bytes_per_row")
    print("| side | " + " | ".join(fields) + " |")
    print("| --- " * (len(fields) + 1) + "|")
    for k in sides:
        print(f"| {k} | " + " | ".join(f"{out_[k][f]:.4g}" for f in fields) + " |")


if __name__ == "__main__":
    main()
