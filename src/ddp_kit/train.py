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
import functools
import json
import os
import signal
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import __version__, data, distributed, models
from .amp import autocast_factory
from .averaging import SWA, recompute_bn_statistics
from .checkpoint import CheckpointManager, load_checkpoint, restore_rng_state
from .config import Config, save_config, step_counts
from .distributed import Runtime
from .logging import RunLogger, Throughput
from .optim import build_optimizer, build_scheduler
from .preemption import StopSignals, clear_requeue_marker, write_requeue_marker
from .state import Position, TrainingState
from .steps import LossMeter, agree, micro_batches
from .weights import export_weights, load_weights


class NonFiniteLossError(RuntimeError):
    """A NaN/Inf loss with train.on_nonfinite=stop; the last good state was checkpointed first."""


def train(cfg: Config) -> dict:
    """Run the configured training on this process (one of torchrun's workers, an srun task, or alone).

    Returns the last epoch's metrics, with "status": "completed" | "preempted" | "max_steps"."""
    # ------------------------------------------------------------------ setup
    data.prepare_data(cfg.data)  # before the process group: one process builds the demo file, others wait
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

        loaders, model = _build(cfg, rt)
        steps = step_counts(cfg.train, len(loaders.train))
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.schedule, cfg.optim.lr, steps.per_epoch, steps.total)
        autocast, amp_warning = autocast_factory(cfg.amp, device)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        scaler = torch.amp.GradScaler(device.type, init_scale=cfg.amp.init_scale,
                                      enabled=cfg.amp.enabled and cfg.amp.dtype == "fp16")
        swa = SWA(model, optimizer, cfg.swa, cfg.train.epochs) if cfg.swa.enabled else None
        state = TrainingState(model, optimizer, scheduler, scaler, swa)
        eval_batch = functools.partial(data.to_device, device=device, cfg=cfg.data, train=False,
                                       channels_last=cfg.model.channels_last)

        # Resume: rank 0 picks the checkpoint, every rank loads the same file.
        manager = CheckpointManager(cfg.run_dir / "checkpoints", cfg.checkpoint)
        resume_path = distributed.broadcast_object(_resume_path(cfg, manager) if rt.is_main else None, rt)
        position, resumed_rng = state.resume(resume_path, cfg, rt) if resume_path else (Position(), None)
        step = position.step

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
            settle_seconds = _settle_gradient_buckets(train_model, model, loaders.train_eval.dataset, eval_batch,
                                                      autocast, rows=min(cfg.train.batch_size, loaders.train_size))

        opened = manager.write_on_rank0(functools.partial(_open_run_dir, cfg, steps.total, step), rt)
        logger = opened if rt.is_main else RunLogger(cfg.run_dir, enabled=False, total_steps=steps.total)
        teardown.callback(logger.close)
        logger.info(f"ddp_kit {__version__}: {rt.world_size} process(es) ({rt.env.launcher}), device {device}, "
                    f"backend {rt.backend or 'none'}, {rt.cpu_threads}; {loaders.train_size} train / "
                    f"{loaders.val_size} val samples, {steps.micro_per_epoch} micro-batches = {steps.per_epoch} "
                    f"optimizer steps per epoch per rank"
                    + (f"; resumed from {resume_path} at epoch {position.epoch}, step {step}" if resume_path else ""))
        if amp_warning:
            logger.info(amp_warning)
        if settle_seconds is not None:
            logger.info(f"DDP gradient buckets settled by one discarded forward/backward in {settle_seconds:.1f} s"
                        + (" (torch.compile's compilation included)" if cfg.compile.enabled else ""))
        ledger = _open_ledger(cfg.run_dir, rt) if cfg.train.record_sample_ids else None
        if ledger is not None:
            teardown.callback(ledger.close)

        # Restored last: everything above may have drawn random numbers.
        if resumed_rng is not None:
            restore_rng_state(resumed_rng)
        else:
            distributed.seed_everything(distributed.rank_seed(cfg.run.seed, rt.rank))

        status, record = "completed", {}
        compile_pending = cfg.compile.enabled and settle_seconds is None
        grad_norm = torch.zeros((), device=device)
        # A non-finite forward has already written NaN/Inf into BatchNorm's running statistics by the time the
        # ranks agree on it: a skipped step restores them from this copy, and `stop` saves the good ones.
        buffers = list(model.buffers())
        buffers_before_window = [b.detach().clone() for b in buffers]

        # ------------------------------------------------------------------ loop
        for epoch in range(position.epoch, cfg.train.epochs):
            # A run resumed mid-epoch finishes that epoch in the batch order its checkpoint was cut from.
            start = position.batches_in_epoch if epoch == position.epoch else 0
            loaders.train_sampler.set_epoch(epoch, start_batch=start,
                                            order_workers=position.order_workers if start else None)
            model.train()
            averaging = swa is not None and swa.begin_epoch(epoch)  # then SWALR drives the learning rate
            losses, throughput, epoch_start, epoch_samples = LossMeter(device), Throughput(), time.perf_counter(), 0

            for micro in micro_batches(loaders.train, start=start, per_epoch=steps.micro_per_epoch,
                                       accum=cfg.train.accum_steps):
                images, labels, rows = micro.batch
                if ledger is not None:
                    ledger.write(json.dumps({"epoch": epoch, "step": step + 1, "micro": micro.index,
                                             "indices": rows.tolist()}) + "\n")
                images, labels = data.to_device(images, labels, device, cfg.data, train=True,
                                                channels_last=cfg.model.channels_last,
                                                batch_transform=loaders.batch_transform,
                                                augment_seed=data.draw_seed(cfg.run.seed, epoch, micro.index, rt.rank))
                if buffers and micro.first_in_window:
                    torch._foreach_copy_(buffers_before_window, buffers)
                started = time.perf_counter()
                # The forward too must run under no_sync(): DDP prepares the all-reduce in forward.
                with ddp.no_sync() if ddp is not None and not micro.last_in_window else contextlib.nullcontext():
                    with autocast():
                        loss = F.cross_entropy(train_model(images), labels)
                    scaler.scale(loss / micro.window_len if micro.window_len > 1 else loss).backward()
                if compile_pending:
                    compile_pending = False
                    logger.info(f"torch.compile: first step (compilation included) took "
                                f"{time.perf_counter() - started:.1f} s")
                losses.add(loss)
                epoch_samples += labels.numel()
                throughput.add(labels.numel() * rt.world_size)
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
                        state.save(manager, cfg, rt, Position(epoch, step, micro.window_start), tag="nonfinite")
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
                                              "samples_per_s": throughput.rate_and_reset(),
                                              "grad_norm": float(grad_norm)})
                reached_max = cfg.train.max_steps is not None and step >= cfg.train.max_steps
                if stop_signal or reached_max or manager.should_save(step=step, epoch_end=False, epoch=epoch):
                    state.save(manager, cfg, rt, Position(epoch, step, micro.index + 1),
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
            record = {"epoch": epoch, "step": step, "train_loss": losses.epoch_mean(rt), "val_loss": None,
                      "val_acc": None, "lr": optimizer.param_groups[0]["lr"],
                      "samples_per_s": epoch_samples * rt.world_size / epoch_time, "epoch_time_s": epoch_time,
                      "skipped_nonfinite_steps": state.skipped["nonfinite"],
                      "skipped_scaler_steps": state.skipped["scaler"]}
            last_epoch = epoch == cfg.train.epochs - 1
            if (epoch + 1) % cfg.train.val_every_epochs == 0 or last_epoch:
                record["val_loss"], record["val_acc"] = evaluate(model, loaders.val, rt, eval_batch, autocast)
                if averaging:
                    recompute_bn_statistics(swa.model.module, _model_inputs(loaders.train_eval, eval_batch), rt,
                                            autocast)
                    record["swa_val_loss"], record["swa_val_acc"] = evaluate(swa.model.module, loaders.val, rt,
                                                                             eval_batch, autocast)
            manager.write_on_rank0(functools.partial(logger.epoch, record), rt)
            if manager.should_save(step=step, epoch_end=True, epoch=epoch) or last_epoch:
                state.save(manager, cfg, rt, Position(epoch + 1, step, 0), metrics=record,
                           tag="final" if last_epoch else "periodic")

        # ------------------------------------------------------------------ teardown
        if status == "completed":
            manager.write_on_rank0(functools.partial(_export_final_weights, manager, cfg.run_dir,
                                                     swa=swa is not None), rt)
        return {**record, "status": status, "step": step}


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path, *, swa: bool = False) -> dict:
    """Validation loss and accuracy of a checkpoint's weights, on however many processes this was started with."""
    data.prepare_data(cfg.data)
    with distributed.process_group(cfg.distributed) as rt:
        loaders, model = _build(cfg, rt)
        load_weights(model, load_checkpoint(checkpoint), strict=True, key="swa_model" if swa else None)
        autocast, _ = autocast_factory(cfg.amp, rt.device)
        eval_batch = functools.partial(data.to_device, device=rt.device, cfg=cfg.data, train=False,
                                       channels_last=cfg.model.channels_last)
        if swa:
            recompute_bn_statistics(model, _model_inputs(loaders.train_eval, eval_batch), rt, autocast)
        val_loss, val_acc = evaluate(model, loaders.val, rt, eval_batch, autocast)
        return {"val_loss": val_loss, "val_acc": val_acc, "world_size": rt.world_size, "rank": rt.rank}


