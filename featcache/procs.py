"""Model processes for the CPU: N forked processes, each decoding its own batches and running the
frozen network on them with ``cores / N`` threads.

On a CPU the DataLoader way (decode workers beside one model running on every core) makes the
decoders and the model's intra-op threads take cores from each other: a network of many small
layers (efficientnet_lite0) ends each layer in a barrier of its threads, so one preempted
thread stalls the others at every layer. Processes that each decode and then run their own
batch keep every core busy with no barrier between them (benchmarks/README.md, "Peers").

Batch ``j`` (the same images a one-process run puts in batch ``j``) is computed by process
``j % N`` and handed back in order, so the rows and the order the writer sees them in are
those of a one-process run, bit for bit. That needs care about threads: PyTorch runs a 1x1
convolution on one thread with another kernel than on several when the batch has fewer than
16 images (``use_mkldnn`` in ATen's Convolution.cpp), so a smaller last batch on a one-thread
process would round differently (measured: efficientnet_lite0, 3.7e-5 relative). A short
batch (the last, or one with a file that failed to decode) is therefore decoded by its
process and run by this one, on a one-process run's threads (a forked process cannot take
more threads: OpenMP's pool does not survive fork), and batch sizes under 16 get no model
processes. The full batches left over when their number does not divide among the processes
go the same way, so no process works alone at the end while the others wait (2,002 images
in batches of 64 on 2 processes: 31 full batches, the 31st run here on both cores instead of
on one process's one). The model is shared with the
processes by fork (no copy of the weights); results come back over pipes as raw float32
bytes behind a JSON header.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection

import numpy as np
import torch

from .errors import FeatcacheError
from .progress import Progress
from .runtime import die_with_parent, keep_memory

__all__ = ["model_processes", "forked_batches", "usable_cores", "distributed", "barrier", "merge_failures", "to_each",
           "on_first"]

_PROC_MEMORY = 3 << 30  # what one process may need for a batch of 64 (activations of a large CNN)
MIN_BATCH = 16  # below this, one thread takes other convolution kernels than several (see above)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def model_processes(device: torch.device, n_items: int, batch_size: int, workers: int | None) -> int:
    """How many model processes to run: 0 (the model runs here, DataLoader workers decode) unless the
    model runs on the CPU, the number of workers is left to featcache, there are two batches or more of
    at least ``MIN_BATCH`` images, fork is available and this is not one rank of several (torchrun)."""
    if (device.type != "cpu" or workers is not None or n_items <= batch_size or batch_size < MIN_BATCH
            or int(os.environ.get("WORLD_SIZE", "1")) > 1
            or "fork" not in mp.get_all_start_methods() or os.environ.get("FEATCACHE_MODEL_PROCS") == "0"):
        return 0
    n = min(usable_cores(), 8, -(-n_items // batch_size))
    avail = _available_memory()
    if avail is not None:
        n = min(n, max(1, avail // _PROC_MEMORY))
    return n if n >= 2 else 0


def _child(rank: int, procs: int, threads: int, run: Callable, collate: Callable, dataset, n: int,
           batch_size: int, conn: Connection, shown: Progress, parent: int) -> None:
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it ends us on Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(threads)
    keep_memory()
    out: queue.Queue = queue.Queue(maxsize=2)  # compute the next batch while this one is sent

    def send() -> None:
        try:
            while (msg := out.get()) is not None:
                conn.send_bytes(msg[0])
                if msg[1] is not None:
                    conn.send_bytes(msg[1])
        except OSError:  # the parent closed its end (it stopped or ended): nobody waits for the rest
            os._exit(1)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    slot = shown.slot(rank, decoding=True)
    here_from = (n // batch_size) // procs * procs  # batches from here on are run by the parent (see above)
    try:
        for j in range(rank, -(-n // batch_size), procs):
            t0 = time.perf_counter()
            span = range(j * batch_size, min(n, (j + 1) * batch_size))
            slot.start(len(span))
            decoded = []
            for i in span:
                decoded.append(dataset[i])
                slot.decoded()
            indices, x, bad = collate(decoded)
            del decoded
            t1 = time.perf_counter()
            head = {"batch": j, "indices": indices, "bad": bad, "read": t1 - t0, "model": 0.0, "shape": None}
            if x is not None and (len(x) < batch_size or j >= here_from):  # the parent runs it (see above)
                inputs = np.ascontiguousarray(x.numpy())
                head["input"] = {"shape": list(inputs.shape), "dtype": inputs.dtype.str,
                                 "left": slot.hand_over()}
                out.put((json.dumps(head).encode(), inputs.reshape(-1).view(np.uint8)))
                continue
            feats = None if x is None else np.ascontiguousarray(run(x), dtype=np.float32)
            slot.finish()
            head["model"] = time.perf_counter() - t1
            head["shape"] = None if feats is None else list(feats.shape)
            out.put((json.dumps(head).encode(), None if feats is None else feats.reshape(-1).view(np.uint8)))
    except BaseException as e:  # reported to the parent, which raises it
        out.put((json.dumps({"error": f"{e.__class__.__name__}: {e}"}).encode(), None))
    out.put(None)
    sender.join()
    conn.close()


def _receive(conn: Connection, shape: list[int], dtype) -> np.ndarray:
    arr = np.empty(shape, dtype=dtype)
    if conn.recv_bytes_into(arr.reshape(-1).view(np.uint8)) != arr.nbytes:  # a 1-D view: its length is its bytes
        raise EOFError
    return arr


def forked_batches(run: Callable[[torch.Tensor], np.ndarray], collate: Callable, dataset, n: int, batch_size: int,
                   procs: int, spent: dict[str, float], shown: Progress) -> Iterator[tuple[list[int], np.ndarray | None, list]]:
    """``(indices, float32 features or None, failures)`` for each batch of ``dataset``, in batch order,
    computed by ``procs`` forked processes. ``spent`` accumulates the processes' seconds decoding
    (``decode``) and in the model (``forward``), and this process's seconds waiting (``read``).
    ``shown`` (its slots ``0..procs``) counts the files as they are decoded and go through the model."""
    ctx = mp.get_context("fork")
    threads = max(1, usable_cores() // procs)
    children, conns = [], []
    try:
        for r in range(procs):
            here, there = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(r, procs, threads, run, collate, dataset, n, batch_size, there, shown, os.getpid()),
                            daemon=True, name=f"featcache-model-{r}")
            p.start()
            there.close()
            children.append(p)
            conns.append(here)
        for key in ("decode", "forward", "read"):
            spent.setdefault(key, 0.0)
        here_slot = shown.slot(procs, decoding=False)
        for j in range(-(-n // batch_size)):
            t = time.perf_counter()
            conn = conns[j % procs]
            try:
                head = json.loads(conn.recv_bytes())
                if "error" in head:
                    raise FeatcacheError(f"model process {j % procs} failed: {head['error']}")
                feats = inputs = None
                if head["shape"] is not None:
                    feats = _receive(conn, head["shape"], np.float32)
                elif "input" in head:
                    inputs = _receive(conn, head["input"]["shape"], np.dtype(head["input"]["dtype"]))
            except (EOFError, OSError):
                code = children[j % procs].exitcode
                raise FeatcacheError(f"model process {j % procs} ended unexpectedly (exit status {code}; out of "
                                     "memory?). Re-run the command, or pass --workers N to run the model in one process") from None
            if head["batch"] != j:
                raise FeatcacheError(f"model process {j % procs} sent batch {head['batch']}, expected {j}")
            spent["read"] += time.perf_counter() - t
            if inputs is not None:  # a short or left-over batch, run here on a one-process run's threads
                t = time.perf_counter()
                here_slot.start(head["input"]["left"])
                feats = np.ascontiguousarray(run(torch.from_numpy(inputs)), dtype=np.float32)
                here_slot.finish()
                head["model"] = time.perf_counter() - t
            spent["decode"] += head["read"]
            spent["forward"] += head["model"]
            yield head["indices"], feats, [tuple(b) for b in head["bad"]]
    finally:
        for c in conns:
            c.close()
        for p in children:
            if p.is_alive():
                p.terminate()
            p.join()


# ---------------------------------------------------------------- ranks (torchrun)


def distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun; (0, 1) otherwise. Ranks split the images to extract."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        # Ranks wait for rank 0's scan of the folder (hours at 10M files) and for the slowest rank's
        # share: longer than the default timeout (10-30 min). A rank that dies is not waited for:
        # torchrun stops the others when one fails.
        from datetime import timedelta

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=24))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def barrier(world: int) -> None:
    """Under torchrun, wait until every rank is here."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def merge_failures(failed: dict[str, str], world: int) -> dict[str, str]:
    """Under torchrun, every rank's failures (by content hash) together."""
    if world <= 1:
        return failed
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, failed)  # in-process messages between ranks, never stored
    return {k: v for part in parts for k, v in part.items()}


