"""The training loop. Setup, loop, teardown, read top to bottom; AMP, gradient accumulation, SWA, the
non-finite guard and preemption act where they appear.

Host-device synchronization: exactly one small read per optimizer step (the flags every rank must agree on:
a non-finite loss anywhere, a stop signal anywhere), none per micro-step; losses and counts stay on the device
and are read at log intervals.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import SWALR, AveragedModel

from . import __version__, data, distributed, models
from .amp import AMP_DTYPES, autocast_dtype
from .checkpoint import (CheckpointError, CheckpointManager, capture_rng_state, export_weights, load_checkpoint,
                         load_weights, model_state_dict, restore_rng_state)
from .config import Config, save_config, step_counts, swa_start_epoch, to_dict
from .distributed import Runtime
from .files import WriteError
from .logging import RunLogger, Throughput
from .optim import build_optimizer, build_scheduler
from .preemption import StopSignals, clear_requeue_marker, write_requeue_marker


class NonFiniteLossError(RuntimeError):
    """A NaN/Inf loss with train.on_nonfinite=stop; the last good state was checkpointed first."""


class ResumeError(RuntimeError):
    """The checkpoint to resume from does not fit this run's configuration."""


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
        run_dir = cfg.run_dir
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark and not cfg.train.deterministic
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.autograd.set_detect_anomaly(cfg.train.detect_anomaly)

        loaders = _build_loaders(cfg, rt)
        accum = cfg.train.accum_steps
        steps = step_counts(cfg.train, len(loaders.train))
        micro_per_epoch, steps_per_epoch, total_steps = steps.micro_per_epoch, steps.per_epoch, steps.total

        # The same seed on every rank: identical initial weights even before DDP broadcasts rank 0's.
        distributed.seed_everything(cfg.run.seed)
        model = models.build_model(cfg.model, example_input_shape=loaders.sample_shape).to(device)
        if cfg.distributed.sync_bn and rt.world_size > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.schedule, cfg.optim.lr, steps_per_epoch, total_steps)
        # Without AMP, no autocast at all: entering a disabled one every micro-step is a measurable cost.
        amp_dtype, amp_warning = autocast_dtype(cfg.amp, device)
        autocast = (functools.partial(torch.autocast, device.type, dtype=amp_dtype)
                    if cfg.amp.enabled else contextlib.nullcontext)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        scaler = torch.amp.GradScaler(device.type, init_scale=cfg.amp.init_scale,
                                      enabled=cfg.amp.enabled and cfg.amp.dtype == "fp16")
        swa_model = AveragedModel(model) if cfg.swa.enabled else None
        swa_start = swa_start_epoch(cfg) if cfg.swa.enabled else None
        swa_scheduler = None

        # Resume: rank 0 picks the checkpoint, every rank loads the same file.
        manager = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint)
        resume_path = distributed.broadcast_object(_resume_path(cfg, manager) if rt.is_main else None, rt)
        start_epoch, step, start_batch, resumed_rng, resumed_order_workers = 0, 0, 0, None, None
        skipped = {"nonfinite": 0, "scaler": 0}  # optimizer steps skipped so far, over the whole run
        if resume_path is not None:
            state = load_checkpoint(resume_path)
            _check_resumable(state, cfg, rt, resume_path)
            load_weights(model, state["model"], strict=True)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler") is not None:
                scaler.load_state_dict(state["scaler"])
            if swa_model is not None and state.get("swa_model") is not None:
                load_weights(swa_model, state["swa_model"], strict=True)
                swa_model.n_averaged.fill_(state["swa_n_averaged"])
            if swa_model is not None and state.get("swa_scheduler") is not None:
                swa_scheduler = SWALR(optimizer, swa_lr=cfg.swa.lr, anneal_epochs=cfg.swa.anneal_epochs,
                                      anneal_strategy=cfg.swa.anneal_strategy)
                swa_scheduler.load_state_dict(state["swa_scheduler"])
            start_epoch, step, start_batch = state["epoch"], state["step"], state["batches_in_epoch"]
            resumed_order_workers = state["config"]["data"]["num_workers"]
            resumed_rng = state["rng"][rt.rank]
            skipped.update(state.get("skipped_steps", {}))  # absent from older checkpoints

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

        opened = _rank0_writes(functools.partial(_open_run_dir, cfg, total_steps, step), rt, manager)
        logger = opened if rt.is_main else RunLogger(run_dir, enabled=False, total_steps=total_steps)
        teardown.callback(logger.close)
        logger.info(f"ddp_kit {__version__}: {rt.world_size} process(es) ({rt.env.launcher}), device {device}, "
                    f"backend {rt.backend or 'none'}, {rt.cpu_threads}; {loaders.train_size} train / "
                    f"{loaders.val_size} val samples, "
                    f"{micro_per_epoch} micro-batches = {steps_per_epoch} optimizer steps per epoch per rank"
                    + (f"; resumed from {resume_path} at epoch {start_epoch}, step {step}" if resume_path else ""))
        if amp_warning:
            logger.info(amp_warning)
        ledger = _open_ledger(run_dir, rt) if cfg.train.record_sample_ids else None
        if ledger is not None:
            teardown.callback(ledger.close)

        # Restored last: everything above may have drawn random numbers.
        if resumed_rng is not None:
            restore_rng_state(resumed_rng)
        else:
            distributed.seed_everything(distributed.rank_seed(cfg.run.seed, rt.rank))

        status, record = "completed", {}
        compile_pending = cfg.compile.enabled
        grad_norm = torch.zeros((), device=device)
        # A non-finite forward has already written NaN/Inf into BatchNorm's running statistics by the time the
        # flags say so: a skipped step restores them from this copy, and `stop` saves the good ones.
        buffers = list(model.buffers())
        buffers_before_window = [b.detach().clone() for b in buffers]

        # ------------------------------------------------------------------ loop
        for epoch in range(start_epoch, cfg.train.epochs):
            # A run resumed mid-epoch finishes that epoch in the batch order its checkpoint was cut from.
            loaders.train_sampler.set_epoch(epoch, start_batch=start_batch,
                                            order_workers=resumed_order_workers if start_batch else None)
            micro = start_batch
            start_batch = 0
            model.train()
            swa_phase = swa_model is not None and epoch >= swa_start
            if swa_phase and swa_scheduler is None:
                swa_scheduler = SWALR(optimizer, swa_lr=cfg.swa.lr, anneal_epochs=cfg.swa.anneal_epochs,
                                      anneal_strategy=cfg.swa.anneal_strategy)
            # Loss sums stay on the device (no host sync per step); the micro-batch counts are host ints.
            epoch_loss, interval_loss, window_loss = (torch.zeros((), device=device) for _ in range(3))
            epoch_micro = interval_micro = 0
            throughput, epoch_start = Throughput(), time.perf_counter()
            epoch_samples = 0

            for images, labels, indices in loaders.train:
                # Windows of `accum` micro-batches; the epoch's last window may be shorter, and its loss is
                # divided by its real length so every optimizer step averages over the samples it saw.
                window_start = micro - micro % accum
                window_len = min(accum, micro_per_epoch - window_start)
                last_in_window = micro - window_start == window_len - 1
                if ledger is not None:
                    ledger.write(json.dumps({"epoch": epoch, "step": step + 1, "micro": micro,
                                             "indices": indices.tolist()}) + "\n")
                images, labels = data.to_device(images, labels, device, cfg.data, train=True,
                                                channels_last=cfg.model.channels_last,
                                                batch_transform=loaders.batch_transform)
                if buffers and micro == window_start:
                    torch._foreach_copy_(buffers_before_window, buffers)
                # The forward too must run under no_sync(): DDP prepares the all-reduce in forward.
                sync_context = ddp.no_sync() if ddp is not None and not last_in_window else contextlib.nullcontext()
                first_step_start = time.perf_counter()
                with sync_context:
                    with autocast():
                        loss = F.cross_entropy(train_model(images), labels)
                    scaler.scale(loss / window_len if window_len > 1 else loss).backward()
                if compile_pending:
                    compile_pending = False
                    logger.info(f"torch.compile: first step (compilation included) took "
                                f"{time.perf_counter() - first_step_start:.1f} s")
                window_loss += loss.detach().float()
                micro += 1
                epoch_samples += labels.numel()
                throughput.add(labels.numel() * rt.world_size)
                if not last_in_window:
                    continue

                # ---- optimizer step: every rank agrees on the flags, with one host read.
                if rt.world_size == 1:  # nothing to agree on: skip the tensor ops, a visible cost on tiny models
                    nonfinite_rank = 0 if math.isfinite(window_loss.item()) else 1
                    stop_signal = stop.signal_number or 0
                else:
                    flags = torch.stack([(~torch.isfinite(window_loss)).float() * (rt.rank + 1),
                                         torch.tensor(float(stop.signal_number or 0), device=device)])
                    nonfinite_rank, stop_signal = (int(f) for f in distributed.all_reduce_max(flags, rt).tolist())
                stop_now = stop_signal > 0
                log_now = (step + 1) % cfg.train.log_every_steps == 0
                if nonfinite_rank:
                    if buffers:
                        torch._foreach_copy_(buffers, buffers_before_window)
                    optimizer.zero_grad(set_to_none=True)
                    if cfg.train.on_nonfinite == "stop":
                        _save(manager, rt, cfg, model, optimizer, scheduler, scaler, swa_model, swa_scheduler,
                              epoch=epoch, step=step, batches_in_epoch=window_start, skipped=skipped,
                              tag="nonfinite")
                        raise NonFiniteLossError(
                            f"non-finite loss in optimizer step {step + 1} (epoch {epoch}) on rank "
                            f"{int(nonfinite_rank) - 1}; the last good state is checkpointed in "
                            f"{manager.directory}. Lower optim.lr, enable optim.grad_clip_norm, or use "
                            f"train.detect_anomaly=true to find the operation")
                    skipped["nonfinite"] += 1
                else:
                    if cfg.optim.grad_clip_norm is not None or log_now:
                        scaler.unscale_(optimizer)  # clip and report the true gradient norm, not the scaled one
                        grads = [p.grad for p in model.parameters() if p.grad is not None]
                        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
                                     if cfg.optim.grad_clip_norm is not None
                                     else torch.nn.utils.get_total_norm(grads))
                    if scaler.is_enabled():
                        scale_before = scaler.get_scale()
                        scaler.step(optimizer)
                        scaler.update()
                        skipped["scaler"] += int(scaler.get_scale() < scale_before)
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    epoch_loss += window_loss
                    interval_loss += window_loss
                    epoch_micro += window_len
                    interval_micro += window_len
                window_loss.zero_()
                if not swa_phase:
                    scheduler.step()
                step += 1

                if log_now:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # time finished kernels, not launches
                    mean_loss, count = interval_loss.item(), interval_micro
                    logger.step(step, epoch, {
                        "loss": mean_loss / max(count, 1), "lr": optimizer.param_groups[0]["lr"],
                        "samples_per_s": throughput.rate_and_reset(), "grad_norm": float(grad_norm)})
                    interval_loss.zero_()
                    interval_micro = 0
                reached_max = cfg.train.max_steps is not None and step >= cfg.train.max_steps
                if stop_now or reached_max or manager.should_save(step=step, epoch_end=False, epoch=epoch):
                    _save(manager, rt, cfg, model, optimizer, scheduler, scaler, swa_model, swa_scheduler,
                          epoch=epoch, step=step, batches_in_epoch=micro, skipped=skipped,
                          tag="preempt" if stop_now else "periodic")
                if stop_now:
                    _rank0_writes(functools.partial(write_requeue_marker, run_dir, cfg.preemption.requeue_marker,
                                                    step=step, signal_name=signal.Signals(stop_signal).name),
                                  rt, manager)
                    logger.info(f"stopping at step {step} on {signal.Signals(stop_signal).name} (received by at "
                                f"least one rank); checkpoint saved, marker {cfg.preemption.requeue_marker} written")
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
            if swa_phase:
                swa_model.update_parameters(model)
                swa_scheduler.step()
            epoch_totals = torch.stack([epoch_loss, torch.tensor(float(epoch_micro), device=device)])
            loss_sum, loss_count = distributed.all_reduce_sum(epoch_totals, rt).tolist()
            epoch_time = time.perf_counter() - epoch_start
            record = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(loss_count, 1),
                      "val_loss": None, "val_acc": None, "lr": optimizer.param_groups[0]["lr"],
                      "samples_per_s": epoch_samples * rt.world_size / epoch_time, "epoch_time_s": epoch_time,
                      "skipped_nonfinite_steps": skipped["nonfinite"], "skipped_scaler_steps": skipped["scaler"]}
            last_epoch = epoch == cfg.train.epochs - 1
            if (epoch + 1) % cfg.train.val_every_epochs == 0 or last_epoch:
                record["val_loss"], record["val_acc"] = evaluate(model, loaders.val, rt, cfg)
                if swa_phase:
                    recompute_bn_statistics(swa_model.module, loaders.train_eval, rt, cfg)
                    record["swa_val_loss"], record["swa_val_acc"] = evaluate(swa_model.module, loaders.val, rt, cfg)
            _rank0_writes(functools.partial(logger.epoch, record), rt, manager)
            if manager.should_save(step=step, epoch_end=True, epoch=epoch) or last_epoch:
                _save(manager, rt, cfg, model, optimizer, scheduler, scaler, swa_model, swa_scheduler,
                      epoch=epoch + 1, step=step, batches_in_epoch=0, skipped=skipped, metrics=record,
                      tag="final" if last_epoch else "periodic")

        # ------------------------------------------------------------------ teardown
        if status == "completed":
            _rank0_writes(functools.partial(_export_final_weights, manager, run_dir, swa=swa_model is not None),
                          rt, manager)
        return {**record, "status": status, "step": step}


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path, *, swa: bool = False) -> dict:
    """Validation loss and accuracy of a checkpoint's weights, on however many processes this was started with."""
    data.prepare_data(cfg.data)
    with distributed.process_group(cfg.distributed) as rt:
        loaders = _build_loaders(cfg, rt)
        model = models.build_model(cfg.model, example_input_shape=loaders.sample_shape)
        load_weights(model, load_checkpoint(checkpoint), strict=True, key="swa_model" if swa else None)
        model = model.to(rt.device)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if swa:
            recompute_bn_statistics(model, loaders.train_eval, rt, cfg)
        val_loss, val_acc = evaluate(model, loaders.val, rt, cfg)
        return {"val_loss": val_loss, "val_acc": val_acc, "world_size": rt.world_size, "rank": rt.rank}


