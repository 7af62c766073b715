"""The training loop. Setup, loop, teardown, read top to bottom; DDP's no_sync, AMP, gradient accumulation,
SWA, the non-finite guard, checkpoints and preemption act where they appear. The bookkeeping they need is in
steps.py (windows, the agreement between ranks, loss sums), the checkpoint layout in state.py.

Host-device synchronization: none per micro-step; per optimizer step one small read, the flags every rank must
agree on (a non-finite loss anywhere, a stop signal anywhere), plus GradScaler's own with fp16 (it reads
whether the gradients overflowed, and the skip count reads the scale); losses stay on the device and are
read at log intervals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import __version__, data, distributed, models
from .amp import autocast_factory
from .averaging import SWA, recompute_bn_statistics
from .checkpoint import CheckpointManager, load_checkpoint, restore_rng_state
from .config import CheckpointConfig, Config, ConfigError, did_you_mean, save_config, step_counts
from .distributed import Runtime
from .logging import RunLogger, Throughput
from .objectives import (Classification, add_sums, all_reduce_sums, batch_counts, best_metric, build_objective,
                         check_objective, checked_loss)
from .optim import build_optimizer, build_scheduler
from .plugins import is_import_path
from .preemption import StopSignals, clear_requeue_marker, write_requeue_marker
from .state import Position, TrainingState, load_resumable, resume_position
from .steps import LossMeter, agree, micro_batches
from .weights import export_weights, load_weights


# A model as train() takes it: a module, a function or class building one, or None for cfg.model.
ModelSource = Union[nn.Module, Callable[[], nn.Module], None]


class NonFiniteLossError(RuntimeError):
    """A NaN/Inf loss with train.on_nonfinite=stop; the last good state was checkpointed first."""


def train(cfg: Config, *, model: ModelSource = None, objective: Any = None,
          datasets: Optional[tuple] = None) -> dict:
    """Run the configured training on this process (one of torchrun's workers, an srun task, or alone).

    `model`: an nn.Module, or a factory called once per rank after seeding (identical initial weights
    everywhere); None builds cfg.model. `objective`: the task's loss and metrics (ddp_kit.objectives); None
    builds cfg.objective. `datasets`: a user's (train, val) map-style datasets in place of cfg.data's HDF5 file.
    The model is called with the batch's fields that cfg.model.inputs names, in that order.

    Returns the last epoch's metrics, with "status": "completed" | "preempted" | "max_steps"."""
    # ------------------------------------------------------------------ setup
    build_net, objective, builtin_model = _prepare(cfg, model, objective)
    stop = StopSignals(cfg.preemption.signals, deadline_s=cfg.preemption.term_deadline_s)
    with contextlib.ExitStack() as teardown:
        teardown.callback(stop.restore)
        rt = teardown.enter_context(distributed.process_group(cfg.distributed))
        device = rt.device
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark and not cfg.train.deterministic
        if cfg.train.deterministic:
            # cuBLAS reads this when its first handle is made (the first matmul, after this); without it torch
            # refuses cuBLAS under deterministic algorithms.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.autograd.set_detect_anomaly(cfg.train.detect_anomaly)

        eval_batch = functools.partial(data.prepare_batch, device=device, cfg=cfg.data, train=False,
                                       channels_last=cfg.model.channels_last)
        autocast, amp_warning = autocast_factory(cfg.amp, device)
        loaders, model, probe = _build(cfg, rt, build_net, objective, eval_batch, autocast, datasets,
                                     builtin_model=builtin_model)
        # Resume: rank 0 picks the checkpoint, every rank loads the same file. A run resumed on another world
        # size keeps the step order it began with, and so its steps per epoch, before the schedule is built.
        manager = CheckpointManager(cfg.run_dir / "checkpoints",
                                    best_checkpoint_config(cfg.checkpoint, objective, probe.metrics,
                                                           swa=cfg.swa.enabled))
        resume_path = distributed.broadcast_object(_resume_path(cfg, manager) if rt.is_main else None, rt)
        checkpoint = load_resumable(resume_path, cfg, rt) if resume_path else None
        position = resume_position(checkpoint, cfg, rt) if checkpoint is not None else Position()
        step = position.step
        if position.step_order is not None:
            loaders.train_sampler.order_layout = position.step_order

        steps = step_counts(cfg.train, loaders.train_sampler.micro_batches_per_epoch)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.schedule, cfg.optim.lr, steps.per_epoch, steps.total)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        scaler = torch.amp.GradScaler(device.type, init_scale=cfg.amp.init_scale,
                                      enabled=cfg.amp.enabled and cfg.amp.dtype == "fp16")
        swa = SWA(model, optimizer, cfg.swa, cfg.train.epochs) if cfg.swa.enabled else None
        state = TrainingState(model, optimizer, scheduler, scaler, swa)
        resumed_rng = state.resume(checkpoint, rt) if checkpoint is not None else None
        del checkpoint  # a full copy of the weights and optimizer state
        validate = functools.partial(evaluate, loader=loaders.val, rt=rt, eval_batch=eval_batch, autocast=autocast,
                                     objective=objective, inputs=cfg.model.inputs, no_batches=probe.no_batches)

        train_model: nn.Module = model
        ddp = None
        if rt.world_size > 1:
            ddp = train_model = DDP(
                model, device_ids=[device] if device.type == "cuda" else None,
                bucket_cap_mb=cfg.distributed.bucket_cap_mb,
                find_unused_parameters=cfg.distributed.find_unused_parameters,
                static_graph=cfg.distributed.static_graph, gradient_as_bucket_view=True)
        if cfg.compile.enabled:
            # Compile the DDP wrapper, not the bare model: DDP's graph splitter then cuts the graph at bucket
            # boundaries, so gradient all-reduce overlaps the backward.
            train_model = torch.compile(train_model, mode=cfg.compile.mode, backend=cfg.compile.backend)
        settle_seconds = None
        if ddp is not None and (cfg.distributed.static_graph or not cfg.distributed.find_unused_parameters):
            settle_seconds = _settle_gradient_buckets(train_model, model, probe.batch, objective, cfg.model.inputs,
                                                      autocast, eval_batch, static_graph=cfg.distributed.static_graph)

        opened = manager.write_on_rank0(functools.partial(_open_run_dir, cfg, steps.total, step), rt)
        logger = opened if rt.is_main else RunLogger(cfg.run_dir, enabled=False, total_steps=steps.total)
        teardown.callback(logger.close)
        logger.info(f"ddp_kit {__version__}: {rt.world_size} process(es) ({rt.env.launcher}), device {device}, "
                    f"backend {rt.backend or 'none'}, {rt.cpu_threads}; {loaders.train_size} train / "
                    f"{loaders.val_size} val samples, {steps.micro_per_epoch} micro-batches = {steps.per_epoch} "
                    f"optimizer steps per epoch per rank"
                    + (f"; resumed from {resume_path} at epoch {position.epoch}, step {step}" if resume_path else "")
                    + (f" ({position.rows_in_epoch} of the epoch's rows done, by {position.epoch_layout})"
                       if position.epoch_layout and position.rows_in_epoch is not None else ""))
        if amp_warning:
            logger.info(amp_warning)
        if swa is not None and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            logger.info("SWA: the model has no BatchNorm, so the average has no statistics to recompute")
        if settle_seconds is not None:
            logger.info(f"DDP gradient buckets settled by one discarded forward/backward in {settle_seconds:.3f} s"
                        + (" (torch.compile's compilation included)" if cfg.compile.enabled else ""))
        ledger = _open_ledger(cfg.run_dir, rt) if cfg.train.record_sample_ids else None
        if ledger is not None:
            teardown.callback(ledger.close)

        # Restored last: everything above may have drawn random numbers. A run resumed on another world size
        # has no streams of its own to restore; seeded from the step, it does not replay the run's first ones.
        if resumed_rng is not None:
            restore_rng_state(resumed_rng)
        else:
            distributed.seed_everything(distributed.rank_seed(cfg.run.seed + step, rt.rank))

        status, record = "completed", {}
        compile_pending = cfg.compile.enabled and settle_seconds is None
        grad_norm = torch.zeros((), device=device)
        # A non-finite forward has already written NaN/Inf into BatchNorm's running statistics by the time the
        # ranks agree on it: a skipped step restores them from this copy, and `stop` saves the good ones.
        buffers = list(model.buffers())
        buffers_before_window = [b.detach().clone() for b in buffers]

        # ------------------------------------------------------------------ loop
        for epoch in range(position.epoch, cfg.train.epochs):
            # A run resumed mid-epoch finishes that epoch with the rows it had left, in the order it was begun in.
            start = 0
            if epoch == position.epoch and position.epoch_layout is not None:
                start = loaders.train_sampler.resume_epoch(epoch, position.epoch_layout,
                                                           rows_done=position.rows_in_epoch,
                                                           batches_done=position.batches_in_epoch)
            else:
                loaders.train_sampler.set_epoch(epoch)
            model.train()
            averaging = swa is not None and swa.begin_epoch(epoch)  # then SWALR drives the learning rate
            losses, throughput, epoch_start = LossMeter(device), Throughput(), time.perf_counter()
            epoch_counts: Counter = Counter()

            for micro in micro_batches(loaders.train, start=start, per_epoch=len(loaders.train_sampler),
                                       accum=cfg.train.accum_steps):
                batch, rows = data.prepare_batch(micro.batch, device, cfg.data, train=True,
                                                 channels_last=cfg.model.channels_last,
                                                 batch_transform=loaders.batch_transform,
                                                 augment_seed=data.draw_seed(cfg.run.seed, epoch, micro.index, rt.rank))
                if ledger is not None:
                    ledger.write(json.dumps({"epoch": epoch, "step": step + 1, "micro": micro.index,
                                             "indices": rows.tolist()}) + "\n")
                if buffers and micro.first_in_window:
                    torch._foreach_copy_(buffers_before_window, buffers)
                started = time.perf_counter()
                # The forward too must run under no_sync(): DDP prepares the all-reduce in forward.
                with ddp.no_sync() if ddp is not None and not micro.last_in_window else contextlib.nullcontext():
                    with autocast():
                        loss = checked_loss(objective, train_model(*model_inputs(batch, cfg.model.inputs)), batch)
                    scaler.scale(loss / micro.window_len if micro.window_len > 1 else loss).backward()
                if compile_pending:
                    compile_pending = False
                    logger.info(f"torch.compile: first step (compilation included) took "
                                f"{time.perf_counter() - started:.1f} s")
                losses.add(loss)
                counts = batch_counts(objective, batch)
                epoch_counts.update(counts)
                throughput.add(counts, ranks=rt.world_size)
                if not micro.last_in_window:
                    continue

                # ---- optimizer step, taken or skipped alike on every rank
                bad_rank, stop_signal = agree(losses.window, stop.signal_number, rt)
                log_now = (step + 1) % cfg.train.log_every_steps == 0
                if bad_rank is not None:
                    if buffers:
                        torch._foreach_copy_(buffers, buffers_before_window)
                    optimizer.zero_grad(set_to_none=True)
                    losses.discard()
                    if cfg.train.on_nonfinite == "stop":
                        state.save(manager, cfg, rt, _mid_epoch(epoch, step, micro.window_start, loaders),
                                   tag="nonfinite")
                        raise NonFiniteLossError(
                            f"non-finite loss in optimizer step {step + 1} (epoch {epoch}) on rank {bad_rank}; the "
                            f"last good state is checkpointed in {manager.directory}. Lower optim.lr, enable "
                            f"optim.grad_clip_norm, or use train.detect_anomaly=true to find the operation")
                    state.skipped["nonfinite"] += 1
                else:
                    if cfg.optim.grad_clip_norm is not None or log_now:
                        scaler.unscale_(optimizer)  # clip and report the true gradient norm, not the scaled one
                        grad_norm = _clip_or_measure(model, cfg.optim.grad_clip_norm)
                    if scaler.is_enabled():
                        scale_before = scaler.get_scale()
                        scaler.step(optimizer)
                        scaler.update()
                        state.skipped["scaler"] += int(scaler.get_scale() < scale_before)
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.commit(micro.window_len)
                if not averaging:
                    scheduler.step()
                step += 1

                if log_now:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # time finished kernels, not launches
                    logger.step(step, epoch, {"loss": losses.interval_mean(), "lr": optimizer.param_groups[0]["lr"],
                                              **throughput.rates_and_reset(), "grad_norm": float(grad_norm)})
                reached_max = cfg.train.max_steps is not None and step >= cfg.train.max_steps
                if stop_signal or reached_max or manager.should_save(step=step, epoch_end=False, epoch=epoch):
                    state.save(manager, cfg, rt, _mid_epoch(epoch, step, micro.index + 1, loaders),
                               tag="preempt" if stop_signal else "periodic")
                if stop_signal:
                    name = signal.Signals(stop_signal).name
                    manager.write_on_rank0(functools.partial(write_requeue_marker, cfg.run_dir,
                                                             cfg.preemption.requeue_marker, step=step,
                                                             signal_name=name), rt)
                    logger.info(f"stopping at step {step} on {name} (received by at least one rank); checkpoint "
                                f"saved, marker {cfg.preemption.requeue_marker} written")
                    status = "preempted"
                    break
                if reached_max:
                    logger.info(f"reached train.max_steps={cfg.train.max_steps}; checkpoint saved")
                    status = "max_steps"
                    break
            if status != "completed":
                break

            # ---- epoch end: SWA averaging, validation, checkpoint
            distributed.broadcast_buffers(model, rt)
            if averaging:
                swa.end_epoch(model)
            epoch_time = time.perf_counter() - epoch_start
            record = {"epoch": epoch, "step": step, "train_loss": losses.epoch_mean(rt),
                      **dict.fromkeys(f"val_{name}" for name in probe.metrics), "lr": optimizer.param_groups[0]["lr"],
                      **{f"{unit}_per_s": n * rt.world_size / epoch_time for unit, n in epoch_counts.items()},
                      "epoch_time_s": epoch_time, "skipped_nonfinite_steps": state.skipped["nonfinite"],
                      "skipped_scaler_steps": state.skipped["scaler"]}
            last_epoch = epoch == cfg.train.epochs - 1
            if (epoch + 1) % cfg.train.val_every_epochs == 0 or last_epoch:
                record.update({f"val_{name}": value for name, value in validate(model).items()})
                if averaging:
                    recompute_bn_statistics(swa.model.module, _model_inputs(loaders.train_eval, eval_batch,
                                                                            cfg.model.inputs), rt, autocast)
                    record.update({f"swa_val_{name}": value for name, value in validate(swa.model.module).items()})
            manager.write_on_rank0(functools.partial(logger.epoch, record), rt)
            if manager.should_save(step=step, epoch_end=True, epoch=epoch) or last_epoch:
                state.save(manager, cfg, rt, Position(epoch + 1, step, step_order=loaders.train_sampler.order_layout),
                           metrics=record, tag="final" if last_epoch else "periodic")

        # ------------------------------------------------------------------ teardown
        if status == "completed":
            manager.write_on_rank0(functools.partial(_export_final_weights, manager, cfg.run_dir,
                                                     swa=swa is not None), rt)
        # DDP's reducer holds the process group. Released here, it goes before the group is destroyed; left to
        # this frame, it can outlive train() in a reference cycle (torch's first lazy import of torch._dynamo,
        # in the optimizer's constructor, keeps the calling frames) until the interpreter's last garbage
        # collection at exit, where gloo's threads, finding the interpreter finalizing, abort the process.
        del ddp, train_model
        return {**record, "status": status, "step": step}


