"""The training state and the one place that knows the checkpoint layout: what a save writes, what a resume
reads back, and when a checkpoint does not fit the run that wants to resume from it.

    checkpoint = load_resumable(path, cfg, rt)                          # read and checked to fit this run
    position = resume_position(checkpoint, cfg, rt)                     # where the run stands, before the
                                                                        # schedule's length is known
    state = TrainingState(model, optimizer, scheduler, scaler, swa)     # bound once
    rng = state.resume(checkpoint, rt)                                  # restores everything
    state.save(manager, cfg, rt, position, tag="periodic")              # every rank calls it

Layout (docs/checkpoints.md): model, optimizer, scheduler, scaler, swa_model, swa_n_averaged, swa_scheduler,
skipped_steps, epoch, step, batches_in_epoch, epoch_layout, rows_in_epoch, step_order, rng (one entry per
rank), config, world_size, versions, metrics. Checkpoints of ddp_kit 0.1.0, which also held batch_size and
accum_steps at the top level (copies of the config's) and none of skipped_steps, epoch_layout, rows_in_epoch
and step_order, resume as well.

A checkpoint resumes on another world size, batch size or accum_steps when their product, the global batch, is
the same (or with train.allow_global_batch_change): the interrupted epoch finishes with the rows it had left,
step by step in the order it was begun in, later epochs keep the step order of the layout the run began with
while the global batch is kept (data/sampler.py), and every rank's RNG is seeded afresh.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import __version__, distributed
from .averaging import SWA
from .checkpoint import CheckpointError, CheckpointManager, capture_rng_state, load_checkpoint
from .config import Config, to_dict
from .data.sampler import EpochLayout
from .distributed import Runtime
from .weights import load_weights, model_state_dict


class ResumeError(RuntimeError):
    """The checkpoint to resume from does not fit this run's configuration."""


@dataclass(frozen=True)
class Position:
    """Where a run stands: epochs done (the epoch it is in), optimizer steps done, and in a mid-epoch position
    the micro-batches of the epoch done per rank, the layout the epoch was begun under, and the rows done along
    that layout's step order (None: count them from `batches_in_epoch` of that layout). `step_order`: the
    layout the run began with, which deals every epoch while the global batch stays the same."""

    epoch: int = 0
    step: int = 0
    batches_in_epoch: int = 0
    epoch_layout: Optional[EpochLayout] = None
    rows_in_epoch: Optional[int] = None
    step_order: Optional[EpochLayout] = None  # the layout whose step order every epoch follows (None: this run's)


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
                          "batches_in_epoch": position.batches_in_epoch, "rows_in_epoch": position.rows_in_epoch,
                          "epoch_layout": asdict(position.epoch_layout) if position.epoch_layout else None,
                          "step_order": asdict(position.step_order) if position.step_order else None,
                          "rng": rng, "config": to_dict(cfg),
                          "world_size": rt.world_size,
                          "versions": {"torch": str(torch.__version__), "ddp_kit": __version__}, "metrics": metrics}
            manager.save(checkpoint, step=position.step, epoch=position.epoch, metrics=metrics, tag=tag)

        manager.write_on_rank0(write, rt)

    def resume(self, checkpoint: dict, rt: Runtime) -> Optional[dict]:
        """Restore everything from `checkpoint` (from `load_resumable`); returns this rank's RNG states, to
        restore once nothing else will draw random numbers, or None when the world size changed (no rank's
        streams are this rank's)."""
        self.load_state_dict(checkpoint)
        return checkpoint["rng"][rt.rank] if checkpoint["world_size"] == rt.world_size else None


def load_resumable(path: Path, cfg: Config, rt: Runtime) -> dict:
    """The checkpoint at `path`, checked to fit this run (`check_resumable`)."""
    checkpoint = load_checkpoint(path)
    check_resumable(checkpoint, cfg, rt, path)
    return checkpoint


def resume_position(checkpoint: dict, cfg: Config, rt: Runtime) -> Position:
    """Where the run that wrote `checkpoint` stood, and the layout whose step order its epochs follow (None when
    this run's global batch is another: train.allow_global_batch_change)."""
    order = EpochLayout(**checkpoint["step_order"]) if checkpoint.get("step_order") else saved_layout(checkpoint)
    if order.global_batch != run_layout(cfg, rt).global_batch:
        order = None
    if not checkpoint["batches_in_epoch"]:
        return Position(checkpoint["epoch"], checkpoint["step"], step_order=order)
    layout = checkpoint.get("epoch_layout")
    return Position(checkpoint["epoch"], checkpoint["step"], checkpoint["batches_in_epoch"],
                    EpochLayout(**layout) if layout else saved_layout(checkpoint), checkpoint.get("rows_in_epoch"),
                    order)


