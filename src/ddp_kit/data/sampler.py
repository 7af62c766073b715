"""Which rows each rank reads, batch by batch: the epoch order for training, contiguous shards for validation.

Samplers yield whole batches (int64 arrays of row ids, sorted within the batch so the dataset reads them
as ascending contiguous runs); the DataLoader runs with batch_size=None and makes one dataset call per batch.

Training order for an epoch is one global sequence of all N rows, the same on every rank:
  full:  a random permutation of the rows;
  chunk: the rows cut into blocks of `block_rows` consecutive rows, blocks in random order;
  none:  rows in file order.
Rank r takes positions [r*S, (r+1)*S) of that sequence, where S is the per-rank sample count, so each rank
reads whole blocks (contiguous ranges), not every world_size-th row. Without drop_last S = ceil(N / W) and
the positions past N wrap around to the start of the sequence (fewer than W rows repeated per epoch, as in
torch's DistributedSampler); with drop_last S = floor(N / (W*B)) * B and the tail of the sequence is
skipped. In chunk mode each rank then shuffles its rows within windows of `shuffle_window` consecutive
blocks. The result is a pure function of (seed, epoch, world size, batch size, rank, loader workers), and
every rank has the same number of batches.

DataLoader workers take batches round-robin (batch i goes to worker i % W). In chunk mode with W > 1 workers
the batches are therefore yielded interleaved: the epoch's batches are cut into W contiguous segments and
worker w's turns walk through segment w, so each worker reads (and, on a compressed file, decodes) its own
blocks instead of every worker decoding every block of the windows its batches touch. The segments are
arranged so that the epoch's last, possibly short, batch is still the last one yielded.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

SHUFFLES = ("chunk", "full", "none")


def _rng(seed: int, *words: int) -> np.random.Generator:
    # SeedSequence mixes all words, so (seed, epoch) pairs never collide the way seed + epoch would.
    return np.random.default_rng(np.random.SeedSequence([seed % 2**64, *words]))


class TrainBatchSampler:
    """This rank's training batches for the epoch set with `set_epoch` (call it every epoch)."""

    def __init__(self, num_rows: int, *, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: str = "chunk", block_rows: int = 1, shuffle_window: int = 8, drop_last: bool = False,
                 num_workers: int = 0):
        if shuffle not in SHUFFLES:
            raise ValueError(f"shuffle={shuffle!r} is not one of {', '.join(SHUFFLES)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if min(num_rows, batch_size, block_rows, shuffle_window) < 1:
            raise ValueError("num_rows, batch_size, block_rows and shuffle_window must all be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if drop_last and num_rows < world_size * batch_size:
            raise ValueError(f"{num_rows} rows are fewer than one global batch ({world_size} ranks x "
                             f"{batch_size}), so drop_last would leave no batch; lower the batch size or set "
                             "data.drop_last: false")
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.block_rows = block_rows
        self.shuffle_window = shuffle_window
        self.drop_last = drop_last
        self.num_workers = num_workers
        if drop_last:
            self.samples_per_rank = num_rows // (world_size * batch_size) * batch_size
        else:
            self.samples_per_rank = math.ceil(num_rows / world_size)
        self.batches_per_epoch = math.ceil(self.samples_per_rank / batch_size)
        self.epoch = 0
        self.start_batch = 0
        self.order_workers = num_workers

    def set_epoch(self, epoch: int, start_batch: int = 0, *, order_workers: int | None = None) -> None:
        """Select the epoch's order; skip its first `start_batch` batches (to resume mid-epoch exactly).

        `order_workers`: the loader worker count the skipped batches were ordered for, when a run resumes
        mid-epoch with another `data.num_workers`; the epoch then finishes in its original order.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch
        self.order_workers = self.num_workers if order_workers is None else order_workers

    def __len__(self) -> int:
        """Batches per epoch on every rank, including any skipped by `set_epoch(..., start_batch)`."""
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[np.ndarray]:
        rows = self.epoch_rows(self.epoch)
        order = self.batch_order()
        for position in range(self.start_batch, self.batches_per_epoch):
            b = order[position]
            yield np.sort(rows[b * self.batch_size:(b + 1) * self.batch_size])

    def batch_order(self) -> np.ndarray:
        """The batch index (into `epoch_rows` cut into consecutive batches) yielded at each position.

        The identity except in chunk mode with several loader workers (see the module docstring). After a
        mid-epoch resume the positions skipped by `start_batch` shift the round-robin, so that one epoch's
        workers share blocks again: slower, never different data.
        """
        n, workers = self.batches_per_epoch, self.order_workers
        if self.shuffle != "chunk" or workers <= 1 or n <= workers:
            return np.arange(n)
        # Worker v gets positions v, v + W, ...; segment k goes to worker (n + k) % W, so the last segment
        # (ending with batch n - 1) belongs to the worker that gets the last position, n - 1.
        owners = [(n + k) % workers for k in range(workers)]
        turns = [len(range(v, n, workers)) for v in owners]
        first = np.concatenate([[0], np.cumsum(turns)[:-1]])
        order = np.empty(n, dtype=np.int64)
        for owner, start, count in zip(owners, first, turns):
            order[owner::workers] = np.arange(start, start + count)
        return order

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """This rank's row ids for `epoch`, in sampling order (batches are consecutive slices of it)."""
        positions = np.arange(self.rank * self.samples_per_rank, (self.rank + 1) * self.samples_per_rank,
                              dtype=np.int64) % self.num_rows
        if self.shuffle == "none":
            return positions
        if self.shuffle == "full":
            return _rng(self.seed, epoch).permutation(self.num_rows)[positions]
        return self._chunk_rows(epoch, positions)

    def _chunk_rows(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        n, size = self.num_rows, self.block_rows
        order = _rng(self.seed, epoch).permutation(math.ceil(n / size))
        lengths = np.minimum(size, n - order * size)
        ends = np.cumsum(lengths)
        slot = np.searchsorted(ends, positions, side="right")  # index into the block order of each position
        rows = order[slot] * size + (positions - (ends[slot] - lengths[slot]))
        # Windows are counted in pieces of blocks as this rank meets them, so every window starts on a
        # block boundary and spans at most shuffle_window runs of rows.
        piece = np.cumsum(np.r_[0, np.diff(slot) != 0])
        window = piece // self.shuffle_window
        keys = window + _rng(self.seed, epoch, self.rank).random(len(rows))
        return rows[np.argsort(keys, kind="stable")]


class ShardBatchSampler:
    """Rank r's contiguous shard [r*N//W, (r+1)*N//W) in file order, batched: disjoint, complete, unpadded.
    Ranks may get different batch counts (evaluation needs no lockstep); a rank may get none if W > N."""

    def __init__(self, num_rows: int, *, batch_size: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.start = rank * num_rows // world_size
        self.stop = (rank + 1) * num_rows // world_size
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil((self.stop - self.start) / self.batch_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        for first in range(self.start, self.stop, self.batch_size):
            yield np.arange(first, min(first + self.batch_size, self.stop), dtype=np.int64)