def _mid_epoch(epoch: int, step: int, batches_done: int, loaders: data.Loaders) -> Position:
    sampler = loaders.train_sampler
    return Position(epoch, step, batches_done, sampler.epoch_layout, sampler.rows_done(batches_done),
                    sampler.order_layout)


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path, *, swa: bool = False, model: ModelSource = None,
                        objective: Any = None, datasets: Optional[tuple] = None) -> dict:
    """The validation metrics of a checkpoint's weights (val_<metric>, as training logs them), on however many
    processes this was started with; `model`, `objective` and `datasets` as for `train`."""
    build_net, objective, builtin_model = _prepare(cfg, model, objective)
    with distributed.process_group(cfg.distributed) as rt:
        eval_batch = functools.partial(data.prepare_batch, device=rt.device, cfg=cfg.data, train=False,
                                       channels_last=cfg.model.channels_last)
        autocast, _ = autocast_factory(cfg.amp, rt.device)
        loaders, net, probe = _build(cfg, rt, build_net, objective, eval_batch, autocast, datasets,
                                     builtin_model=builtin_model)
        load_weights(net, load_checkpoint(checkpoint), strict=True, key="swa_model" if swa else None)
        if swa:
            recompute_bn_statistics(net, _model_inputs(loaders.train_eval, eval_batch, cfg.model.inputs), rt,
                                    autocast)
        metrics = evaluate(net, loader=loaders.val, rt=rt, eval_batch=eval_batch, autocast=autocast,
                           objective=objective, inputs=cfg.model.inputs, no_batches=probe.no_batches)
        return {**{f"val_{name}": value for name, value in metrics.items()}, "world_size": rt.world_size,
                "rank": rt.rank}


