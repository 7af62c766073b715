"""`ddp-kit verify-resume` checks its arguments against the config and the data before anything trains."""

from __future__ import annotations

import sys

import pytest
import torch

from runs import tiny_overrides
from ddp_kit import cli
from ddp_kit.config import load_config, step_counts
from ddp_kit.data import train_batches_per_epoch
from procs import REPO, run

CONFIG = REPO / "configs" / "digits.yaml"


def verify(capfd, tiny_h5, tmp_path, *args, **extra):
    """verify-resume in this process (with tiny_overrides: 96 rows, batch 8, 2 epochs); (exit code, stderr)."""
    code = cli.main(["verify-resume", "--config", str(CONFIG), "--timeout", "60", *args,
                     *tiny_overrides(tiny_h5, tmp_path, **extra)])
    return code, capfd.readouterr().err


def test_stop_after_beyond_the_run_is_refused_before_anything_runs(tiny_h5, tmp_path):
    command = [sys.executable, "-m", "ddp_kit.cli", "verify-resume", "--config", str(CONFIG), "--nproc", "1",
               "--stop-after", "40", *tiny_overrides(tiny_h5, tmp_path)]
    out = run(command, timeout=120, check=False)
    assert out.returncode == 1
    # 96 rows / batch 8 = 12 optimizer steps per epoch, 2 epochs
    assert out.stdout.splitlines() == [
        f"ddp-kit: error: --stop-after=40: must be between 1 and 23: {CONFIG} with 1 process(es) runs 24 "
        "optimizer step(s) (12 per epoch x 2 epochs)"]
    assert list(tmp_path.iterdir()) == []  # neither run directory was created


@pytest.mark.parametrize("args, extra, message", [
    (["--nproc", "0"], {}, "--nproc=0: must be >= 1"),
    (["--timeout", "0"], {}, "--timeout=0.0: must be > 0"),
    (["--nproc", "1", "--stop-after", "0"], {}, "--stop-after=0: must be between 1 and 23"),
    (["--nproc", "1", "--stop-after", "24"], {}, "--stop-after=24: must be between 1 and 23"),
    (["--nproc", "2", "--stop-after", "12"], {}, "--stop-after=12: must be between 1 and 11"),
    (["--nproc", "1", "--stop-after", "5"], {"train.max_steps": 5},
     "--stop-after=5: must be between 1 and 4: "),
    (["--nproc", "1"], {"train.max_steps": 1}, "runs 1 optimizer step(s) (12 per epoch x 2 epochs, stopped by "
                                                "train.max_steps=1): too few to stop in between"),
    (["--nproc", "1", "--resume-nproc", "0"], {}, "--resume-nproc=0: must be >= 1"),
    (["--nproc", "2", "--resume-nproc", "3"], {}, "--resume-nproc=3: no train.batch_size x train.accum_steps on 3 "
                                                  "process(es) makes the global batch 16 (2 process(es) x "
                                                  "train.batch_size 8 x train.accum_steps 1); pick a number of "
                                                  "processes that divides 16"),
    (["--nproc", "1", "--rtol", "-1"], {}, "--rtol=-1.0 --atol=1e-05: must both be >= 0"),
])
def test_impossible_arguments_are_one_line_errors(capfd, tiny_h5, tmp_path, args, extra, message):
    code, err = verify(capfd, tiny_h5, tmp_path, *args, **extra)
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith("ddp-kit: error: ") and message in err
    assert list(tmp_path.iterdir()) == []


def test_an_error_line_reaches_the_shared_stream_in_one_write(monkeypatch, tiny_h5, tmp_path):
    # the ranks of a job share one unbuffered stream: a line written in two parts can fuse with another rank's
    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

        def fileno(self):  # torchrun's error handler installs its fault handler on the real stream
            return sys.__stderr__.fileno()

    monkeypatch.setattr(sys, "stderr", Recorder())
    code = cli.main(["verify-resume", "--config", str(CONFIG), "--nproc", "0", *tiny_overrides(tiny_h5, tmp_path)])
    assert code == 1 and writes == ["ddp-kit: error: --nproc=0: must be >= 1\n"]


@pytest.mark.parametrize("cuda_devices, device, nproc, last_step", [(0, "auto", 1, 24), (2, "auto", 2, 12),
                                                                    (3, "cpu", 1, 24)])
def test_nproc_defaults_to_one_process_per_visible_gpu(capfd, monkeypatch, tiny_h5, tmp_path, cuda_devices, device,
                                                       nproc, last_step):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    code, err = verify(capfd, tiny_h5, tmp_path, "--stop-after", "99", **{"distributed.device": device})
    assert code == 1 and f"with {nproc} process(es) runs {last_step} optimizer step(s)" in err


@pytest.mark.parametrize("world, batch, accum, drop_last, epochs, max_steps, expected", [
    (1, 8, 1, "false", 2, "null", (12, 12, 24, 24)),
    (3, 8, 3, "false", 2, "null", (4, 2, 4, 4)),  # 32 rows per rank; a short last window still steps
    (5, 8, 1, "true", 3, "null", (2, 2, 6, 6)),  # 96 // 40 global batches
    (5, 8, 2, "false", 3, 5, (3, 2, 6, 5)),  # ceil(96 / 5) = 20 rows per rank, padded
    (4, 7, 4, "false", 2, "null", (4, 1, 2, 2)),
])
def test_step_counts_from_the_file_metadata(tiny_h5, tmp_path, world, batch, accum, drop_last, epochs, max_steps,
                                            expected):
    cfg = load_config(CONFIG, tiny_overrides(tiny_h5, tmp_path, **{
        "train.batch_size": batch, "train.accum_steps": accum, "data.drop_last": drop_last, "train.epochs": epochs,
        "train.max_steps": max_steps}))
    steps = step_counts(cfg.train, train_batches_per_epoch(cfg.data, batch_size=batch, world_size=world))
    assert (steps.micro_per_epoch, steps.per_epoch, steps.total, steps.final) == expected


def test_states_compare_exactly_or_within_a_tolerance_leaving_out_what_is_asked():
    from ddp_kit.verify import RANK0_STATISTICS, compare_states, max_difference

    a = {"model": {"w": torch.tensor([1.0, 2.0]), "bn.running_mean": torch.zeros(2)}, "step": 8,
         "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2)}}}}
    b = {"model": {"w": torch.tensor([1.0, 2.0 + 1e-6]), "bn.running_mean": torch.ones(2)}, "step": 8,
         "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2)}, 1: {"momentum_buffer": torch.ones(1)}}}}
    assert compare_states(a, a) == []
    assert compare_states(a, b) == ["model.bn.running_mean: max abs difference 1",
                                    "model.w: max abs difference 9.54e-07",
                                    "optimizer.state.1.momentum_buffer: only in one run"]
    within = compare_states(a, b, tolerance=(1e-4, 1e-5), left_out=RANK0_STATISTICS)
    assert within == ["optimizer.state.1.momentum_buffer: only in one run"]
    assert compare_states(a, {**a, "step": 9}, tolerance=(1e-4, 1e-5)) == ["step: 8 != 9"]  # counts stay exact
    assert max_difference(a, b) == 1.0
    assert max_difference(a, b, left_out=RANK0_STATISTICS) == pytest.approx(9.54e-7, rel=1e-2)
