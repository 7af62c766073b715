"""Every feature of the loop with a user's model and a non-classification objective (regression on named HDF5
fields): accumulation equivalence, fp16 loss scaling, SWA with BatchNorm recomputed from the model's own input
field, the non-finite guard, exact resume at 3 processes; and SWA's note for a model without BatchNorm."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from procs import run, train_command
from runs import final_state, metrics, tiny_overrides

from ddp_kit.data import write_fields

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
USER_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}


def _regression_file(path: Path, order: np.ndarray | None = None, nan_row: int | None = None, rows: int = 80) -> Path:
    rng = np.random.default_rng(3)
    features = rng.normal(size=(rows, 6)).astype(np.float32)
    target = np.stack([features[:, 0] * features[:, 1], np.sin(features[:, 2])], axis=1).astype(np.float32)
    weight = rng.uniform(0.5, 2.0, size=rows).astype(np.float32)
    if nan_row is not None:
        target[nan_row, 1] = np.nan  # a NaN loss; the inputs that SWA's BatchNorm recompute reads stay finite
    train = np.arange(rows) if order is None else order
    write_fields(path, {"x": features[train], "y": target[train], "w": weight[train]}, group="train", chunk_rows=8)
    write_fields(path, {"x": features[:24] * 0.5, "y": target[:24], "w": weight[:24]}, group="val", append_group=True)
    return path


def _overrides(path: Path, tmp_path: Path, name: str, **extra) -> list[str]:
    user = {"data.fields": "{features: x, target: y, weight: w}", "model.inputs": "[features]",
            "model.name": "user_code:RegressionNet", "model.kwargs": "{features: 6, outputs: 2}",
            "objective.name": "regression", "checkpoint.best_metric": "auto", **extra}
    return tiny_overrides(path, tmp_path, name, **user)


def test_accumulation_equals_a_larger_batch_for_a_regression_model(tmp_path):
    # 80 rows as in test_train_features' classification twin: one process, batch 32, against two processes,
    # batch 8 x 2 micro-batches, the second file's rows permuted so every step sees the same samples. Unweighted
    # MSE (a mean over the batch, so the accumulated mean equals the large batch's); plain SGD shows any scale.
    order = np.r_[0:16, 32:48, 64:72, 16:32, 48:64, 72:80]
    single, pair = _regression_file(tmp_path / "single.h5"), _regression_file(tmp_path / "pair.h5", order)
    common = {"data.shuffle": "none", "train.epochs": 3, "optim.name": "sgd", "optim.momentum": 0.0,
              "optim.nesterov": "false", "optim.weight_decay": 0.0, "optim.lr": 0.2, "schedule.name": "constant",
              "train.deterministic": "true"}
    run(train_command(1, CONFIG, _overrides(single, tmp_path, "one", **common, **{"train.batch_size": 32})),
        env=USER_ENV)
    run(train_command(2, CONFIG, _overrides(pair, tmp_path, "two", **common, **{
        "train.batch_size": 8, "train.accum_steps": 2})), timeout=180, env=USER_ENV)
    one, two = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert one["step"] == two["step"] == 9
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    first = metrics(tmp_path / "one")
    assert first[-1]["val_mse"] < first[0]["val_mse"]  # it learned, by far more than the tolerance
    assert abs(first[-1]["val_r2"] - first[0]["val_r2"]) > 1e-2


def test_fp16_swa_batchnorm_and_the_nonfinite_guard_resume_exactly_at_three_processes(tmp_path):
    # 96 rows, 3 ranks of 32, batch 4: 8 steps per epoch; a NaN in one row's target skips its step on every
    # rank each epoch; fp16 from a scale of 2^24 overflows first; SWA averages from epoch 2 and recomputes the
    # BatchNorm statistics by feeding the `features` field. Stopped mid-epoch in the second SWA epoch.
    path = _regression_file(tmp_path / "nan.h5", nan_row=50, rows=96)
    overrides = _overrides(path, tmp_path, "all", **{
        "model.kwargs": "{features: 6, outputs: 2, batch_norm: true}", "objective.kwargs": "{weight: weight}",
        "train.epochs": 4, "train.batch_size": 4, "data.num_workers": 1, "amp.enabled": "true",
        "amp.dtype": "fp16", "amp.init_scale": 2.0 ** 24, "swa.enabled": "true", "swa.start": 2, "swa.lr": 0.01,
        "optim.lr": 0.01})
    command = [sys.executable, "-m", "ddp_kit.cli", "verify-resume", "--config", str(CONFIG), "--nproc", "3",
               "--stop-after", "27", "--timeout", "150", *overrides]
    out = run(command, timeout=300, env=USER_ENV).stdout
    report = json.loads(out[out.rindex("{\n"):])
    assert report["identical"] is True and report["final_step"] == 32 and report["stopped_at_step"] == 27
    full = final_state(tmp_path / "all-verify-full")
    assert full["skipped_steps"]["nonfinite"] == 4 and full["skipped_steps"]["scaler"] > 0
    assert full["swa_n_averaged"] == 2
    swa_bn = {k: v for k, v in full["swa_model"].items() if "running" in k}
    assert swa_bn and all(torch.isfinite(v).all() for v in swa_bn.values())
    # recomputed for the averaged weights, so not the running statistics the trained model carries
    assert not torch.equal(swa_bn["net.1.running_mean"], full["model"]["net.1.running_mean"])
    record = metrics(tmp_path / "all-verify-full")[-1]
    assert {"val_r2", "swa_val_r2", "val_mae"} <= set(record) and np.isfinite(record["swa_val_r2"])


def test_swa_without_batchnorm_says_there_is_nothing_to_recompute(tmp_path):
    path = _regression_file(tmp_path / "r.h5")
    out = run(train_command(1, CONFIG, _overrides(path, tmp_path, "swa", **{
        "swa.enabled": "true", "swa.start": 1, "swa.lr": 0.01})), env=USER_ENV).stdout
    assert "SWA: the model has no BatchNorm, so the average has no statistics to recompute" in out
    assert final_state(tmp_path / "swa")["swa_n_averaged"] == 1