@torch.no_grad()
def evaluate(model: nn.Module, *, loader, rt: Runtime, eval_batch: Callable, autocast: Callable, objective: Any,
             inputs: list[str], no_batches: dict[str, torch.Tensor]) -> dict[str, float]:
    """The objective's metrics over the whole validation set: each rank adds up its disjoint shard's sums
    (float64 or int64), the sums are all-reduced and summarized once, so the figures equal a single process's
    for the same weights. `no_batches` is what a rank with an empty shard adds: zeros of every sum."""
    was_training = model.training
    model.eval()
    totals = None
    for raw in loader:
        batch, _ = eval_batch(raw)
        with autocast():
            output = model(*model_inputs(batch, inputs))
        totals = add_sums(totals, objective.evaluate(output, batch))
    if totals is None:
        totals = {name: zeros.clone() for name, zeros in no_batches.items()}
    metrics = objective.summarize(all_reduce_sums(totals, rt))
    model.train(was_training)
    return metrics


def model_inputs(batch: dict[str, torch.Tensor], names: list[str]) -> tuple[torch.Tensor, ...]:
    """The model's positional inputs: the batch's fields that model.inputs names, in that order."""
    try:
        return tuple(batch[name] for name in names)
    except KeyError as missing:
        raise ConfigError(f"model.inputs={names}: the batch has no field {missing.args[0]!r}; its fields are "
                          f"{sorted(batch)}. Set model.inputs to the fields your model takes (data.fields names "
                          "them)") from None