# ---------------------------------------------------------------------------------------------------------
# Pieces the loop calls. Each is a plain function of its arguments.


def _build_loaders(cfg: Config, rt: Runtime) -> data.Loaders:
    return data.build_dataloaders(
        cfg.data, batch_size=cfg.train.batch_size, val_batch_size=cfg.train.val_batch_size, rank=rt.rank,
        world_size=rt.world_size, seed=cfg.run.seed, device=rt.device, num_classes=cfg.model.num_classes,
        in_channels=cfg.model.in_channels, stats_rows=cfg.swa.bn_rows)


@torch.no_grad()
def evaluate(model: nn.Module, loader, rt: Runtime, cfg: Config) -> tuple[float, float]:
    """Loss and accuracy over the whole validation set: each rank sums over its disjoint shard, the sums are
    all-reduced, so the figure equals a single process's for the same weights."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=rt.device)  # loss sum, correct, count
    for images, labels in _eval_batches(loader, rt, cfg):
        with torch.autocast(rt.device.type, dtype=AMP_DTYPES[cfg.amp.dtype], enabled=cfg.amp.enabled):
            logits = model(images)
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum")
        totals[1] += (logits.argmax(dim=1) == labels).sum()
        totals[2] += labels.numel()
    loss_sum, correct, count = distributed.all_reduce_sum(totals, rt).tolist()
    model.train(was_training)
    return loss_sum / count, correct / count


def _eval_batches(loader, rt: Runtime, cfg: Config):
    """(images, labels) of each batch on the device, prepared as for evaluation (no augmentation)."""
    for images, labels, _ in loader:
        yield data.to_device(images, labels, rt.device, cfg.data, train=False, channels_last=cfg.model.channels_last)


class _ReachedTarget(Exception):
    """Raised by the hook on the BatchNorm being measured: nothing after it in the forward is needed."""


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, loader, rt: Runtime, cfg: Config) -> None:
    """Set every BatchNorm's running mean/var to the exact statistics of its input over the whole loader (all
    ranks' shards combined) as inference will see it: with every BatchNorm before it already using its own
    recomputed statistics (eval mode), not the statistics of each batch.

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
        for index in _forward_order(model, norms, loader, rt, cfg):
            bn = norms[index]
            moments = torch.zeros(3, bn.num_features, dtype=torch.float64, device=rt.device)

            def accumulate(module, inputs):
                x = inputs[0].double()
                dims = [d for d in range(x.dim()) if d != 1]
                moments[0] += x.sum(dims)
                moments[1] += (x * x).sum(dims)
                moments[2] += x.numel() // x.shape[1]
                raise _ReachedTarget

            _forward_each_batch(model, loader, rt, cfg, bn.register_forward_pre_hook(accumulate))
            s1, s2, n = distributed.all_reduce_sum(moments, rt)
            mean = s1 / n
            var = (s2 / n - mean * mean).clamp_min(0) * n / (n - 1).clamp_min(1)  # running_var is unbiased
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    finally:
        model.train(was_training)


