"""The bookkeeping of a training step, kept out of the loop so the loop shows only what PyTorch does:
accumulation windows over an epoch's micro-batches, the one agreement between ranks per optimizer step, and
the loss sums that stay on the device until a log line or the epoch end reads them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import distributed
from .distributed import Runtime


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of an epoch and the accumulation window it belongs to."""

    index: int  # position in the epoch, counted from the epoch's start even after a mid-epoch resume
    window_start: int  # index of the window's first micro-batch
    window_len: int  # micro-batches in the window: accum_steps, or fewer for the epoch's last window
    batch: Any

    @property
    def first_in_window(self) -> bool:
        return self.index == self.window_start

    @property
    def last_in_window(self) -> bool:
        """The optimizer steps after this one: its backward must all-reduce the gradients."""
        return self.index == self.window_start + self.window_len - 1


def micro_batches(batches: Iterable, *, start: int, per_epoch: int, accum: int) -> Iterator[MicroBatch]:
    """`batches` (an epoch's, resumed after `start` micro-batches) cut into windows of `accum`. The last window
    of an epoch may be shorter; its loss is divided by its real length, so every optimizer step averages over
    the samples it saw."""
    for index, batch in enumerate(batches, start):
        window_start = index - index % accum
        yield MicroBatch(index, window_start, min(accum, per_epoch - window_start), batch)


def agree(window_loss: torch.Tensor, stop_signal: int, rt: Runtime) -> tuple[Optional[int], int]:
    """What every rank must decide alike after a window: (a rank whose window loss is NaN/Inf, the highest
    such rank, or None; the stop signal some rank received, or 0). One host read; with several ranks, one
    small all-reduce."""
    if rt.world_size == 1:  # nothing to agree on: skip the tensor ops, a visible cost on tiny models
        return (None if math.isfinite(window_loss.item()) else 0), stop_signal
    flags = torch.stack([(~torch.isfinite(window_loss)).float() * (rt.rank + 1),
                         torch.tensor(float(stop_signal), device=window_loss.device)])
    bad_rank_plus_one, signal = (int(f) for f in distributed.all_reduce_max(flags, rt).tolist())
    return (bad_rank_plus_one - 1 if bad_rank_plus_one else None), signal


class LossMeter:
    """Training-loss sums on the device, so no step waits for the GPU: the current window's, and those of the
    log interval and of the epoch, which only windows that made an optimizer step enter."""

    def __init__(self, device: torch.device):
        self.window, self._interval, self._epoch = (torch.zeros((), device=device) for _ in range(3))
        self._interval_micro = self._epoch_micro = 0

    def add(self, loss: torch.Tensor) -> None:
        self.window += loss.detach().float()

    def commit(self, micro_batches: int) -> None:
        """The window made an optimizer step: count its loss."""
        self._interval += self.window
        self._epoch += self.window
        self._interval_micro += micro_batches
        self._epoch_micro += micro_batches
        self.window.zero_()

    def discard(self) -> None:
        """The window's step was skipped (a non-finite loss): forget its loss."""
        self.window.zero_()

    def interval_mean(self) -> float:
        """This rank's mean micro-batch loss since the last call (a host read); NaN when every step since then was
        skipped (a 0 would read as a perfect fit)."""
        mean = self._interval.item() / self._interval_micro if self._interval_micro else float("nan")
        self._interval.zero_()
        self._interval_micro = 0
        return mean

    def epoch_mean(self, rt: Runtime) -> float:
        """The mean micro-batch loss of the epoch over all ranks (an all-reduce and a host read)."""
        totals = torch.stack([self._epoch, torch.tensor(float(self._epoch_micro), device=self._epoch.device)])
        loss_sum, count = distributed.all_reduce_sum(totals, rt).tolist()
        return loss_sum / max(count, 1)