# ---------------------------------------------------------------------------------------------------------
# Setup and teardown pieces. Each is a plain function of its arguments.


@dataclass
class Probe:
    """What one batch through the bare model and the objective established before training."""
    batch: Any  # the first rows of the training split, as the loaders yield a batch
    metrics: list[str]  # the objective's metric names
    no_batches: dict[str, torch.Tensor]  # zeros of every validation sum: an empty shard's contribution


def _prepare(cfg: Config, model: ModelSource, objective: Any) -> tuple[Callable[[], nn.Module], Any, bool]:
    """What train and evaluate_checkpoint settle before the process group: the data exists and is valid (one
    process builds the demo file while the others wait), the model and objective resolve (a typo fails in
    seconds, not after every rank has started). Returns the model factory, the objective, and whether the model
    is cfg.model's built-in or torchvision one, whose num_classes and in_channels the data is checked against."""
    data.prepare_data(cfg.data)
    builtin_model = model is None and not is_import_path(cfg.model.name)
    return _model_factory(cfg, model), _objective(cfg, objective), builtin_model


def _objective(cfg: Config, objective: Any) -> Any:
    if objective is None:
        return build_objective(cfg.objective.name, cfg.objective.kwargs)
    return check_objective(objective)


def _model_factory(cfg: Config, model: ModelSource) -> Callable[[], nn.Module]:
    """A function building the model: `model` as train() takes it, or cfg.model's (resolved and checked now)."""
    if model is None:
        return models.model_factory(cfg.model)
    if isinstance(model, nn.Module):
        return lambda: model
    if not callable(model):
        raise TypeError(f"model={model!r}: pass an nn.Module, or a function or class that builds one")
    return model


