"""torch datasets of a set's rows (see :mod:`featcache.store.convert`): one held in memory, one streamed
from the store a window of stored chunks at a time. Imported only when asked for."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import IterableDataset, TensorDataset, get_worker_info

from ..stream import RowReader, as_dtype

if TYPE_CHECKING:
    from .sets import FeatureSet

__all__ = ["InMemoryRows", "StreamingRows"]


class InMemoryRows(TensorDataset):
    """(row, label) pairs of one split held in memory: ``len``, indexing, any sampler."""


class StreamingRows(IterableDataset):
    """(row, label) pairs of one split read from the store a window of chunks at a time.

    Each epoch visits the chunks in a new order and shuffles the rows of a window (``shuffle``;
    call ``set_epoch`` between epochs, as with ``DistributedSampler``); ``DataLoader`` workers take
    disjoint shares of the chunks, so every row comes once per epoch."""

    def __init__(self, fs: FeatureSet, split: str, dtype: str, pool: str, shuffle: bool, seed: int, window: int):
        self.fs, self.split, self.dtype, self.pool = fs, split, dtype, pool
        self.shuffle, self.seed, self.window, self.epoch = shuffle, seed, int(window), 0
        self.hashes, self.labels = fs.hashes(split), fs.labels(split).astype(np.int64)
        self.hint = fs.locations(split)

    def __len__(self) -> int:
        return len(self.hashes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _reader(self, keep: np.ndarray) -> RowReader:
        fs = self.fs
        hint = None if self.hint is None else self.hint.take(keep)
        return RowReader(fs.store, fs.space, self.hashes[keep], fs.shape, self.pool, keep_shape=self.pool == "none",
                         hint=hint)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        keep = np.arange(len(self.hashes))
        reader = self._reader(keep)
        info = get_worker_info()
        if info is not None and info.num_workers > 1:  # this worker's share of the stored chunks
            mine = reader.blocks[info.id::info.num_workers]
            keep = np.sort(np.concatenate([b.dest for b in mine])) if mine else np.zeros(0, dtype=np.int64)
            reader = self._reader(keep)
        rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        where = f"set {self.fs.key} split {self.split}"
        for x, dest in reader.windows(self.window, rng):
            x = as_dtype(x, self.dtype, where)
            y = self.labels[keep[dest]]
            for i in range(len(x)):
                yield torch.from_numpy(x[i]), torch.tensor(y[i])
