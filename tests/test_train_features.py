"""AMP, gradient accumulation, SWA, torch.compile and the non-finite guard, each checked for what it promises."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ddp_kit import distributed
from ddp_kit.checkpoint import load_checkpoint
from ddp_kit.config import load_config
from ddp_kit.models import build_model
from ddp_kit.data import write_h5

from runs import final_state, metrics, tiny_overrides
from procs import REPO, run, torchrun_command, train_command

pytestmark = pytest.mark.slow
CONFIG = REPO / "configs" / "digits.yaml"
SCRIPTS = Path(__file__).parent / "scripts"




def checkpoints(run_dir: Path) -> list[dict]:
    return [load_checkpoint(p) for p in sorted((run_dir / "checkpoints").glob("ckpt_step*.pt"))]




def test_accumulation_all_reduces_once_per_optimizer_step(tiny_h5, tmp_path):
    # 96 rows / 2 ranks / batch 4 = 12 micro-batches per epoch; K=4 -> 3 optimizer steps per epoch, 2 epochs.
    # Buckets of 1 kB split the model's gradients into several, so a micro-step that reduced any one would show.
    overrides = tiny_overrides(tiny_h5, tmp_path, "accum", **{"train.batch_size": 4, "train.accum_steps": 4,
                                                              "distributed.bucket_cap_mb": 0.001})
    run(torchrun_command(2, str(SCRIPTS / "count_allreduce.py"), str(CONFIG), *overrides), timeout=180)
    for rank in (0, 1):
        counts = json.loads((tmp_path / "accum" / f"allreduce_rank{rank}.json").read_text())
        assert counts["steps"] == 6 and counts["forwards"] == 24 + 1
        # One synchronized backward per optimizer step after the one that settles DDP's buckets (train.py),
        # every bucket all-reduced once in each, none in a micro-step: the total is exactly that.
        settle, *per_step = counts["buckets_per_reduction"]
        assert len(per_step) == 6 and len(set(per_step)) == 1 and per_step[0] > 2
        assert counts["allreduces"] == settle + 6 * per_step[0]


def _equivalence_files(tmp_path: Path) -> tuple[Path, Path]:
    """80 training rows. One process, batch 32: steps see rows [0,32), [32,64), [64,80) (a short last batch).
    Two processes, batch 8, K=2, shuffle none: rank 0 reads file rows 0..39, rank 1 rows 40..79, two
    micro-batches per step and a one-micro-batch last window. The second file permutes the rows so that every
    optimizer step of the 2-process run sees exactly the samples the 1-process run's step sees."""
    rng = np.random.default_rng(1)
    images = rng.normal(size=(80, 1, 4, 4)).astype(np.float32)
    labels = rng.integers(0, 3, size=80).astype(np.int64)
    val_images, val_labels = images[:16], labels[:16]
    order = np.r_[0:16, 32:48, 64:72, 16:32, 48:64, 72:80]  # file row -> sample of the 1-process order
    paths = []
    for name, rows in (("single.h5", np.arange(80)), ("pair.h5", order)):
        path = tmp_path / name
        write_h5(path, images[rows], labels[rows], group="train", chunk_rows=8)
        write_h5(path, val_images, val_labels, group="val", append_group=True)
        paths.append(path)
    return paths[0], paths[1]