def _build(cfg: Config, rt: Runtime, build_net: Callable[[], nn.Module], objective: Any, eval_batch: Callable,
           autocast: Callable, datasets: Optional[tuple], *, builtin_model: bool
           ) -> tuple[data.Loaders, nn.Module, Probe]:
    """This rank's loaders and the model on its device, seeded alike on every rank (identical initial weights
    even before DDP broadcasts rank 0's), probed with one batch (which also gives lazy modules their shapes).
    `builtin_model`: cfg.model names a built-in or torchvision model, whose num_classes and in_channels the data
    is checked against."""
    classes = builtin_model and isinstance(objective, Classification)
    loaders = data.build_dataloaders(
        cfg.data, batch_size=cfg.train.batch_size, val_batch_size=cfg.train.val_batch_size, rank=rt.rank,
        world_size=rt.world_size, seed=cfg.run.seed, device=rt.device, accum_steps=cfg.train.accum_steps,
        class_counts={objective.target: cfg.model.num_classes} if classes else None,
        image_channels=cfg.model.in_channels if builtin_model else None, datasets=datasets,
        stats_rows=cfg.swa.bn_rows)
    # Workers fork now, before this process opens the data or starts threads of its own (TensorBoard's writer,
    # DDP's): a fork that lands while another thread holds a lock leaves the child blocked on it for good,
    # which showed as a rank stuck in its first validation, whose workers used to fork mid-run.
    data.start_workers(loaders.train, loaders.val, *([loaders.train_eval] if cfg.swa.enabled else []))
    distributed.seed_everything(cfg.run.seed)
    net = build_net()
    if not isinstance(net, nn.Module):
        raise TypeError(f"the model factory {getattr(build_net, '__qualname__', build_net)!r} returned a "
                        f"{type(net).__name__}, not a torch.nn.Module: it must build and return the module")
    net = net.to(rt.device)
    if cfg.distributed.sync_bn and rt.world_size > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if cfg.model.channels_last:
        net = net.to(memory_format=torch.channels_last)
    probe_dataset = loaders.train_eval.dataset
    probe_batch = probe_dataset[range(min(cfg.train.batch_size, loaders.train_size))]
    if isinstance(probe_dataset, data.H5Dataset):
        probe_dataset.close()  # the loader workers fork from this process: HDF5 must have no file open in it then
    return loaders, net, _probe(net, objective, probe_batch, eval_batch, autocast, cfg.model.inputs)


