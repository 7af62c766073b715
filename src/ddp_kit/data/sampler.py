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

An optimizer step takes `accum_steps` consecutive batches from every rank, so an epoch's layout (world size,
batch size, accum_steps, and the loader workers its batch order was made for) deals its rows into steps; read
step by step, rank after rank, those rows are the epoch's *step order*. A run resumed mid-epoch with another
layout (`resume_epoch`) deals the rows the epoch has left in that order, in its own global batches: with the
same global batch every remaining step takes the same rows as it would have, and over the epoch every row is
used exactly once. The epoch's last step, if it is short, is split as evenly as the new layout allows; when
fewer rows than ranks are left, some are repeated (as DistributedSampler pads). While the global batch is
kept, later epochs too follow the step order of the layout the run began with (`order_layout`), so the run
trains on what an uninterrupted one would have, step for step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import numpy as np

SHUFFLES = ("chunk", "full", "none")


def _rng(seed: int, *words: int) -> np.random.Generator:
    # SeedSequence mixes all words, so (seed, epoch) pairs never collide the way seed + epoch would.
    return np.random.default_rng(np.random.SeedSequence([seed % 2**64, *words]))


@dataclass(frozen=True)
class EpochLayout:
    """How an epoch's rows are dealt into optimizer steps: `world_size` ranks take `accum_steps` batches of
    `batch_size` rows each per step, in the batch order made for `order_workers` loader workers."""

    world_size: int
    batch_size: int
    accum_steps: int
    order_workers: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.accum_steps


