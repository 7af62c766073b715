"""Exact resume: stopped after step k and resumed == uninterrupted, bit for bit (torch.equal)."""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest
import torch

from runs import final_model, final_state, make_classification_file, tiny_overrides
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
STEPS_PER_EPOCH = {3: 2, 4: 2}  # ceil(24 / world micro-batches / 5)
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


# 3 and 4 processes: with two ranks a + b == b + a hides a change of summation order (a fresh DDP's first bucket
# layout, issue 18); one process and two are resumed in tests/test_fault_tolerance.py. fp16 starts at a loss
# scale that overflows, so the GradScaler skips steps and its scale and growth tracker are part of what must
# resume.
@pytest.mark.parametrize("nproc, dtype", [(3, "bf16"), (4, "fp16")])
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


def test_verify_resume_across_world_sizes_is_within_its_tolerance(tiny_h5, tmp_path):
    # 3 x 4 x 2 = 24 rows per step, 4 steps per epoch; the resumed part goes on from step 5 on 2 processes,
    # where accum_steps 3 keeps 24, with SWA from epoch 1 and a loader worker. In fp32 the states differed by
    # 1.2e-7 at most; with bf16 autocast by 3e-2, as weights rounded to bf16 turn such differences into flips of
    # a bf16 rounding, so autocast stays off here (docs/checkpoints.md).
    settings = {"train.epochs": 2, "train.batch_size": 4, "train.accum_steps": 2, "swa.enabled": "true",
                "swa.start": 1, "data.num_workers": 1}
    command = [sys.executable, "-m", "ddp_kit.cli", "verify-resume", "--config", str(CONFIG), "--nproc", "3",
               "--resume-nproc", "2", "--stop-after", "5", "--timeout", "240",
               *tiny_overrides(tiny_h5, tmp_path, "across", **settings)]
    out = run(command, timeout=600).stdout
    report = json.loads(out[out.rindex("{\n"):])
    assert "the resumed part runs on 2 process(es) with train.accum_steps=3" in out
    assert (report["final_step"], report["nproc"], report["resume_nproc"]) == (8, 3, 2)
    assert report["resume_overrides"] == ["train.accum_steps=3"] and report["left_out"] == list(BN_BUFFERS)
    assert report["differences"] == [] and (report["rtol"], report["atol"]) == (1e-4, 1e-5), report
    resumed = final_state(tmp_path / "across-verify-resumed")
    assert resumed["step"] == 8 and resumed["swa_n_averaged"] == 1 and resumed["world_size"] == 2


def _steps_rows(entries: dict, epoch: int) -> dict[int, list[int]]:
    """step -> the rows it trained on, all ranks and micro-batches together (sorted)."""
    steps: dict[int, list[int]] = {}
    for (_, e, step, _), indices in entries.items():
        if e == epoch:
            steps.setdefault(step, []).extend(indices)
    return {step: sorted(rows) for step, rows in steps.items()}


def test_resume_across_world_sizes_keeps_each_step_s_rows_and_ends_at_the_uninterrupted_weights(tmp_path):
    # 250 rows, a global batch of 32, drop_last: 4 x 8 x 1 takes 224 rows in 7 steps an epoch (2 x 8 x 2 and
    # 1 x 8 x 4 would take 8 on their own), stops after step 3, 2 x 8 x 2 goes on to step 6, then 1 x 8 x 4
    # finishes the second epoch; a 4-process run goes through uninterrupted.
    data = make_classification_file(tmp_path / "data.h5", n_train=250, n_val=40)
    record = {"train.record_sample_ids": "true", "checkpoint.every_steps": 3, "checkpoint.keep_last": 9,
              "data.drop_last": "true"}
    layouts = {4: "train.accum_steps=1", 2: "train.accum_steps=2", 1: "train.accum_steps=4"}
    run(train_command(4, CONFIG, tiny_overrides(data, tmp_path, "whole", **record)))
    overrides = tiny_overrides(data, tmp_path, "changed", **record)
    run(train_command(4, CONFIG, [*overrides, layouts[4], "train.max_steps=3"]))
    out = run(train_command(2, CONFIG, [*overrides, layouts[2], "train.max_steps=6"])).stdout
    assert "at epoch 0, step 3 (96 of the epoch's rows done" in out
    run(train_command(1, CONFIG, [*overrides, layouts[1]]))

    whole = {epoch: _steps_rows(ledger(tmp_path / "whole", world=4)[0], epoch) for epoch in (0, 1)}
    parts = [ledger(tmp_path / "changed", world=w)[0] for w in (4, 2, 1)]  # each rank's file holds every run's
    entries = {key: rows for part in parts for key, rows in part.items()}
    changed = {epoch: _steps_rows(entries, epoch) for epoch in (0, 1)}
    assert changed[0] == whole[0], "every step of the interrupted epoch trained on the same rows"
    assert set(rows_seen(entries, 0).values()) == {1} and len(rows_seen(entries, 0)) == 224
    assert sorted(changed[1]) == list(range(8, 15))
    assert final_state(tmp_path / "changed")["step"] == 14
    # Parameters match up to the order of summation; BatchNorm's running statistics are rank 0's (DDP
    # broadcasts them), and rank 0 saw other micro-batches once the world size changed.
    a, b = final_model(tmp_path / "whole"), final_model(tmp_path / "changed")
    params = [k for k in a if not k.endswith(BN_BUFFERS)]
    worst = max((a[k] - b[k]).abs().max().item() for k in params)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in params), worst

    # With train.allow_global_batch_change one process of 8 takes the rest of epoch 0 from the step-3
    # checkpoint: the 128 rows the epoch had left, in steps of 8, none dropped or repeated.
    checkpoint = tmp_path / "changed" / "checkpoints" / "ckpt_step000000003.pt"
    allowed = tiny_overrides(data, tmp_path, "allowed", **record, **{
        "train.resume": str(checkpoint), "train.allow_global_batch_change": "true", "train.epochs": 1})
    run(train_command(1, CONFIG, allowed))
    first_part = {key: rows for key, rows in parts[0].items() if key[2] <= 3}
    rest = ledger(tmp_path / "allowed", world=1)[0]
    assert sorted(_steps_rows(rest, 0)) == list(range(4, 4 + 128 // 8))
    combined = Counter(rows_seen(first_part, 0)) + Counter(rows_seen(rest, 0))
    assert set(combined.values()) == {1} and len(combined) == 224


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
