"""The toolkit with a user's own model and objective: from Python (ddp_kit.train(cfg, model=, objective=)) and
from YAML import paths, through DDP, resume, evaluate and the errors that must come before any training."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from procs import run, torchrun_command, train_command
from runs import final_model, metrics, tiny_overrides

import ddp_kit
from ddp_kit.distributed import seed_everything
from user_code import TwoHeads, WithUnusedHead, margin

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "digits.yaml"
SCRIPTS = Path(__file__).parent / "scripts"
# the subprocesses import user_code as a user's package would be imported: from the path
USER_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
USER_MODEL = {"model.name": "user_code:TwoHeads", "model.kwargs": "{pixels: 64, classes: 4}"}
BEST_AUTO = {"checkpoint.best_metric": "auto"}  # digits.yaml keeps the best by val_acc, a classifier's metric


def _evaluate(nproc: int, checkpoint: Path, overrides: list[str]) -> dict:
    command = train_command(nproc, CONFIG, overrides)
    command[command.index("train")] = "evaluate"
    command[command.index("--config"):command.index("--config")] = ["--checkpoint", str(checkpoint)]
    out = run(command, timeout=120, env=USER_ENV).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def test_python_api_trains_a_user_model_and_objective_and_keeps_the_best_by_its_metric(tiny_h5, tmp_path):
    overrides = tiny_overrides(tiny_h5, tmp_path, "api", **BEST_AUTO, **{"train.epochs": 3, "optim.lr": 0.1,
                                                                         "checkpoint.keep_last": 1,
                                                                         "data.num_workers": 1})
    run(torchrun_command(2, str(SCRIPTS / "user_train.py"), str(CONFIG), *overrides), timeout=150, env=USER_ENV)
    records = metrics(tmp_path / "api")
    assert [set(r) >= {"val_margin", "val_hits", "samples_per_s"} for r in records] == [True] * 3
    assert "val_acc" not in records[0]  # the objective's metrics, not the built-in classifier's
    result = json.loads((tmp_path / "api" / "result.json").read_text())
    assert result["status"] == "completed" and result["val_hits"] == records[-1]["val_hits"] >= 0.9
    # DDP (and the process group its reducer holds) went with train(), not at the interpreter's exit
    assert result["ddp_alive"] == 0
    # the loader workers forked from a trainer with no HDF5 file open (the probe batch's handle closed)
    assert result["data_file_descriptors"] == 0
    # keep_last=1 keeps the final checkpoint, the newest periodic one, and the best by the objective's choice:
    # val_hits, max, the earliest on a tie
    steps = [r["step"] for r in records]
    first_best = steps[[r["val_hits"] for r in records].index(max(r["val_hits"] for r in records))]
    kept = sorted(int(p.stem[len("ckpt_step"):]) for p in (tmp_path / "api" / "checkpoints").glob("ckpt_step*.pt"))
    assert first_best not in steps[-2:] and kept == sorted({first_best, *steps[-2:]})
    # the same weights score the same through the Python API in this process (one rank) as in training (two)
    cfg = ddp_kit.load_config(CONFIG, [*overrides, "distributed.device=cpu"])
    single = ddp_kit.evaluate_checkpoint(cfg, tmp_path / "api" / "model.pt", model=TwoHeads(64, 4), objective=margin)
    assert round(single["val_hits"] * 40) == round(records[-1]["val_hits"] * 40)
    assert single["val_margin"] == pytest.approx(records[-1]["val_margin"], rel=1e-6)


def test_yaml_import_paths_resume_exactly_at_three_processes_and_evaluate_alike(tiny_h5, tmp_path):
    overrides = tiny_overrides(tiny_h5, tmp_path, "paths", **USER_MODEL, **BEST_AUTO, **{
        "objective.name": "user_code:margin", "train.epochs": 2, "data.num_workers": 2, "train.batch_size": 4})
    # 96 rows / 3 ranks / batch 4 = 8 steps per epoch: stopped mid-epoch, resumed with worker-ordered batches
    command = [sys.executable, "-m", "ddp_kit.cli", "verify-resume", "--config", str(CONFIG), "--nproc", "3",
               "--stop-after", "11", "--timeout", "120", *overrides]
    out = run(command, timeout=300, env=USER_ENV).stdout
    report = json.loads(out[out.rindex("{\n"):])
    assert report["identical"] is True and report["final_step"] == 16 and report["stopped_at_step"] == 11
    record = metrics(tmp_path / "paths-verify-full")[-1]
    checkpoint = tmp_path / "paths-verify-full" / "model.pt"
    for nproc in (1, 2):
        result = _evaluate(nproc, checkpoint, overrides)
        assert result["world_size"] == nproc and set(result) == {"val_margin", "val_hits", "world_size"}
        assert round(result["val_hits"] * 40) == round(record["val_hits"] * 40)
        assert result["val_margin"] == pytest.approx(record["val_margin"], rel=1e-6)


@pytest.mark.parametrize("extra, fragment", [
    ({"model.name": "user_code:TwoHead"}, "model.name='user_code:TwoHead': user_code has no attribute 'TwoHead'; "
                                         "did you mean 'TwoHeads'?"),
    ({**USER_MODEL, **BEST_AUTO, "objective.name": "user_code:non_scalar"},
     "the loss function non_scalar_loss returned a tensor of shape (8,), not a scalar"),
    ({**USER_MODEL, "objective.name": "classification"}, "output_key"),
    ({**USER_MODEL, "model.inputs": "[image, mask]"}, "the batch has no field 'mask'"),
])
def test_a_user_model_or_objective_that_cannot_work_fails_before_training(tiny_h5, tmp_path, extra, fragment):
    out = run(train_command(1, CONFIG, tiny_overrides(tiny_h5, tmp_path, "bad", **extra)), timeout=60,
              env=USER_ENV, check=False)
    assert out.returncode == 1 and fragment in out.stdout, out.stdout[-3000:]
    assert "Traceback" not in out.stdout and not (tmp_path / "bad" / "checkpoints").exists()


def test_unused_parameters_name_the_ddp_option_and_train_with_it(tiny_h5, tmp_path):
    unused = {"model.name": "user_code:WithUnusedHead", "model.kwargs": "{pixels: 64, classes: 4}",
              "objective.name": "user_code:margin", **BEST_AUTO}
    out = run(train_command(2, CONFIG, tiny_overrides(tiny_h5, tmp_path, "unused", **unused)), timeout=90,
              env=USER_ENV, check=False)
    assert out.returncode != 0
    assert "unused.weight, unused.bias" in out.stdout and "distributed.find_unused_parameters=true" in out.stdout
    run(train_command(2, CONFIG, tiny_overrides(tiny_h5, tmp_path, "found", **unused,
                                                **{"distributed.find_unused_parameters": "true"})),
        timeout=90, env=USER_ENV)
    weights = final_model(tmp_path / "found")
    cfg = ddp_kit.load_config(CONFIG, tiny_overrides(tiny_h5, tmp_path, "found"))
    seed_everything(cfg.run.seed)  # as train() seeds every rank before it builds the model
    initial = WithUnusedHead(64, 4).state_dict()
    assert torch.equal(weights["unused.weight"], initial["unused.weight"])  # no gradient, no step: as built
    assert not torch.equal(weights["logits.weight"], initial["logits.weight"])
    assert metrics(tmp_path / "found")[-1]["val_hits"] >= 0.9