def to_each(make, world: int, rank: int):
    """Under torchrun, ``make()`` runs on rank 0 only and returns one value per rank; each rank gets its own
    (or the FeatcacheError ``make`` raised, raised on every rank, so no rank waits for what never comes):
    rank 0 plans, and every other rank receives its share of the plan, not the plan. Without torchrun,
    ``make()[0]``."""
    from .errors import FeatcacheError

    if world <= 1:
        return make()[0]
    import torch.distributed as dist

    mine: list = [None]
    if rank != 0:
        dist.scatter_object_list(mine, None, src=0)  # in-process messages between ranks, never stored
    else:
        try:
            values = make()
            payload = [("ok", v) for v in values]
        except FeatcacheError as e:
            payload = [("error", e)] * world
        except BaseException as e:  # the others must not wait for a share that never comes
            stopped = FeatcacheError(f"rank 0 stopped while planning: {e.__class__.__name__}: {e}")
            dist.scatter_object_list(mine, [("error", stopped)] * world, src=0)
            raise
        dist.scatter_object_list(mine, payload, src=0)
    kind, value = mine[0]
    if kind == "error":
        raise value
    return value


def on_first(make, world: int, rank: int):
    """Under torchrun, ``make()`` runs on rank 0 only, which keeps its value; the other ranks get None (or
    the FeatcacheError it raised): one rank scans and hashes the folder, and holds what it found."""
    return to_each(lambda: [make()] + [None] * (world - 1), world, rank)
