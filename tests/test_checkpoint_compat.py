"""Checkpoints written by an earlier ddp_kit still resume bit-exactly.

tests/fixtures/ddp_kit-0.1.0_mlp_swa_fp16_step15.pt was written by ddp_kit 0.1.0 as landed (commit d043989):
one process, the tiny data of conftest, mlp, accumulation 2, fp16 with a GradScaler (init scale 2**20), SWA
from epoch 1, stopped by train.max_steps=15, in the middle of epoch 2 (6 of 12 micro-batches), with one
epoch averaged. It holds what 0.1.0 wrote: no skip counters, batch_size and accum_steps at the top level.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddp_kit.checkpoint import CheckpointManager, load_checkpoint
from ddp_kit.config import CheckpointConfig

from runs import tiny_overrides
from procs import REPO, run, train_command

pytestmark = pytest.mark.slow
OLD = Path(__file__).parent / "fixtures" / "ddp_kit-0.1.0_mlp_swa_fp16_step15.pt"
SETTINGS = {"model.name": "mlp", "train.epochs": 3, "train.accum_steps": 2, "train.log_every_steps": 20,
            "swa.enabled": "true", "swa.start": 1, "amp.enabled": "true", "amp.dtype": "fp16",
            "amp.init_scale": 2.0 ** 20}


def test_a_checkpoint_of_ddp_kit_0_1_0_resumes_bit_exactly(tiny_h5, tmp_path):
    config = REPO / "configs" / "digits.yaml"
    run(train_command(1, config, tiny_overrides(tiny_h5, tmp_path, "whole", **SETTINGS)))
    out = run(train_command(1, config, [*tiny_overrides(tiny_h5, tmp_path, "resumed", **SETTINGS),
                                        f"train.resume={OLD}"])).stdout
    assert f"resumed from {OLD} at epoch 2, step 15" in out
    whole, resumed = (load_checkpoint(CheckpointManager(tmp_path / name / "checkpoints", CheckpointConfig()).latest())
                      for name in ("whole", "resumed"))
    assert whole["step"] == resumed["step"] == 18
    for key in ("model", "swa_model"):
        assert whole[key].keys() == resumed[key].keys()
        assert all(torch.equal(whole[key][k], resumed[key][k]) for k in whole[key]), key
    momentum = [s["momentum_buffer"] for s in whole["optimizer"]["state"].values()]
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(momentum, resumed["optimizer"]["state"].values()))
    assert whole["scaler"] == resumed["scaler"] and whole["swa_n_averaged"] == resumed["swa_n_averaged"] == 2
    assert whole["swa_scheduler"] == resumed["swa_scheduler"]