def test_accumulation_equals_a_larger_batch(tmp_path):
    # Plain SGD: its update is proportional to the gradient, so a wrongly scaled accumulated gradient (a loss
    # not divided by the window's length, or by the wrong one) shows at full size; AdamW would hide it.
    single, pair = _equivalence_files(tmp_path)
    common = {"model.name": "mlp", "model.num_classes": 3, "data.shuffle": "none", "data.mean": "[0.0]",
              "data.std": "[1.0]", "train.epochs": 3, "optim.name": "sgd", "optim.momentum": 0.0,
              "optim.nesterov": "false", "optim.weight_decay": 0.0, "optim.lr": 0.5, "schedule.name": "constant",
              "train.deterministic": "true"}
    run(train_command(1, CONFIG, tiny_overrides(single, tmp_path, "one", **common, **{"train.batch_size": 32})))
    run(train_command(2, CONFIG, tiny_overrides(pair, tmp_path, "two", **common, **{
        "train.batch_size": 8, "train.accum_steps": 2})), timeout=180)
    one, two = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert one["step"] == two["step"] == 9  # 3 steps per epoch, the last one over 16 samples
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    cfg = load_config(CONFIG, tiny_overrides(single, tmp_path, "one", **common))
    distributed.seed_everything(cfg.run.seed)  # the initial weights, as train() builds them
    initial = build_model(cfg.model, example_input_shape=(1, 4, 4)).state_dict()
    moved = max((one["model"][k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-2, "the weights moved by far more than the tolerance above"


def test_sample_and_batch_transforms_reach_every_training_image(tiny_h5, tmp_path):
    # Flipping every training image upside down in the loader workers, on the device, or in the file itself
    # trains the same model, and not the model of the unflipped file.
    flipped = tmp_path / "flipped.h5"
    with h5py.File(tiny_h5, "r") as f:
        write_h5(flipped, f["train/images"][()][:, :, ::-1], f["train/labels"][()], group="train", chunk_rows=16)
        write_h5(flipped, f["val/images"][()], f["val/labels"][()], group="val", append_group=True)
    flip = "[{RandomVerticalFlip: {p: 1.0}}]"
    runs = {"file": (flipped, {}), "workers": (tiny_h5, {"data.sample_transforms": flip}),
            "device": (tiny_h5, {"data.batch_transforms": flip}), "unflipped": (tiny_h5, {})}
    for name, (path, extra) in runs.items():
        run(train_command(1, CONFIG, tiny_overrides(path, tmp_path, name, **{
            "data.num_workers": 2, "train.deterministic": "true", **extra})))
    states = {name: final_state(tmp_path / name)["model"] for name in runs}
    for name in ("workers", "device"):
        for key, value in states["file"].items():
            assert torch.equal(states[name][key], value), (name, key)
    assert any(not torch.equal(states["unflipped"][k], v) for k, v in states["file"].items())


def test_random_augmentation_resumes_exactly_and_ignores_the_worker_count(tiny_h5, tmp_path):
    # Random per-image flips in the loader workers, random crops and erasing on the device; 12 steps per epoch,
    # 3 epochs. Stopped mid-epoch 1 (step 17) and resumed with 2 workers; and uninterrupted with 0. Full shuffle:
    # chunk shuffle orders batches for the worker count on purpose (docs/data.md), the other modes do not.
    extra = {"train.epochs": 3, "data.shuffle": "full", "data.num_workers": 2, "data.persistent_workers": "false",
             "data.sample_transforms": "[{RandomHorizontalFlip: {p: 0.5}}]", "data.random_crop_padding": 1,
             "data.batch_transforms": "[{RandomErasing: {p: 0.5}}]"}
    run(train_command(1, CONFIG, tiny_overrides(tiny_h5, tmp_path, "whole", **extra)))
    resumed = tiny_overrides(tiny_h5, tmp_path, "resumed", **extra)
    run(train_command(1, CONFIG, [*resumed, "train.max_steps=17"]))
    run(train_command(1, CONFIG, resumed))
    run(train_command(1, CONFIG, tiny_overrides(tiny_h5, tmp_path, "no_workers", **{**extra,
                                                                                   "data.num_workers": 0})))
    run(train_command(1, CONFIG, tiny_overrides(tiny_h5, tmp_path, "unaugmented", **{"train.epochs": 3})))
    states = {name: final_state(tmp_path / name)["model"] for name in ("whole", "resumed", "no_workers",
                                                                         "unaugmented")}
    for name in ("resumed", "no_workers"):
        assert all(torch.equal(states[name][k], v) for k, v in states["whole"].items()), name
    assert any(not torch.equal(states["unaugmented"][k], v) for k, v in states["whole"].items())


def test_swa_average_is_the_mean_of_epoch_snapshots(tiny_h5, tmp_path):
    overrides = tiny_overrides(tiny_h5, tmp_path, "swa", **{
        "train.epochs": 4, "swa.enabled": "true", "swa.start": 2, "swa.lr": 0.02, "checkpoint.keep_last": 10})
    run(train_command(1, CONFIG, overrides))
    states = {s["epoch"]: s for s in checkpoints(tmp_path / "swa")}
    final = states[4]
    assert final["swa_n_averaged"] == 2
    for key, value in final["swa_model"].items():
        if "running" in key or "num_batches" in key:
            continue
        expected = (states[3]["model"][key].double() + states[4]["model"][key].double()) / 2
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7, msg=key)
    records = metrics(tmp_path / "swa")
    assert "swa_val_acc" not in records[1]
    assert all(isinstance(r["swa_val_acc"], float) for r in records[2:])
    assert (tmp_path / "swa" / "swa_model.pt").is_file()
    assert final["swa_scheduler"] is not None


def _float64_batchnorm_reference() -> dict:
    """Each BatchNorm's statistics over all rows at once in float64, layer by layer: every BatchNorm before it
    already normalizing with its own exact statistics, as in inference."""
    sys.path.insert(0, str(SCRIPTS))
    from bn_stats import images, model

    net = model().double().eval()
    x = (images().double() / 255 - 0.5) / 0.5  # data.prepare_images with the default mean/std
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        seen = []
        hook = bn.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
        with torch.no_grad():
            net(x)
        hook.remove()
        bn.running_mean.copy_(seen[0].mean((0, 2, 3)))
        bn.running_var.copy_(seen[0].var((0, 2, 3), unbiased=True))
    return {k: v for k, v in net.state_dict().items() if "running" in k}


def test_swa_batchnorm_statistics_are_exact_for_any_batch_size_and_world_size(tmp_path):
    batches = ["16", "64", "360"]  # 360 > 100 rows: one batch per rank
    results = {}
    for world in (1, 2, 3):  # 3 ranks: shards of 33/33/34 rows, batches of uneven size
        out = tmp_path / f"world{world}.pt"
        script = [str(SCRIPTS / "bn_stats.py"), str(out), *batches]
        run(torchrun_command(world, *script) if world > 1 else [sys.executable, *script], timeout=120)
        for batch, stats in torch.load(out, weights_only=True).items():
            results[(world, batch)] = stats
    reference = _float64_batchnorm_reference()
    assert len(reference) == 6 and all(stats.keys() == reference.keys() for stats in results.values())
    first = results[(1, 16)]
    for (world, batch), stats in results.items():
        for key in reference:
            torch.testing.assert_close(stats[key], first[key], rtol=1e-6, atol=1e-6, msg=f"{world} x {batch}: {key}")
            # float32 forward vs float64 forward: a few float32 ulps
            torch.testing.assert_close(stats[key].double(), reference[key], rtol=1e-5, atol=1e-6,
                                       msg=f"{world} x {batch} vs float64: {key}")
    # the statistics moved far from their initial (0, 1), by more than the tolerances above
    assert (reference["features.4.1.running_var"] - 1).abs().max() > 0.1


def test_amp_on_cpu(tiny_h5, tmp_path):
    runs = {"fp32": {}, "bf16": {"amp.enabled": "true", "amp.dtype": "bf16"},
            # overflows fp16 at first: the scaler must skip and back off
            "fp16": {"amp.enabled": "true", "amp.dtype": "fp16", "amp.init_scale": 2.0 ** 24}}
    for name, extra in runs.items():
        run([sys.executable, str(SCRIPTS / "output_dtypes.py"), str(CONFIG),
             *tiny_overrides(tiny_h5, tmp_path, name, **extra)])
    dtypes = {name: json.loads((tmp_path / name / "output_dtypes.json").read_text()) for name in runs}
    assert dtypes == {"fp32": ["torch.float32"], "bf16": ["torch.bfloat16"], "fp16": ["torch.float16"]}
    final = {name: final_state(tmp_path / name) for name in runs}
    for name in ("bf16", "fp16"):
        assert all(torch.isfinite(v).all() for v in final[name]["model"].values() if v.is_floating_point())
        assert any(not torch.equal(v, final["fp32"]["model"][k]) for k, v in final[name]["model"].items()), name
        assert metrics(tmp_path / name)[-1]["val_acc"] >= 0.9  # learns as fp32 does (1.0 here); chance is 0.25
    assert final["fp16"]["scaler"] is not None and final["fp16"]["scaler"]["scale"] < 2.0 ** 24
    assert metrics(tmp_path / "fp16")[-1]["skipped_scaler_steps"] >= 1
    assert final["bf16"]["scaler"] is None and metrics(tmp_path / "bf16")[-1]["skipped_scaler_steps"] == 0


def _file_with_nan(tmp_path: Path, bad_row: int) -> Path:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(96, 1, 8, 8)).astype(np.float32)
    images[bad_row, 0, 0, 0] = np.nan
    labels = rng.integers(0, 4, size=96).astype(np.int64)
    path = tmp_path / "nan.h5"
    write_h5(path, images, labels, group="train", chunk_rows=16)
    write_h5(path, images[:32] * 0, labels[:32], group="val", append_group=True)
    return path


# 96 rows, batches of 8, shuffle none; (processes, row holding the NaN) -> where it shows. One process: row 60
# is in batch 8 -> optimizer step 8 of 12. Two processes: rank 0 reads rows 0..47, rank 1 rows 48..95; rows 12
# and 60 are in the 2nd batch of rank 0 and rank 1 -> step 2 of 6, seen by that rank only.
NAN_CASES = {(1, 60): {"steps_per_epoch": 12, "bad_step": 8, "rank": 0},
             (2, 12): {"steps_per_epoch": 6, "bad_step": 2, "rank": 0},
             (2, 60): {"steps_per_epoch": 6, "bad_step": 2, "rank": 1}}


@pytest.mark.parametrize("nproc, bad_row", NAN_CASES)
def test_nonfinite_loss_is_skipped_by_every_rank(tmp_path, nproc, bad_row):
    path = _file_with_nan(tmp_path, bad_row)
    overrides = tiny_overrides(path, tmp_path, "skip", **{"data.shuffle": "none", "data.mean": "[0.0]",
                                                         "data.std": "[1.0]", "train.batch_size": 8})
    run(train_command(nproc, CONFIG, overrides), timeout=180)
    records = metrics(tmp_path / "skip")
    assert [r["skipped_nonfinite_steps"] for r in records] == [1, 2]  # once per epoch, counted cumulatively
    assert records[-1]["step"] == 2 * NAN_CASES[nproc, bad_row]["steps_per_epoch"]
    assert all(torch.isfinite(v).all() for v in final_state(tmp_path / "skip")["model"].values()
               if v.is_floating_point())


def test_skip_counters_survive_a_resume(tmp_path):
    # One process, row 60 -> step 8 of each 12-step epoch is skipped; fp16 with an init scale that overflows
    # makes the scaler skip its first steps. Stopped after step 14 (past a skip of each kind), then resumed.
    path = _file_with_nan(tmp_path, 60)
    common = {"data.shuffle": "none", "data.mean": "[0.0]", "data.std": "[1.0]", "train.batch_size": 8,
              "amp.enabled": "true", "amp.dtype": "fp16", "amp.init_scale": 2.0 ** 40}
    run(train_command(1, CONFIG, tiny_overrides(path, tmp_path, "whole", **common)))
    resumed = tiny_overrides(path, tmp_path, "resumed", **common)
    run(train_command(1, CONFIG, [*resumed, "train.max_steps=14"]))
    assert final_state(tmp_path / "resumed")["skipped_steps"]["nonfinite"] == 1
    run(train_command(1, CONFIG, resumed))
    whole, after = metrics(tmp_path / "whole")[-1], metrics(tmp_path / "resumed")[-1]
    assert whole["skipped_nonfinite_steps"] == after["skipped_nonfinite_steps"] == 2
    assert whole["skipped_scaler_steps"] == after["skipped_scaler_steps"] >= 1
    assert final_state(tmp_path / "resumed")["skipped_steps"] == {"nonfinite": 2,
                                                                  "scaler": whole["skipped_scaler_steps"]}


@pytest.mark.parametrize("nproc, bad_row", NAN_CASES)
def test_nonfinite_loss_stop_checkpoints_and_names_step_and_rank(tmp_path, nproc, bad_row):
    path = _file_with_nan(tmp_path, bad_row)
    overrides = tiny_overrides(path, tmp_path, "stop", **{"data.shuffle": "none", "data.mean": "[0.0]",
                                                         "data.std": "[1.0]", "train.batch_size": 8,
                                                         "train.on_nonfinite": "stop"})
    out = run(train_command(nproc, CONFIG, overrides), timeout=180, check=False)
    case = NAN_CASES[nproc, bad_row]
    assert out.returncode != 0
    assert f"non-finite loss in optimizer step {case['bad_step']} (epoch 0) on rank {case['rank']}" in out.stdout
    state = final_state(tmp_path / "stop")  # the last good state: the step before the bad batch
    assert state["step"] == case["bad_step"] - 1 and state["batches_in_epoch"] == case["bad_step"] - 1
    # BatchNorm's running statistics included: the bad forward wrote NaN into them before the check saw it.
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_compile_in_three_processes_resumes_exactly_and_keeps_checkpoints_clean(tiny_h5, tmp_path):
    overrides = tiny_overrides(tiny_h5, tmp_path, "compiled", **{
        "model.name": "mlp", "compile.enabled": "true", "train.epochs": 2, "train.batch_size": 4})
    command = [sys.executable, "-m", "ddp_kit.cli", "verify-resume", "--config", str(CONFIG), "--nproc", "3",
               "--timeout", "400", *overrides]
    out = run(command, timeout=1200).stdout
    assert "(torch.compile's compilation included)" in out
    report = json.loads(out[out.rindex("{\n"):])
    assert report["identical"] is True and report["final_step"] == 16  # 96 rows / 3 / batch 4 = 8 per epoch
    state = final_state(tmp_path / "compiled-verify-full")
    assert not any("_orig_mod" in k or k.startswith("module.") for k in state["model"])
    assert metrics(tmp_path / "compiled-verify-full")[-1]["val_acc"] >= 0.9  # as without compile; chance is 0.25