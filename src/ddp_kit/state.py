"""The training state and the one place that knows the checkpoint layout: what a save writes, what a resume
reads back, and when a checkpoint does not fit the run that wants to resume from it.

    state = TrainingState(model, optimizer, scheduler, scaler, swa)     # bound once
    position = state.resume(path, cfg, rt)                              # restores everything, says where
    state.save(manager, cfg, rt, position, tag="periodic")              # every rank calls it

Layout (docs/checkpoints.md): model, optimizer, scheduler, scaler, swa_model, swa_n_averaged, swa_scheduler,
skipped_steps, epoch, step, batches_in_epoch, rng (one entry per rank), config, world_size, versions,
metrics. Checkpoints of ddp_kit 0.1.0, which also held batch_size and accum_steps at the top level (copies of
the config's) and no skipped_steps, resume as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import __version__, distributed
from .averaging import SWA
from .checkpoint import CheckpointError, CheckpointManager, capture_rng_state, load_checkpoint
from .config import Config, to_dict
from .distributed import Runtime
from .weights import load_weights, model_state_dict


class ResumeError(RuntimeError):
    """The checkpoint to resume from does not fit this run's configuration."""


@dataclass(frozen=True)
class Position:
    """Where a run stands: epochs done (the epoch it is in), optimizer steps done, micro-batches of the epoch
    done. `order_workers` is the loader worker count the current epoch's batch order was made for."""

    epoch: int = 0
    step: int = 0
    batches_in_epoch: int = 0
    order_workers: Optional[int] = None


@dataclass
class TrainingState:
    model: nn.Module  # the bare model (no DDP or compile wrapper)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    swa: Optional[SWA] = None
    skipped: dict = field(default_factory=lambda: {"nonfinite": 0, "scaler": 0})  # steps skipped, whole run

    def state_dict(self) -> dict:
        swa = self.swa.state_dict() if self.swa is not None else {
            "swa_model": None, "swa_n_averaged": 0, "swa_scheduler": None}
        return {"model": model_state_dict(self.model), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                **swa, "skipped_steps": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        load_weights(self.model, state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.swa is not None:
            self.swa.load_state_dict(state)
        self.skipped.update(state.get("skipped_steps", {}))

    def save(self, manager: CheckpointManager, cfg: Config, rt: Runtime, position: Position, *, tag: str,
             metrics: Optional[dict] = None) -> None:
        """All ranks call this together (their RNG states are gathered); rank 0 writes; every rank waits until
        the file is complete and learns whether it failed, so none runs ahead of a checkpoint that may yet fail."""
        rng = distributed.all_gather_objects(capture_rng_state(), rt)

        def write() -> None:
            checkpoint = {**self.state_dict(), "epoch": position.epoch, "step": position.step,
                          "batches_in_epoch": position.batches_in_epoch, "rng": rng, "config": to_dict(cfg),
                          "world_size": rt.world_size,
                          "versions": {"torch": str(torch.__version__), "ddp_kit": __version__}, "metrics": metrics}
            manager.save(checkpoint, step=position.step, epoch=position.epoch, metrics=metrics, tag=tag)

        manager.write_on_rank0(write, rt)

    def resume(self, path: Path, cfg: Config, rt: Runtime) -> tuple[Position, dict]:
        """Restore everything from the checkpoint at `path`, after checking that it fits this run; returns where
        the run stands and this rank's RNG states, to restore once nothing else will draw random numbers."""
        checkpoint = load_checkpoint(path)
        check_resumable(checkpoint, cfg, rt, path)
        self.load_state_dict(checkpoint)
        position = Position(checkpoint["epoch"], checkpoint["step"], checkpoint["batches_in_epoch"],
                            checkpoint["config"]["data"]["num_workers"])
        return position, checkpoint["rng"][rt.rank]


# What decides an epoch's sample order besides world size and batch size (data.num_workers too, but a resumed
# epoch is finished in its checkpoint's order whatever data.num_workers is now).
SAMPLE_ORDER_SETTINGS = (("run", "seed"), ("data", "shuffle"), ("data", "shuffle_window"), ("data", "block_size"),
                         ("data", "drop_last"))


def check_resumable(checkpoint: dict, cfg: Config, rt: Runtime, path: Path) -> None:
    """Refuse a checkpoint that cannot continue this run exactly, saying which settings differ and what to do."""
    saved_config, current_config = checkpoint["config"], to_dict(cfg)
    saved = {"world_size": checkpoint["world_size"], "train.batch_size": saved_config["train"]["batch_size"],
             "train.accum_steps": saved_config["train"]["accum_steps"]}
    current = {"world_size": rt.world_size, "train.batch_size": cfg.train.batch_size,
               "train.accum_steps": cfg.train.accum_steps}
    if differ := _differences(saved, current):
        raise ResumeError(
            f"cannot resume exactly from {path}: {differ}. The sample order and the optimizer-step count both "
            f"depend on these. Resume with the same values, or start a new run (another run.name or "
            f"train.resume=never) and load only the weights (`ddp-kit export` then ddp_kit.load_weights)")
    if checkpoint["batches_in_epoch"]:
        saved, current = ({f"{section}.{key}": config[section][key] for section, key in SAMPLE_ORDER_SETTINGS}
                          for config in (saved_config, current_config))
        if differ := _differences(saved, current):
            raise ResumeError(
                f"cannot resume {path} in the middle of epoch {checkpoint['epoch']} (after "
                f"{checkpoint['batches_in_epoch']} batches): {differ}. The epoch's sample order depends on these, so "
                f"the rest of it would repeat some samples and skip others. Resume with the checkpoint's values; "
                f"change them from a checkpoint saved at an epoch end (checkpoint.every_epochs)")
    if len(checkpoint["rng"]) != rt.world_size:
        raise CheckpointError(f"{path}: holds RNG states of {len(checkpoint['rng'])} ranks, this run has "
                              f"{rt.world_size}")


def _differences(saved: dict, current: dict) -> str:
    """'key: checkpoint A vs now B' for every key whose value changed, comma-separated; empty if none."""
    return ", ".join(f"{key}: checkpoint {saved[key]!r} vs now {current[key]!r}"
                     for key in saved if saved[key] != current[key])
