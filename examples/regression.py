"""Regression on an HDF5 file of simulation-like data: 8 float features per row, two outputs that depend on
them nonlinearly, plus noise whose size varies per row, and a per-row weight (the inverse noise variance).
Weighted MSE loss; MSE, MAE and R^2 from summed moments, exact across ranks.

    torchrun --standalone --nproc_per_node=2 examples/regression.py         # regression.yaml next to this file
"""

import os
import sys
from pathlib import Path

import numpy as np
from torch import nn

import ddp_kit
from ddp_kit.objectives import Regression


def write_simulation(path: Path, rows: int = 6000) -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(rows, 8)).astype(np.float32)
    clean = np.stack([np.sin(features[:, 0]) + features[:, 1] * features[:, 2],
                      np.tanh(features[:, 3] - features[:, 4]) + 0.5 * features[:, 5] ** 2], axis=1)
    noise = rng.uniform(0.05, 0.5, size=(rows, 1)).astype(np.float32)
    target = (clean + noise * rng.normal(size=clean.shape)).astype(np.float32)
    weight = (1 / noise[:, 0] ** 2 / np.mean(1 / noise ** 2)).astype(np.float32)
    split = rows * 5 // 6
    for group, part in (("train", slice(0, split)), ("val", slice(split, rows))):
        ddp_kit.data.write_fields(path, {"features": features[part], "target": target[part],
                                         "weight": weight[part]}, group=group, append_group=group == "val")


def mlp(width: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(8, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))


if __name__ == "__main__":
    cfg = ddp_kit.load_config(Path(__file__).with_suffix(".yaml"), sys.argv[1:])
    ddp_kit.data.create_once(cfg.data.path, write_simulation)
    result = ddp_kit.train(cfg, model=mlp, objective=Regression(weight="weight"))
    if os.environ.get("RANK", "0") == "0":  # every process returns the same figures
        print(f"validation R^2 {result['val_r2']:.3f}, MSE {result['val_mse']:.4f}")