def _forward_each_batch(model: nn.Module, loader, rt: Runtime, cfg: Config, hook) -> None:
    """Run the model over every batch of `loader` until `hook` raises _ReachedTarget in each; remove `hook`."""
    try:
        for images, _ in _eval_batches(loader, rt, cfg):
            with torch.autocast(rt.device.type, dtype=AMP_DTYPES[cfg.amp.dtype], enabled=cfg.amp.enabled):
                try:
                    model(images)
                except _ReachedTarget:
                    pass
    finally:
        hook.remove()


def _forward_order(model: nn.Module, norms: list[nn.Module], loader, rt: Runtime, cfg: Config) -> list[int]:
    """Indices into `norms` in the order one forward first reaches them (from the first batch of the first rank
    that has one, so every rank measures them in the same order); BatchNorms the forward never reaches are
    left as they are."""
    reached: list[int] = []
    hooks = [bn.register_forward_pre_hook(lambda module, inputs, i=i: None if i in reached else reached.append(i))
             for i, bn in enumerate(norms)]
    try:
        for images, _ in _eval_batches(loader, rt, cfg):
            with torch.autocast(rt.device.type, dtype=AMP_DTYPES[cfg.amp.dtype], enabled=cfg.amp.enabled):
                model(images)
            break
    finally:
        for hook in hooks:
            hook.remove()
    return next((order for order in distributed.all_gather_objects(reached, rt) if order), [])


