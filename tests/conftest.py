from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ddp_kit.data import write_h5
from slurm_cluster import install_if_needed


def pytest_collection_finish(session):
    # SLURM, when a collected test needs it and it is missing, is installed before any test runs, under its own
    # time limit (slurm_cluster.INSTALL_TIMEOUT_S) instead of inside the first such test's timeout.
    install_if_needed(session)


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


@pytest.fixture(scope="session")
def tiny_h5(tmp_path_factory) -> Path:
    return make_classification_file(tmp_path_factory.mktemp("data") / "tiny.h5")


def tiny_overrides(data_path: Path, run_dir: Path, name: str = "run", **extra) -> list[str]:
    """A seconds-long CPU run: tiny data, small CNN, no workers unless asked."""
    values = {
        "run.name": name, "run.output_dir": str(run_dir), "data.path": str(data_path),
        "data.num_workers": 0, "model.num_classes": 4, "model.in_channels": 1, "train.epochs": 2,
        "train.batch_size": 8, "train.val_batch_size": 16, "train.log_every_steps": 2,
        "optim.lr": 0.05, "distributed.timeout_s": 60, **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]
