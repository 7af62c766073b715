"""`ddp-kit verify-resume`: run a config uninterrupted, then stopped at a step and resumed, and check that both
end with bit-identical weights and optimizer state. Users run it to trust resume on their own setup; with
--resume-nproc the resumed part runs on another number of processes (the global batch kept), and the states
are compared within a floating-point tolerance."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch

from . import data
from .checkpoint import CheckpointManager, load_checkpoint
from .config import Config, load_config, step_counts
from .launch import train_command
from .state import overrides_keeping


class VerifyError(ValueError):
    """verify-resume's arguments cannot work for this config; the message names the argument and the valid values."""


def default_nproc(cfg: Config) -> int:
    """Processes per run when --nproc is not given: what `torchrun --nproc_per_node=gpu` starts on this machine,
    one per visible CUDA device, or 1 without CUDA or with distributed.device: cpu."""
    return 1 if cfg.distributed.device == "cpu" else max(1, torch.cuda.device_count())


# On a GPU two runs of one command differ without these, resumed or not: cuDNN autotuning picks kernels by
# timing, atomic-add kernels sum in arrival order, and NCCL chooses its algorithm and protocol per message size
# and topology. verify-resume checks resume itself, so it takes them out of the comparison.
GPU_DETERMINISM = ["train.deterministic=true", "train.cudnn_benchmark=false"]
GPU_DETERMINISM_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NCCL_ALGO": "Ring", "NCCL_PROTO": "Simple"}


def _run(command: list[str], timeout_s: float, env: dict | None = None) -> None:
    print("+", " ".join(command), flush=True)
    completed = subprocess.run(command, timeout=timeout_s, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"command failed with exit code {completed.returncode}: {' '.join(command)}")


def _final_state(cfg_path, overrides: list[str]) -> dict:
    cfg = load_config(cfg_path, overrides)
    latest = CheckpointManager(cfg.run_dir / "checkpoints", cfg.checkpoint).latest()
    if latest is None:
        raise RuntimeError(f"no checkpoint in {cfg.run_dir / 'checkpoints'}")
    return load_checkpoint(latest)


def _leaves(tree, prefix: str = ""):
    """Flatten nested dicts/lists into (path, leaf) pairs; tensors and plain values alike."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _leaves(value, f"{prefix}[{i}]")
    else:
        yield prefix, tree


# Everything that decides how training continues: weights, optimizer moments, the LR schedulers' positions,
# the GradScaler's scale and growth tracker, the SWA average and its count, the skipped-step counters.
TRAINING_STATE = ("model", "optimizer", "scheduler", "scaler", "swa_model", "swa_n_averaged", "swa_scheduler",
                  "skipped_steps", "step", "epoch")


# A model's BatchNorm running statistics are rank 0's own (DDP broadcasts its buffers): on another world size
# rank 0 sees other rows, so they are not part of a comparison across world sizes.
RANK0_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _same(a, b, tolerance: tuple[float, float] | None) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if tolerance is not None and a.is_floating_point():
            return torch.allclose(a.double(), b.double(), rtol=tolerance[0], atol=tolerance[1])
        return torch.equal(a, b)
    return type(a) is type(b) and a == b


_MISSING = object()


def _leaf_pairs(a: dict, b: dict, keys, left_out: tuple[str, ...]):
    """(name, leaf of a, leaf of b) over both checkpoints' leaves under `keys`, _MISSING on the side that lacks
    one; names ending with one of `left_out` skipped."""
    for key in keys:
        left, right = dict(_leaves(a.get(key), key)), dict(_leaves(b.get(key), key))
        for name in sorted(left.keys() | right.keys()):
            if not name.endswith(left_out):
                yield name, left.get(name, _MISSING), right.get(name, _MISSING)


def _comparable_tensors(x, y) -> bool:
    return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape


def compare_states(a: dict, b: dict, keys=TRAINING_STATE, tolerance: tuple[float, float] | None = None,
                   left_out: tuple[str, ...] = ()) -> list[str]:
    """Names of the leaves (tensors or values) that differ, or exist on one side only, between two checkpoints,
    with by how much. With `tolerance` (rtol, atol) floating-point tensors may differ within it; leaves whose
    name ends with one of `left_out` are not compared."""
    differences = []
    for name, x, y in _leaf_pairs(a, b, keys, left_out):
        if x is _MISSING or y is _MISSING:
            differences.append(f"{name}: only in one run")
        elif not _same(x, y, tolerance):
            if _comparable_tensors(x, y):
                differences.append(f"{name}: max abs difference {(x.double() - y.double()).abs().max().item():.3g}")
            else:
                differences.append(f"{name}: {x!r} != {y!r}")
    return differences


def max_difference(a: dict, b: dict, keys=TRAINING_STATE, left_out: tuple[str, ...] = ()) -> float:
    """The largest absolute difference between two checkpoints' floating-point tensors of one name and shape."""
    return max(((x.double() - y.double()).abs().max().item() for _, x, y in _leaf_pairs(a, b, keys, left_out)
                if _comparable_tensors(x, y) and x.is_floating_point() and x.numel()), default=0.0)


def _resume_overrides(base: Config, nproc: int, resume_nproc: int) -> list[str]:
    """What the resumed part on `resume_nproc` processes sets to keep the global batch of `nproc` processes."""
    if resume_nproc == nproc:
        return []
    global_batch = nproc * base.train.batch_size * base.train.accum_steps
    options = overrides_keeping(global_batch, resume_nproc, base.train)
    if not options:
        raise VerifyError(f"--resume-nproc={resume_nproc}: no train.batch_size x train.accum_steps on {resume_nproc} "
                          f"process(es) makes the global batch {global_batch} ({nproc} process(es) x "
                          f"train.batch_size {base.train.batch_size} x train.accum_steps {base.train.accum_steps}); "
                          f"pick a number of processes that divides {global_batch}")
    return options[0]