def _samples_per_rank(num_rows: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    if drop_last:
        return num_rows // (world_size * batch_size) * batch_size
    return math.ceil(num_rows / world_size)


def _rows_done_natively(num_rows: int, layout: EpochLayout, drop_last: bool, batches_done: int) -> int:
    """The rows of an epoch dealt by `layout` itself that every rank's first `batches_done` batches hold."""
    return layout.world_size * min(batches_done * layout.batch_size,
                                   _samples_per_rank(num_rows, layout.world_size, layout.batch_size, drop_last))


class TrainBatchSampler:
    """This rank's training batches for the epoch set with `set_epoch` or `resume_epoch` (call one every epoch)."""

    def __init__(self, num_rows: int, *, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: str = "chunk", block_rows: int = 1, shuffle_window: int = 8, drop_last: bool = False,
                 num_workers: int = 0, accum_steps: int = 1):
        if shuffle not in SHUFFLES:
            raise ValueError(f"shuffle={shuffle!r} is not one of {', '.join(SHUFFLES)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if min(num_rows, batch_size, block_rows, shuffle_window, accum_steps) < 1:
            raise ValueError("num_rows, batch_size, block_rows, shuffle_window and accum_steps must all be >= 1")
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
        self.accum_steps = accum_steps
        self.samples_per_rank = _samples_per_rank(num_rows, world_size, batch_size, drop_last)
        self.batches_per_epoch = math.ceil(self.samples_per_rank / batch_size)
        self.epoch = 0
        self.start_batch = 0
        self.order_workers = num_workers
        self.epoch_layout = self._layout(num_workers)
        # The (world size, batch size, accum_steps) whose step order every epoch follows: this sampler's own,
        # or, in a run resumed on another layout with the same global batch, the one the run began with.
        self.order_layout = self.epoch_layout
        # After resume_epoch with another layout: this rank's share of the rows the epoch had left, batch by
        # batch, numbered from `start_batch`; and the epoch's rows done before them, along its step order.
        self._dealt: Optional[list[np.ndarray]] = None
        self._rows_before = self._rows_left = 0

    def _layout(self, order_workers: int) -> EpochLayout:
        return EpochLayout(self.world_size, self.batch_size, self.accum_steps, order_workers)

    def set_epoch(self, epoch: int, start_batch: int = 0, *, order_workers: int | None = None) -> None:
        """Select the epoch's order, dealt by `order_layout`; skip its first `start_batch` batches (to resume
        mid-epoch exactly; only when `order_layout` is this sampler's own, otherwise use `resume_epoch`).

        `order_workers`: the loader worker count the skipped batches were ordered for, when a run resumes
        mid-epoch with another `data.num_workers`; the epoch then finishes in its original order.
        """
        workers = self.num_workers if order_workers is None else order_workers
        order = replace(self.order_layout, order_workers=workers)
        if self._own_steps(order):
            self._native(epoch, start_batch, workers)
        elif start_batch:
            raise ValueError("start_batch counts batches of this sampler's own layout; continue an epoch of "
                             f"{order} with resume_epoch")
        else:
            self._deal_epoch(epoch, order, 0)

    def resume_epoch(self, epoch: int, origin: EpochLayout, *, rows_done: Optional[int] = None,
                     batches_done: int = 0) -> int:
        """Continue `epoch`, begun under the layout `origin`, after `rows_done` of its rows along its step order
        (None: after `batches_done` batches per rank of `origin`). Returns the index of the first batch this
        rank yields, counted as `micro_batches` counts them: a multiple of accum_steps."""
        if rows_done is None:
            rows_done = _rows_done_natively(self.num_rows, origin, self.drop_last, batches_done)
        step_rows = self.world_size * self.batch_size
        if self._own_steps(origin) and (rows_done % step_rows == 0
                                        or rows_done == self.world_size * self.samples_per_rank):
            start = min(math.ceil(rows_done / step_rows), self.batches_per_epoch)
            self._native(epoch, start, origin.order_workers)
        else:
            self._deal_epoch(epoch, origin, rows_done)
        return self.start_batch

    def _own_steps(self, layout: EpochLayout) -> bool:
        return (layout.world_size, layout.batch_size, layout.accum_steps) == (
            self.world_size, self.batch_size, self.accum_steps)

    def _native(self, epoch: int, start_batch: int, order_workers: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}")
        self.epoch, self.start_batch, self.order_workers = epoch, start_batch, order_workers
        self.epoch_layout = self._layout(order_workers)
        self._dealt = None

    def _deal_epoch(self, epoch: int, origin: EpochLayout, rows_done: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        order = self.rows_in_step_order(epoch, origin)
        if not 0 <= rows_done <= len(order):
            raise ValueError(f"rows_done must be in [0, {len(order)}], got {rows_done}")
        self.start_batch = rows_done // self._layout(self.num_workers).global_batch * self.accum_steps
        self.epoch, self.epoch_layout = epoch, origin
        self._rows_before, self._rows_left = rows_done, len(order) - rows_done
        self._dealt = self._deal(order[rows_done:])

    def rows_in_step_order(self, epoch: int, layout: EpochLayout) -> np.ndarray:
        """The rows of `epoch` as `layout` deals them: step by step, rank by rank, batch by batch."""
        batches = []
        for rank in range(layout.world_size):
            sampler = TrainBatchSampler(
                self.num_rows, batch_size=layout.batch_size, rank=rank, world_size=layout.world_size, seed=self.seed,
                shuffle=self.shuffle, block_rows=self.block_rows, shuffle_window=self.shuffle_window,
                drop_last=self.drop_last, num_workers=layout.order_workers, accum_steps=layout.accum_steps)
            sampler.set_epoch(epoch)
            batches.append(list(sampler))
        k = layout.accum_steps
        return np.concatenate([rows for first in range(0, len(batches[0]), k)
                               for rank_batches in batches for rows in rank_batches[first:first + k]])

    def _deal(self, rows: np.ndarray) -> list[np.ndarray]:
        """This rank's batches of `rows` (in step order) cut into this layout's global batches."""
        size, k, rank = self.batch_size, self.accum_steps, self.rank
        per_rank, full = size * k, len(rows) // (self.world_size * size * k)
        mine = [np.sort(rows[(step * self.world_size + rank) * per_rank:][:per_rank][b * size:(b + 1) * size])
                for step in range(full) for b in range(k)]
        tail = rows[full * self.world_size * per_rank:]
        if len(tail):
            k = self._tail_batches(len(tail))
            tail = np.resize(tail, max(len(tail), self.world_size))
            mine += [np.sort(part) for part in np.array_split(tail, self.world_size * k)[rank * k:(rank + 1) * k]]
        return mine

    def _tail_batches(self, rows: int) -> int:
        """Batches per rank for a short last step of `rows` rows: as many as the rows fill, each rank alike (DDP
        steps in lockstep), never empty."""
        return min(self.accum_steps, math.ceil(rows / (self.world_size * self.batch_size)),
                   max(1, rows // self.world_size))

    @property
    def micro_batches_per_epoch(self) -> int:
        """Batches every rank takes in a whole epoch dealt by `order_layout`: what the schedule counts."""
        order = self.order_layout
        if self._own_steps(order):
            return self.batches_per_epoch
        rows = order.world_size * _samples_per_rank(self.num_rows, order.world_size, order.batch_size,
                                                    self.drop_last)
        full, tail = divmod(rows, self._layout(self.num_workers).global_batch)
        return full * self.accum_steps + (self._tail_batches(tail) if tail else 0)

    def rows_done(self, batches_done: int) -> int:
        """The epoch's rows done, along its step order, once every rank has done `batches_done` batches (counted
        from the epoch's start, as `micro_batches` counts them) and the step they end."""
        if self._dealt is None:
            return _rows_done_natively(self.num_rows, self.epoch_layout, self.drop_last, batches_done)
        steps = math.ceil((batches_done - self.start_batch) / self.accum_steps)
        return self._rows_before + min(steps * self.world_size * self.batch_size * self.accum_steps, self._rows_left)

    def __len__(self) -> int:
        """Batches of this epoch on every rank, including any skipped by `set_epoch(..., start_batch)` or
        `resume_epoch`."""
        if self._dealt is not None:
            return self.start_batch + len(self._dealt)
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._dealt is not None:
            yield from self._dealt
            return
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
