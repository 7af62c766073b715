"""Exact resume: stopped after step k and resumed == uninterrupted, bit for bit (torch.equal)."""

from __future__ import annotations

import json
import sys

import pytest

from runs import final_state, tiny_overrides
from ledger import ledger, rows_seen
from procs import REPO, run, train_command

pytestmark = pytest.mark.slow
CONFIG = REPO / "configs" / "digits.yaml"

# Accumulation with a short last window, SWA from epoch 2, a DataLoader worker, and random augmentation on the
# device: everything that could make a resumed run drift. 96 rows / world / batch 4 micro-batches in windows of
# 5 leave a short last window at every world size below.
EVERYTHING = {"train.epochs": 4, "train.batch_size": 4, "train.accum_steps": 5, "amp.enabled": "true",
              "swa.enabled": "true", "swa.start": 2, "data.num_workers": 1, "data.random_crop_padding": 1,
              "data.horizontal_flip": "true"}
STEPS_PER_EPOCH = {1: 5, 2: 3, 3: 2, 4: 2}  # ceil(24 / world micro-batches / 5)


# 3 and 4 processes as well as 1 and 2: with two ranks a + b == b + a hides a change of summation order (a fresh
# DDP's first bucket layout, issue 18). fp16 starts at a loss scale that overflows, so the GradScaler skips steps
# and its scale and growth tracker are part of what must resume.
@pytest.mark.parametrize("nproc, dtype", [(1, "fp16"), (2, "bf16"), (3, "bf16"), (4, "fp16")])
def test_verify_resume_is_bit_identical(tiny_h5, tmp_path, nproc, dtype):
    overrides = tiny_overrides(tiny_h5, tmp_path, f"exact{nproc}{dtype}", **EVERYTHING,
                               **{"amp.dtype": dtype, "amp.init_scale": 2.0 ** 24})
    per_epoch = STEPS_PER_EPOCH[nproc]
    stop_after = 3 * per_epoch + 1  # first step of the second SWA epoch: one average taken, mid-epoch
    command = [sys.executable, "-m", "ddp_kit.cli", "verify-resume", "--config", str(CONFIG), "--nproc",
               str(nproc), "--stop-after", str(stop_after), "--timeout", "240", *overrides]
    out = run(command, timeout=600).stdout
    report = json.loads(out[out.rindex("{\n"):])
    assert report["final_step"] == 4 * per_epoch and report["stopped_at_step"] == stop_after
    assert report["identical"] is True and report["differences"] == []
    full_state = final_state(tmp_path / f"exact{nproc}{dtype}-verify-full")
    assert full_state["swa_n_averaged"] == 2
    if dtype == "fp16":
        assert full_state["skipped_steps"]["scaler"] > 0 and full_state["scaler"]["scale"] < 2.0 ** 24


def test_resume_with_another_world_size_is_refused(tiny_h5, tmp_path):
    overrides = tiny_overrides(tiny_h5, tmp_path, "mixed")
    run(train_command(1, CONFIG, [*overrides, "train.max_steps=3"]))
    out = run(train_command(2, CONFIG, overrides), timeout=180, check=False)
    assert out.returncode != 0
    assert "cannot resume exactly from" in out.stdout and "world_size: checkpoint 1 vs now 2" in out.stdout


def test_auto_resume_skips_a_truncated_newest_checkpoint(tiny_h5, tmp_path):
    overrides = tiny_overrides(tiny_h5, tmp_path, "trunc", **{"checkpoint.every_steps": 2})
    run(train_command(1, CONFIG, [*overrides, "train.max_steps=5"]))
    checkpoints = sorted((tmp_path / "trunc" / "checkpoints").glob("ckpt_step*.pt"))
    newest = checkpoints[-1]
    assert newest.name == "ckpt_step000000005.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    out = run(train_command(1, CONFIG, overrides)).stdout
    assert "resumed from" in out and "ckpt_step000000004.pt" in out
    assert "step 4" in out.split("resumed from")[1].splitlines()[0]


def test_mid_epoch_resume_with_other_loader_workers_finishes_the_epoch_in_its_order(tiny_h5, tmp_path):
    # Chunk shuffle orders batches for the loader's workers; 12 batches per epoch, stopped after 5. The rest of
    # epoch 0 keeps the 2-worker order (epoch 1 takes the new worker count's), so the ledger is the one of an
    # uninterrupted run with 2 workers up to the end of epoch 0.
    record = {"train.record_sample_ids": "true"}
    full = tiny_overrides(tiny_h5, tmp_path, "workers-full", **record, **{"data.num_workers": 2, "train.epochs": 1})
    run(train_command(1, CONFIG, full))
    overrides = tiny_overrides(tiny_h5, tmp_path, "workers", **record)
    run(train_command(1, CONFIG, [*overrides, "data.num_workers=2", "train.max_steps=5"]))
    out = run(train_command(1, CONFIG, [*overrides, "data.num_workers=0"])).stdout
    assert "step 5" in out.split("resumed from")[1].splitlines()[0]
    entries, counts = ledger(tmp_path / "workers", world=1)
    assert set(counts.values()) == {1}
    assert {key: rows for key, rows in entries.items() if key[1] == 0} == ledger(tmp_path / "workers-full", world=1)[0]
    assert sorted(rows_seen(entries, 1).elements()) == list(range(96))


def test_mid_epoch_resume_with_another_sample_order_is_refused(tiny_h5, tmp_path):
    overrides = tiny_overrides(tiny_h5, tmp_path, "order")
    run(train_command(1, CONFIG, [*overrides, "train.max_steps=5"]))
    out = run(train_command(1, CONFIG, [*overrides, "data.shuffle_window=3"]), check=False)
    assert out.returncode != 0
    assert "in the middle of epoch 0 (after 5 batches): data.shuffle_window: checkpoint 8 vs now 3" in out.stdout