def _resume_path(cfg: Config, manager: CheckpointManager) -> Path | None:
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        return manager.latest()
    return Path(cfg.train.resume)


# What decides an epoch's sample order besides world size and batch size (data.num_workers too, but a resumed
# epoch is finished in its checkpoint's order whatever data.num_workers is now).
SAMPLE_ORDER_SETTINGS = (("run", "seed"), ("data", "shuffle"), ("data", "shuffle_window"), ("data", "block_size"),
                         ("data", "drop_last"))


def _check_resumable(state: dict, cfg: Config, rt: Runtime, path: Path) -> None:
    saved = {"world_size": state.get("world_size"), "train.batch_size": state.get("batch_size"),
             "train.accum_steps": state.get("accum_steps")}
    current = {"world_size": rt.world_size, "train.batch_size": cfg.train.batch_size,
               "train.accum_steps": cfg.train.accum_steps}
    if differ := _differences(saved, current):
        raise ResumeError(
            f"cannot resume exactly from {path}: {differ}. The sample order and the optimizer-step count both "
            f"depend on these. Resume with the same values, or start a new run (another run.name or "
            f"train.resume=never) and load only the weights (`ddp-kit export` then ddp_kit.checkpoint.load_weights)")
    if state["batches_in_epoch"]:
        saved, current = ({f"{section}.{key}": config[section][key] for section, key in SAMPLE_ORDER_SETTINGS}
                          for config in (state["config"], to_dict(cfg)))
        if differ := _differences(saved, current):
            raise ResumeError(
                f"cannot resume {path} in the middle of epoch {state['epoch']} (after {state['batches_in_epoch']} "
                f"batches): {differ}. The epoch's sample order depends on these, so the rest of it "
                f"would repeat some samples and skip others. Resume with the checkpoint's values; change them "
                f"from a checkpoint saved at an epoch end (checkpoint.every_epochs)")
    if len(state["rng"]) != rt.world_size:
        raise CheckpointError(f"{path}: holds RNG states of {len(state['rng'])} ranks, this run has {rt.world_size}")


