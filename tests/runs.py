"""What the tests make and read back: small learnable HDF5 files, the overrides of a seconds-long CPU run, and
a run directory's metrics and final checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ddp_kit.checkpoint import CheckpointManager, load_checkpoint
from ddp_kit.config import load_config
from ddp_kit.data import write_h5


def make_classification_file(path: Path, *, n_train: int = 96, n_val: int = 40, classes: int = 4,
                             shape=(1, 8, 8), seed: int = 0) -> Path:
    """Learnable uint8 images: each class has its own bright stripe, plus noise."""
    rng = np.random.default_rng(seed)
    for i, (group, n) in enumerate((("train", n_train), ("val", n_val))):
        labels = rng.integers(0, classes, size=n).astype(np.int64)
        images = rng.integers(0, 60, size=(n, *shape)).astype(np.uint8)
        for row, label in enumerate(labels):
            images[row, :, label * shape[1] // classes, :] = 255
        write_h5(path, images, labels, group=group, chunk_rows=16, append_group=i > 0)
    return path


def tiny_overrides(data_path: Path, run_dir: Path, name: str = "run", **extra) -> list[str]:
    """A seconds-long CPU run: tiny data, small CNN, no workers unless asked."""
    values = {
        "run.name": name, "run.output_dir": str(run_dir), "data.path": str(data_path),
        "data.num_workers": 0, "model.num_classes": 4, "model.in_channels": 1, "train.epochs": 2,
        "train.batch_size": 8, "train.val_batch_size": 16, "train.log_every_steps": 2,
        "optim.lr": 0.05, "distributed.timeout_s": 60, **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl, one record per epoch."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_state(run_dir: Path) -> dict:
    """The newest complete checkpoint of a run, found with the checkpoint settings the run saved."""
    cfg = load_config(run_dir / "config.yaml")
    latest = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint).latest()
    assert latest is not None, f"no complete checkpoint in {run_dir}"
    return load_checkpoint(latest)


def final_model(run_dir: Path) -> dict:
    return final_state(run_dir)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    """Bit-identical state dicts (torch.equal), naming the tensors that differ."""
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ: {differ[:5]}"