def verify_resume(config: str | Path, overrides: list[str], *, nproc: int | None = None,
                  resume_nproc: int | None = None, stop_after: int | None = None, timeout_s: float = 1800,
                  rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    """Train `config` uninterrupted, then stopped after `stop_after` optimizer steps and resumed; True when both
    end bit-identical, or, when the resumed part runs on `resume_nproc` processes other than `nproc`, within
    `rtol`/`atol` (BatchNorm running statistics left out). The arguments are checked against the config and the
    data before anything runs."""
    if not timeout_s > 0:
        raise VerifyError(f"--timeout={timeout_s}: must be > 0 (seconds allowed per run)")
    if not (rtol >= 0 and atol >= 0):
        raise VerifyError(f"--rtol={rtol} --atol={atol}: must both be >= 0")
    base = load_config(config, overrides)
    nproc = default_nproc(base) if nproc is None else nproc
    if nproc < 1:
        raise VerifyError(f"--nproc={nproc}: must be >= 1")
    resume_nproc = nproc if resume_nproc is None else resume_nproc
    if resume_nproc < 1:
        raise VerifyError(f"--resume-nproc={resume_nproc}: must be >= 1")
    resume_overrides = _resume_overrides(base, nproc, resume_nproc)
    data.prepare_data(base.data)
    steps = step_counts(base.train, data.train_batches_per_epoch(base.data, batch_size=base.train.batch_size,
                                                                 world_size=nproc))
    final_step = steps.final
    run_length = (f"{config} with {nproc} process(es) runs {final_step} optimizer step(s) "
                  f"({steps.per_epoch} per epoch x {base.train.epochs} epochs"
                  + (f", stopped by train.max_steps={base.train.max_steps})" if final_step < steps.total else ")"))
    if final_step < 2:
        raise VerifyError(f"{run_length}: too few to stop in between; raise train.epochs or train.max_steps")
    if stop_after is None:
        stop_after = min(final_step // 2 + 1, final_step - 1)  # odd offsets tend to land mid-epoch
    if not 0 < stop_after < final_step:
        raise VerifyError(f"--stop-after={stop_after}: must be between 1 and {final_step - 1}: {run_length}")
    print(f"verify-resume: {nproc} process(es) per run; {final_step} optimizer steps, the interrupted run stops "
          f"after step {stop_after}", flush=True)
    across = resume_nproc != nproc
    if across:
        print(f"verify-resume: the resumed part runs on {resume_nproc} process(es) with {' '.join(resume_overrides)}, "
              f"the same global batch; gradients are then summed in another order, so the states are compared "
              f"within rtol={rtol} atol={atol}, BatchNorm running statistics (rank 0's own rows) left out. "
              f"Device-side augmentation and dropout draw per rank, and another world size seeds them afresh: "
              f"with them on, expect larger differences (docs/checkpoints.md)", flush=True)
        if base.amp.enabled:
            print(f"verify-resume: with {base.amp.dtype} autocast, weights rounded to {base.amp.dtype} turn those "
                  f"rounding differences into larger ones within a few steps; amp.enabled=false checks resume "
                  f"itself", flush=True)
    env = None
    if base.distributed.device != "cpu" and torch.cuda.is_available():
        overrides = [*overrides, *GPU_DETERMINISM]
        env = {**GPU_DETERMINISM_ENV, **os.environ}  # what the user set wins
        print(f"verify-resume: on CUDA every run uses {' '.join(GPU_DETERMINISM)} and "
              + " ".join(f"{k}={env[k]}" for k in GPU_DETERMINISM_ENV)
              + ": without them two uninterrupted runs already differ (autotuned and atomic-add kernels, NCCL's "
                "choice of algorithm), so a difference found here is resume's own", flush=True)

    full = [*overrides, f"run.name={base.run.name}-verify-full", "train.resume=never"]
    _run(train_command(config, full, nproc_per_node=nproc), timeout_s, env)
    full_state = _final_state(config, full)
    if full_state["step"] != final_step:
        raise RuntimeError(f"the uninterrupted run ended at step {full_state['step']}, not at the {final_step} "
                           "its config and data give; see its log")
    resumed = [*overrides, f"run.name={base.run.name}-verify-resumed"]
    _run(train_command(config, [*resumed, "train.resume=never", f"train.max_steps={stop_after}"],
                       nproc_per_node=nproc), timeout_s, env)
    resumed = [*resumed, "train.resume=auto", *resume_overrides]
    _run(train_command(config, resumed, nproc_per_node=resume_nproc), timeout_s, env)
    resumed_state = _final_state(config, resumed)
    left_out = RANK0_STATISTICS if across else ()
    differences = compare_states(full_state, resumed_state, tolerance=(rtol, atol) if across else None,
                                 left_out=left_out)
    report = {"stopped_at_step": stop_after, "final_step": full_state["step"], "nproc": nproc,
              "resume_nproc": resume_nproc, "resume_overrides": resume_overrides,
              "rtol": rtol if across else None, "atol": atol if across else None, "left_out": list(left_out),
              "max_abs_difference": max_difference(full_state, resumed_state, left_out=left_out),
              "identical": not differences, "first_difference": differences[0] if differences else None,
              "differences": differences[:20]}
    print(json.dumps(report, indent=2))
    return not differences
