"""The loop's bookkeeping and the training state, in-process: accumulation windows, the rank agreement, loss
sums, the checkpoint layout's round trip and the resume checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ddp_kit.averaging import SWA
from ddp_kit.checkpoint import CheckpointError
from ddp_kit.config import Config, DistributedConfig, SwaConfig, to_dict
from ddp_kit.distributed import DistEnv, Runtime
from ddp_kit.optim import build_optimizer, build_scheduler
from ddp_kit.state import ResumeError, TrainingState, check_resumable
from ddp_kit.steps import LossMeter, agree, micro_batches

CPU = torch.device("cpu")
ONE = Runtime(env=DistEnv(), device=CPU, backend=None)


@pytest.mark.parametrize("start, per_epoch, accum, expected", [
    # (index, window_start, window_len, last_in_window) for each micro-batch
    (0, 5, 2, [(0, 0, 2, False), (1, 0, 2, True), (2, 2, 2, False), (3, 2, 2, True), (4, 4, 1, True)]),
    (3, 5, 2, [(3, 2, 2, True), (4, 4, 1, True)]),  # resumed after 3 micro-batches: mid-window
    (0, 3, 4, [(0, 0, 3, False), (1, 0, 3, False), (2, 0, 3, True)]),  # an epoch shorter than a window
    (0, 3, 1, [(0, 0, 1, True), (1, 1, 1, True), (2, 2, 1, True)]),
])
def test_micro_batch_windows(start, per_epoch, accum, expected):
    got = [(m.index, m.window_start, m.window_len, m.last_in_window)
           for m in micro_batches(range(per_epoch - start), start=start, per_epoch=per_epoch, accum=accum)]
    assert got == expected
    firsts = [m.index for m in micro_batches(range(per_epoch), start=0, per_epoch=per_epoch, accum=accum)
              if m.first_in_window]
    assert firsts == list(range(0, per_epoch, accum))


def test_agreement_of_a_single_process():
    assert agree(torch.tensor(2.5), 0, ONE) == (None, 0)
    assert agree(torch.tensor(math.inf), 0, ONE) == (0, 0)
    assert agree(torch.tensor(math.nan), 12, ONE) == (0, 12)


def test_loss_meter_counts_only_windows_that_stepped():
    meter = LossMeter(CPU)
    for loss in (1.0, 3.0):
        meter.add(torch.tensor(loss))
    meter.commit(2)
    meter.add(torch.tensor(100.0))
    meter.discard()  # a skipped step's loss is forgotten
    meter.add(torch.tensor(5.0))
    meter.commit(1)
    assert meter.interval_mean() == pytest.approx(3.0)
    assert math.isnan(meter.interval_mean())  # read resets; an interval without a committed step has no mean
    assert meter.epoch_mean(ONE) == pytest.approx(3.0)


def _state(swa: bool = True) -> TrainingState:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    cfg = Config()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.optim.lr, 5, 50)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, enabled=True)
    averaged = SWA(model, optimizer, SwaConfig(enabled=True, start=1), epochs=4) if swa else None
    return TrainingState(model, optimizer, scheduler, scaler, averaged)


def test_state_dict_round_trip_restores_every_piece():
    a = _state()
    loss = a.model(torch.randn(8, 3)).sum()
    a.scaler.scale(loss).backward()
    a.scaler.step(a.optimizer)
    a.scaler.update()
    a.scheduler.step()
    a.swa.begin_epoch(1)
    a.swa.end_epoch(a.model)
    a.skipped.update(nonfinite=2, scaler=1)
    saved = a.state_dict()
    assert set(saved) == {"model", "optimizer", "scheduler", "scaler", "swa_model", "swa_n_averaged", "swa_scheduler",
                          "skipped_steps"}
    b = _state()
    b.load_state_dict(saved)
    again = b.state_dict()
    for key in ("model", "swa_model"):
        assert all(torch.equal(saved[key][k], again[key][k]) for k in saved[key])
    assert again["scheduler"] == saved["scheduler"] and again["swa_scheduler"] == saved["swa_scheduler"]
    assert again["scaler"] == saved["scaler"] and again["swa_n_averaged"] == 1
    assert b.skipped == {"nonfinite": 2, "scaler": 1}
    assert _state(swa=False).state_dict()["swa_model"] is None


def _checkpoint(cfg: Config, world_size: int = 1, batches_in_epoch: int = 0) -> dict:
    return {"config": to_dict(cfg), "world_size": world_size, "batches_in_epoch": batches_in_epoch, "epoch": 1,
            "rng": [{}] * world_size}


def test_resume_checks_name_what_differs():
    cfg, path = Config(distributed=DistributedConfig(device="cpu")), Path("ckpt.pt")
    check_resumable(_checkpoint(cfg), cfg, ONE, path)
    other = Config()
    other.train.batch_size = 32
    with pytest.raises(ResumeError, match=r"took 1 process\(es\) x train.batch_size 32 x train.accum_steps 1 = 32 "
                                          r"samples .* would take 1 process\(es\) x train.batch_size 64 x "
                                          r"train.accum_steps 1 = 64. On 1 process\(es\) train.batch_size=32 "
                                          r"keeps 32,"):
        check_resumable(_checkpoint(other), cfg, ONE, path)
    # the same global batch on another world size resumes; another one names what keeps it
    check_resumable(_checkpoint(other, world_size=2), cfg, ONE, path)
    with pytest.raises(ResumeError, match=r"= 128 samples .* On 1 process\(es\) train.accum_steps=2 or "
                                          r"train.batch_size=128 keeps 128 \(accum_steps, not batch_size"):
        check_resumable(_checkpoint(cfg, world_size=2), cfg, ONE, path)
    three = Runtime(env=DistEnv(world_size=3, local_world_size=3), device=CPU, backend=None)
    with pytest.raises(ResumeError, match="No batch_size x accum_steps on 3 process"):
        check_resumable(_checkpoint(cfg, world_size=2), cfg, three, path)
    allowed = Config(distributed=DistributedConfig(device="cpu"))
    allowed.train.allow_global_batch_change = True
    check_resumable(_checkpoint(cfg, world_size=2), allowed, ONE, path)
    other = Config()
    other.data.shuffle = "full"
    check_resumable(_checkpoint(other), cfg, ONE, path)  # at an epoch end the order may change
    with pytest.raises(ResumeError, match=r"middle of epoch 1 \(after 3 batches\): data.shuffle: checkpoint 'full'"):
        check_resumable(_checkpoint(other, batches_in_epoch=3), cfg, ONE, path)
    broken = _checkpoint(cfg)
    broken["rng"] = [{}, {}]
    with pytest.raises(CheckpointError, match="RNG states of 2 ranks"):
        check_resumable(broken, cfg, ONE, path)