def run_layout(cfg: Config, rt: Runtime) -> EpochLayout:
    """The layout of this run."""
    return EpochLayout(rt.world_size, cfg.train.batch_size, cfg.train.accum_steps, cfg.data.num_workers)


def saved_layout(checkpoint: dict) -> EpochLayout:
    """The layout of the run that wrote `checkpoint`."""
    train = checkpoint["config"]["train"]
    return EpochLayout(checkpoint["world_size"], train["batch_size"], train["accum_steps"],
                       checkpoint["config"]["data"]["num_workers"])


# What decides an epoch's sample order besides world size and batch size (data.num_workers too, but a resumed
# epoch is finished in its checkpoint's order whatever data.num_workers is now).
SAMPLE_ORDER_SETTINGS = (("run", "seed"), ("data", "shuffle"), ("data", "shuffle_window"), ("data", "block_size"),
                         ("data", "drop_last"))


def check_resumable(checkpoint: dict, cfg: Config, rt: Runtime, path: Path) -> None:
    """Refuse a checkpoint that cannot continue this run, saying which settings differ and what to do."""
    saved_config, current_config = checkpoint["config"], to_dict(cfg)
    saved = saved_layout(checkpoint)
    now = run_layout(cfg, rt)
    if saved.global_batch != now.global_batch and not cfg.train.allow_global_batch_change:
        raise ResumeError(
            f"cannot resume {path} with another global batch: the checkpoint's run took {_global_batch(saved)} "
            f"samples per optimizer step, this one would take {_global_batch(now)}. "
            f"{_keeping(saved.global_batch, rt.world_size, cfg.train)}, or set "
            f"train.allow_global_batch_change=true to go on with {now.global_batch} (the rest of the interrupted "
            f"epoch is then taken in batches of {now.global_batch}: no sample dropped or repeated, but the "
            f"learning rate schedule's steps stand for other amounts of data)")
    if checkpoint["batches_in_epoch"]:
        saved, current = ({f"{section}.{key}": config[section][key] for section, key in SAMPLE_ORDER_SETTINGS}
                          for config in (saved_config, current_config))
        if differ := _differences(saved, current):
            raise ResumeError(
                f"cannot resume {path} in the middle of epoch {checkpoint['epoch']} (after "
                f"{checkpoint['batches_in_epoch']} batches): {differ}. The epoch's sample order depends on these, so "
                f"the rest of it would repeat some samples and skip others. Resume with the checkpoint's values; "
                f"change them from a checkpoint saved at an epoch end (checkpoint.every_epochs)")
    if len(checkpoint["rng"]) != checkpoint["world_size"]:
        raise CheckpointError(f"{path}: holds RNG states of {len(checkpoint['rng'])} ranks but was written by "
                              f"{checkpoint['world_size']}; the file is inconsistent, resume from another one")


def _global_batch(layout: EpochLayout) -> str:
    return (f"{layout.world_size} process(es) x train.batch_size {layout.batch_size} x train.accum_steps "
            f"{layout.accum_steps} = {layout.global_batch}")


def overrides_keeping(global_batch: int, world_size: int, train) -> list[list[str]]:
    """The overrides that keep `global_batch` on `world_size` processes, the most alike first: another
    train.accum_steps (each micro-batch as before), another train.batch_size, else both (at most two of those);
    empty when `world_size` does not divide the global batch."""
    options = []
    if global_batch % (world_size * train.batch_size) == 0:
        options.append([f"train.accum_steps={global_batch // (world_size * train.batch_size)}"])
    if global_batch % (world_size * train.accum_steps) == 0:
        options.append([f"train.batch_size={global_batch // (world_size * train.accum_steps)}"])
    if not options:
        options = [[f"train.batch_size={global_batch // (world_size * k)}", f"train.accum_steps={k}"]
                   for k in range(1, global_batch // world_size + 1) if global_batch % (world_size * k) == 0][:2]
    return options


def _keeping(global_batch: int, world_size: int, train) -> str:
    options = overrides_keeping(global_batch, world_size, train)
    if not options:
        return (f"No batch_size x accum_steps on {world_size} process(es) makes {global_batch}: resume on a number "
                f"of processes that divides it")
    why = (" (accum_steps, not batch_size: each micro-batch's BatchNorm statistics then stay alike)"
           if options[0][0].startswith("train.accum_steps") and len(options) > 1 else "")
    return f"On {world_size} process(es) {' or '.join(' '.join(o) for o in options)} keeps {global_batch}{why}"


def _differences(saved: dict, current: dict) -> str:
    """'key: checkpoint A vs now B' for every key whose value changed, comma-separated; empty if none."""
    return ", ".join(f"{key}: checkpoint {saved[key]!r} vs now {current[key]!r}"
                     for key in saved if saved[key] != current[key])
