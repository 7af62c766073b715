"""A full disk: every write ddp_kit makes fails with one clear error (the file, the reason, the space needed and
free, the newest intact checkpoint, what to do), leaves no partial file, loses nothing already written, and a
rerun with space freed resumes exactly. On real small file systems: tmpfs mounted by the test (root only)."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from ddp_kit.checkpoint import CheckpointManager, load_checkpoint, save_atomic
from ddp_kit.config import CheckpointConfig
from ddp_kit.data import write_h5
from ddp_kit.files import TEMP_NAME, WriteError
from ddp_kit.logging import RunLogger
from ddp_kit.weights import export_weights

from runs import tiny_overrides
from procs import REPO, run, train_command

CONFIG = REPO / "configs" / "digits.yaml"
FULL = "No space left on device (ENOSPC)"


class SmallFileSystem:
    def __init__(self, root: Path, size_kb: int):
        self.root = root
        root.mkdir(parents=True)
        self.resize(size_kb, "size")

    def resize(self, size_kb: int, how: str = "remount,size") -> None:
        options = f"{how}={size_kb}k"
        command = ["mount", "-o", options, str(self.root)] if how != "size" else \
            ["mount", "-t", "tmpfs", "-o", options, f"ddp_kit_test_{uuid.uuid4().hex[:8]}", str(self.root)]
        subprocess.run(command, check=True, capture_output=True, timeout=30)

    def fill(self, leave_bytes: int) -> None:
        """Take all free space but `leave_bytes` with a filler file."""
        stats = os.statvfs(self.root)
        free = stats.f_bavail * stats.f_frsize
        with open(self.root / "filler", "wb") as f:
            f.write(b"\0" * max(0, free - leave_bytes))

    def temp_files(self) -> list[Path]:
        return [p for p in self.root.rglob("*") if TEMP_NAME.match(p.name)]


@pytest.fixture
def small_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = []

    def mount(size_kb: int) -> SmallFileSystem:
        fs = SmallFileSystem(tmp_path / f"fs{len(mounted)}", size_kb)
        mounted.append(fs)
        return fs

    try:
        yield mount
    finally:
        for fs in mounted:
            subprocess.run(["umount", "-l", str(fs.root)], capture_output=True, timeout=30)


def test_a_save_that_fills_the_disk_names_file_reason_and_sizes_and_leaves_nothing(small_fs):
    fs = small_fs(1024)
    target = fs.root / "big.pt"
    with pytest.raises(WriteError) as failure:
        save_atomic({"w": torch.zeros(2**19)}, target)  # 2 MiB of tensor data onto 1 MiB
    message = str(failure.value)
    assert f"could not write {target}: {FULL}; it needs about 2.1 MB and {fs.root} (the file system holding " \
           "it) has" in message
    assert not target.exists() and fs.temp_files() == []


def test_a_checkpoint_that_cannot_fit_fails_before_writing_and_the_previous_stays_latest(small_fs):
    fs = small_fs(1500)
    manager = CheckpointManager(fs.root / "checkpoints", CheckpointConfig(keep_last=1, best_metric=None))
    first = manager.save({"model": {"w": torch.ones(2**18)}, "step": 1}, step=1, epoch=0)  # 1 MiB
    with pytest.raises(WriteError, match=r"not enough free space, so nothing was written; it needs about 1\.[01] MB"):
        manager.save({"model": {"w": torch.full((2**18,), 2.0)}, "step": 2}, step=2, epoch=0)
    assert manager.latest() == first and load_checkpoint(first)["model"]["w"].eq(1).all()
    assert not manager.checkpoint_path(2).exists() and fs.temp_files() == []
    assert manager.resume_note() == (f"The newest intact checkpoint is {first}, so nothing saved before was lost. "
                                     "Free space and rerun the same command to resume")


def test_exported_weights_metrics_and_converted_data_fail_with_the_same_error(small_fs, tmp_path):
    source = tmp_path / "ckpt.pt"
    save_atomic({"model": {"w": torch.zeros(2**18)}}, source)
    fs = small_fs(512)
    expected = f"could not write {fs.root / 'model.pt'}: {FULL}; it needs about 1.0 MB"
    with pytest.raises(WriteError, match=re.escape(expected)):
        export_weights(source, fs.root / "model.pt")
    images = np.zeros((64, 3, 64, 64), dtype=np.uint8)  # 786 kB
    # refused before HDF5 writes anything: HDF5 crashes the process at exit after a write that found no space
    expected = (f"could not write {fs.root / 'data.h5'}: not enough free space, so nothing was written; it needs "
                "about 786.4 kB")
    with pytest.raises(WriteError, match=re.escape(expected)):
        write_h5(fs.root / "data.h5", images, np.zeros(64, dtype=np.int64))
    assert not (fs.root / "model.pt").exists() and not (fs.root / "data.h5").exists() and fs.temp_files() == []
    logger = RunLogger(fs.root, enabled=True, total_steps=1)
    fs.fill(leave_bytes=0)
    with pytest.raises(WriteError, match=re.escape(f"could not write {fs.root / 'metrics.jsonl'}: {FULL}")):
        logger.epoch({"epoch": 0, "step": 1, "note": "x" * 100_000})
    logger.close()


@pytest.mark.slow
def test_a_full_disk_mid_run_stops_every_rank_clearly_and_a_rerun_resumes_exactly(small_fs, tiny_h5, tmp_path):
    # A checkpoint of this run is ~0.8 MB: the step-2 one fits on 1.2 MB, the step-4 one does not.
    fs = small_fs(1200)
    extra = {"checkpoint.every_steps": 2, "train.epochs": 1}
    overrides = tiny_overrides(tiny_h5, fs.root, "full", **extra)
    out = run(train_command(2, CONFIG, overrides), check=False, timeout=180)
    assert out.returncode != 0
    checkpoints = fs.root / "full" / "checkpoints"
    intact, failed = checkpoints / "ckpt_step000000002.pt", checkpoints / "ckpt_step000000004.pt"
    rank0 = next(line for line in out.stdout.splitlines() if line.startswith("ddp-kit: error: could not write"))
    assert rank0.startswith(f"ddp-kit: error: could not write {failed}: not enough free space, so nothing was "
                            f"written; it needs about 791") and f"{fs.root} (the file system holding it) has" in rank0
    assert rank0.endswith(f"free. The newest intact checkpoint is {intact}, so nothing saved before was lost. "
                          "Free space and rerun the same command to resume")
    rank1 = [line for line in out.stdout.splitlines() if "rank 0 failed, so rank 1 stops too" in line]
    assert len(rank1) == 1 and f"WriteError: could not write {failed}" in rank1[0]
    workers = out.stdout.split("failed (exitcode: 1)")[0]  # torchrun's own report of failed workers follows
    assert "Traceback" not in workers and "Connection closed" not in workers and "GLHF" not in workers
    assert fs.temp_files() == [] and not failed.exists()
    assert CheckpointManager(checkpoints, CheckpointConfig()).latest() == intact

    fs.resize(8192)
    resumed = run(train_command(2, CONFIG, overrides), timeout=180).stdout
    assert f"resumed from {intact} at epoch 0, step 2" in resumed
    run(train_command(2, CONFIG, tiny_overrides(tiny_h5, tmp_path, "whole", **extra)), timeout=180)
    final = {name: load_checkpoint(CheckpointManager(root / name / "checkpoints", CheckpointConfig()).latest())
             for root, name in ((fs.root, "full"), (tmp_path, "whole"))}
    assert final["full"]["step"] == final["whole"]["step"] == 6
    assert all(torch.equal(final["full"]["model"][k], final["whole"]["model"][k]) for k in final["whole"]["model"])