@torch.no_grad()
def evaluate(model: nn.Module, loader, rt: Runtime, eval_batch: Callable, autocast: Callable) -> tuple[float, float]:
    """Loss and accuracy over the whole validation set: each rank sums over its disjoint shard, the sums are
    all-reduced, so the figure equals a single process's for the same weights."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=rt.device)  # loss sum, correct, count
    for images, labels, _ in loader:
        images, labels = eval_batch(images, labels)
        with autocast():
            logits = model(images)
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum")
        totals[1] += (logits.argmax(dim=1) == labels).sum()
        totals[2] += labels.numel()
    loss_sum, correct, count = distributed.all_reduce_sum(totals, rt).tolist()
    model.train(was_training)
    return loss_sum / count, correct / count


# ---------------------------------------------------------------------------------------------------------
# Setup and teardown pieces. Each is a plain function of its arguments.


def _build(cfg: Config, rt: Runtime) -> tuple[data.Loaders, nn.Module]:
    """This rank's loaders and the model on its device, seeded alike on every rank: identical initial weights
    even before DDP broadcasts rank 0's."""
    loaders = data.build_dataloaders(
        cfg.data, batch_size=cfg.train.batch_size, val_batch_size=cfg.train.val_batch_size, rank=rt.rank,
        world_size=rt.world_size, seed=cfg.run.seed, device=rt.device, num_classes=cfg.model.num_classes,
        in_channels=cfg.model.in_channels, stats_rows=cfg.swa.bn_rows)
    distributed.seed_everything(cfg.run.seed)
    model = models.build_model(cfg.model, example_input_shape=loaders.sample_shape).to(rt.device)
    if cfg.distributed.sync_bn and rt.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return loaders, model


def _settle_gradient_buckets(train_model: nn.Module, model: nn.Module, dataset, eval_batch: Callable,
                             autocast: Callable, *, rows: int) -> float:
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
    images, labels, _ = dataset[range(rows)]
    images, labels = eval_batch(images, labels)
    with autocast():
        loss = F.cross_entropy(train_model(images), labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers):
            buffer.copy_(saved)
    return time.perf_counter() - started


def _model_inputs(loader, eval_batch: Callable) -> Callable:
    """The model's inputs of every batch of `loader`, prepared for evaluation, as recompute_bn_statistics takes them."""
    return lambda: ((eval_batch(images, labels)[0],) for images, labels, _ in loader)


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