def _differences(saved: dict, current: dict) -> str:
    """'key: checkpoint A vs now B' for every key whose value changed, comma-separated; empty if none."""
    return ", ".join(f"{key}: checkpoint {saved[key]!r} vs now {current[key]!r}"
                     for key in saved if saved[key] != current[key])


def _save(manager: CheckpointManager, rt: Runtime, cfg: Config, model, optimizer, scheduler, scaler, swa_model,
          swa_scheduler, *, epoch: int, step: int, batches_in_epoch: int, skipped: dict, tag: str,
          metrics: dict | None = None) -> None:
    """All ranks call this together (RNG states are gathered); rank 0 writes; all wait until the file is
    complete, so no rank runs ahead of a checkpoint that may yet fail."""
    rng = distributed.all_gather_objects(capture_rng_state(), rt)

    def write() -> None:
        state = {
            "model": model_state_dict(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "swa_model": model_state_dict(swa_model) if swa_model is not None else None,
            "swa_n_averaged": int(swa_model.n_averaged) if swa_model is not None else 0,
            "swa_scheduler": swa_scheduler.state_dict() if swa_scheduler is not None else None,
            "epoch": epoch, "step": step, "batches_in_epoch": batches_in_epoch, "skipped_steps": dict(skipped),
            "rng": rng,
            "config": to_dict(cfg), "world_size": rt.world_size, "batch_size": cfg.train.batch_size,
            "accum_steps": cfg.train.accum_steps,
            "versions": {"torch": str(torch.__version__), "ddp_kit": __version__},
            "metrics": metrics,
        }
        manager.save(state, step=step, epoch=epoch, metrics=metrics, tag=tag)

    _rank0_writes(write, rt, manager)


def _rank0_writes(action, rt: Runtime, manager: CheckpointManager):
    """Rank 0's writes (run directory, checkpoints, metrics, marker, exports) as every rank's business
    (distributed.on_main_rank); a failed write also says what is intact and what to do."""
    try:
        return distributed.on_main_rank(action, rt)
    except WriteError as exc:
        raise WriteError(f"{exc}. {manager.resume_note()}") from None


def _open_run_dir(cfg: Config, total_steps: int, start_step: int) -> RunLogger:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.run_dir / "config.yaml")
    clear_requeue_marker(cfg.run_dir, cfg.preemption.requeue_marker)
    return RunLogger(cfg.run_dir, enabled=True, total_steps=total_steps, start_step=start_step)


def _export_final_weights(manager: CheckpointManager, run_dir: Path, *, swa: bool) -> None:
    """model.pt (and swa_model.pt) from the final checkpoint: plain state dicts for use without ddp_kit."""
    latest = manager.latest()
    if latest is not None:
        export_weights(latest, run_dir / "model.pt")
        if swa:
            export_weights(latest, run_dir / "swa_model.pt", swa=True)


def _open_ledger(run_dir: Path, rt: Runtime):
    directory = run_dir / "samples"
    directory.mkdir(parents=True, exist_ok=True)
    return (directory / f"rank{rt.rank}.jsonl").open("a", buffering=1)