def _probe(model: nn.Module, objective: Any, raw_batch: Any, eval_batch: Callable, autocast: Callable,
           inputs: list[str]) -> Probe:
    """One batch through the bare model, in eval mode and without gradients (no BatchNorm statistic moves; lazy
    modules get their shapes before DDP and the optimizer see them), and through the objective: a field the
    model needs and the batch lacks, an output the objective cannot read, a loss that is not a scalar, sums
    that cannot add up exactly fail here, before any process waits on another."""
    batch, _ = eval_batch(raw_batch)
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast():
        output = model(*model_inputs(batch, inputs))
        checked_loss(objective, output, batch)
        sums = add_sums(None, objective.evaluate(output, batch))
    model.train(was_training)
    metrics = list(objective.summarize({name: value.clone() for name, value in sums.items()}))
    return Probe(batch=raw_batch, metrics=metrics, no_batches={name: torch.zeros_like(v) for name, v in sums.items()})


def best_checkpoint_config(cfg: CheckpointConfig, objective: Any, metrics: list[str], *, swa: bool) -> CheckpointConfig:
    """checkpoint.best_metric and best_mode with "auto" resolved to the objective's choice, and refused (naming
    the metrics there are) when the objective reports no such metric."""
    if cfg.best_metric is None:
        return cfg
    name, mode = best_metric(objective)
    metric = f"val_{name}" if cfg.best_metric == "auto" else cfg.best_metric
    available = ["train_loss", *(f"val_{m}" for m in metrics), *(f"swa_val_{m}" for m in metrics if swa)]
    if metric not in available:
        raise ConfigError(f"checkpoint.best_metric={cfg.best_metric!r}: {did_you_mean(metric, available)}the "
                          f"objective {type(objective).__name__} reports {', '.join(available)}"
                          + ("" if cfg.best_metric != "auto" else f" (its best = {(name, mode)!r} names none of them)"))
    if cfg.best_mode == "auto":
        if metric == "train_loss":
            mode = "min"
        elif metric.rpartition("val_")[2] != name:
            raise ConfigError(f"checkpoint.best_mode=auto: the objective's own choice is for {name!r}, not "
                              f"{metric!r}; set checkpoint.best_mode to max or min")
    else:
        mode = cfg.best_mode
    return dataclasses.replace(cfg, best_metric=metric, best_mode=mode)


