"""Weight averaging: Stochastic Weight Averaging with `torch.optim.swa_utils`, and the exact BatchNorm statistics
an averaged model needs before it is evaluated.

The training loop asks `SWA.begin_epoch(epoch)` whether an epoch is averaged (its learning rate then follows
SWALR instead of the run's schedule) and calls `SWA.end_epoch(model)` after it; the rest lives here.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel

from . import distributed
from .config import SwaConfig, swa_start_epoch
from .distributed import Runtime
from .weights import load_weights, model_state_dict


class SWA:
    """The averaged copy of `model` and, once averaging has begun, its SWALR learning-rate schedule."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: SwaConfig, epochs: int):
        self.model = AveragedModel(model)
        self.start_epoch = swa_start_epoch(cfg, epochs)
        self._optimizer = optimizer
        self._cfg = cfg
        self.scheduler: Optional[SWALR] = None

    def _new_scheduler(self) -> SWALR:
        return SWALR(self._optimizer, swa_lr=self._cfg.lr, anneal_epochs=self._cfg.anneal_epochs,
                     anneal_strategy=self._cfg.anneal_strategy)

    def begin_epoch(self, epoch: int) -> bool:
        """Whether `epoch` is averaged; the first averaged epoch starts SWALR from the current learning rate."""
        averaged = epoch >= self.start_epoch
        if averaged and self.scheduler is None:
            self.scheduler = self._new_scheduler()
        return averaged

    def end_epoch(self, model: nn.Module) -> None:
        self.model.update_parameters(model)
        self.scheduler.step()

    def state_dict(self) -> dict:
        return {"swa_model": model_state_dict(self.model), "swa_n_averaged": int(self.model.n_averaged),
                "swa_scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """From a checkpoint's entries (None where the checkpoint was written before averaging started)."""
        if state.get("swa_model") is not None:
            load_weights(self.model, state["swa_model"], strict=True)
            self.model.n_averaged.fill_(state["swa_n_averaged"])
        if state.get("swa_scheduler") is not None:
            self.scheduler = self._new_scheduler()
            self.scheduler.load_state_dict(state["swa_scheduler"])


class _ReachedTarget(Exception):
    """Raised by the hook on the BatchNorm being measured: nothing after it in the forward is needed."""


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, inputs: Callable[[], Iterable[tuple]], rt: Runtime,
                            autocast: Callable = contextlib.nullcontext) -> None:
    """Set every BatchNorm's running mean/var to the exact statistics of its input over all batches of
    `inputs()` (an iterable of the model's positional inputs, on the device; all ranks' shards combined) as
    inference will see it: with every BatchNorm before it already using its own recomputed statistics (eval
    mode), not the statistics of each batch. `autocast()` is entered around each forward, as in evaluation.

    One pass over the data per BatchNorm, in the order the forward reaches them, each pass stopping at its
    BatchNorm. Inputs are summed per channel in float64 across batches and ranks, so the result depends
    neither on batch sizes nor on how the data is sharded (unlike `torch.optim.swa_utils.update_bn`, which
    runs every BatchNorm in training mode and averages per-batch moments on one process).
    A BatchNorm module called several times in one forward is measured at its first call."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was_training = model.training
    model.eval()  # every BatchNorm normalizes with running statistics: the finished ones' are the exact ones
    try:
        for index in _forward_order(model, norms, inputs, rt, autocast):
            bn = norms[index]
            moments = torch.zeros(3, bn.num_features, dtype=torch.float64, device=rt.device)

            def accumulate(module, args):
                x = args[0].double()
                dims = [d for d in range(x.dim()) if d != 1]
                moments[0] += x.sum(dims)
                moments[1] += (x * x).sum(dims)
                moments[2] += x.numel() // x.shape[1]
                raise _ReachedTarget

            hook = bn.register_forward_pre_hook(accumulate)
            try:
                for args in inputs():
                    with autocast(), contextlib.suppress(_ReachedTarget):  # the forward stops at `bn`
                        model(*args)
            finally:
                hook.remove()
            s1, s2, n = distributed.all_reduce_sum(moments, rt)
            mean = s1 / n
            var = (s2 / n - mean * mean).clamp_min(0) * n / (n - 1).clamp_min(1)  # running_var is unbiased
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    finally:
        model.train(was_training)


def _forward_order(model: nn.Module, norms: list[nn.Module], inputs: Callable[[], Iterable[tuple]], rt: Runtime,
                   autocast: Callable) -> list[int]:
    """Indices into `norms` in the order one forward first reaches them (from the first batch of the first rank
    that has one, so every rank measures them in the same order); BatchNorms the forward never reaches are
    left as they are."""
    reached: list[int] = []
    hooks = [bn.register_forward_pre_hook(lambda module, args, i=i: None if i in reached else reached.append(i))
             for i, bn in enumerate(norms)]
    try:
        for args in inputs():
            with autocast():
                model(*args)
            break
    finally:
        for hook in hooks:
            hook.remove()
    return next((order for order in distributed.all_gather_objects(reached, rt) if order), [])