def _settle_gradient_buckets(train_model: nn.Module, model: nn.Module, raw_batch: Any, objective: Any,
                             inputs: list[str], autocast: Callable, eval_batch: Callable, *,
                             static_graph: bool) -> float:
    """One synchronized forward/backward whose gradients are discarded and whose BatchNorm updates are undone,
    run by every process that starts, fresh or resumed; returns its seconds.

    Why: DDP reduces its first iteration with the initial bucket layout (parameters in reverse order) and
    rebuilds the buckets, in the order gradients became ready, before its second. A ring all-reduce adds the
    ranks' values of an element in an order set by the element's place in its bucket, so with 3 or more ranks
    the layout changes the sums' rounding: a run resumed at step k (a fresh DDP) would reduce step k with the
    initial layout while the uninterrupted run uses the rebuilt one, and drift. After this every real step of
    every run reduces with the rebuilt layout. Random draws made here do not matter: the caller seeds or
    restores the RNG states afterwards.
    """
    started = time.perf_counter()
    buffers = [b.detach().clone() for b in model.buffers()]
    batch, _ = eval_batch(raw_batch)
    with autocast():
        loss = checked_loss(objective, train_model(*model_inputs(batch, inputs)), batch)
    loss.backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if unused and not static_graph:
        # DDP would fail the next forward with "Expected to have finished reduction in the prior iteration".
        raise ConfigError(f"the model has parameters that get no gradient from the loss ({', '.join(unused[:5])}"
                          f"{', ...' if len(unused) > 5 else ''}; {len(unused)} in all): DDP must be told to look for "
                          "them each step, set distributed.find_unused_parameters=true (slower), or remove them from "
                          "the model or make the loss use them")
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers):
            buffer.copy_(saved)
    return time.perf_counter() - started


def _model_inputs(loader, eval_batch: Callable, inputs: list[str]) -> Callable:
    """The model's inputs of every batch of `loader`, prepared for evaluation, as recompute_bn_statistics takes them."""
    return lambda: (model_inputs(eval_batch(raw)[0], inputs) for raw in loader)


def _clip_or_measure(model: nn.Module, clip_norm: float | None) -> torch.Tensor:
    """The global gradient norm (on the device), clipped to `clip_norm` when set."""
    if clip_norm is not None:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def _resume_path(cfg: Config, manager: CheckpointManager) -> Path | None:
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        return manager.latest()
    return Path(cfg.train.resume)


def _open_run_dir(cfg: Config, total_steps: int, start_step: int) -> RunLogger:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.run_dir / "config.yaml")
    clear_requeue_marker(cfg.run_dir, cfg.preemption.requeue_marker)
    return RunLogger(cfg.run_dir, enabled=True, total_steps=total_steps, start_step=start_step)


def _open_ledger(run_dir: Path, rt: Runtime):
    directory = run_dir / "samples"
    directory.mkdir(parents=True, exist_ok=True)
    return (directory / f"rank{rt.rank}.jsonl").open("a", buffering=1)


def _export_final_weights(manager: CheckpointManager, run_dir: Path, *, swa: bool) -> None:
    """model.pt (and swa_model.pt) from the final checkpoint: plain state dicts for use without ddp_kit."""
    latest = manager.latest()
    if latest is not None:
        export_weights(latest, run_dir / "model.pt")
        if swa:
            export_weights(latest, run_dir / "swa_model.pt", swa=True)
