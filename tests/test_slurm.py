"""The slurm/ batch scripts.

Part 1 runs the scripts with bash outside SLURM, with stand-in `srun` and `scontrol` commands that record how
they were called: allocation checks, the launch command lines, signal forwarding and requeue. Fast, no root.

Part 2 runs them under a real single-node SLURM (tests/slurm_cluster.py) with the digits demo on CPU: a full
run, a run preempted with USR2 that requeues itself, resumes and ends bit-identical to the full run, and a
signal that arrives before training started. tests/test_slurm_two_nodes.py runs them on two nodes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from runs import final_model, metrics, tiny_overrides
from slurm_cluster import FINISHED, slurm  # noqa: F401  (session fixture)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)

# ---------------------------------------------------------------------------------------------------------
# Part 1: the scripts' logic with stand-in SLURM commands.

FAKE_SRUN = r"""#!/bin/bash
# Records its arguments and the environment it was started with; then behaves as FAKE_SRUN asks.
python3 - "$@" <<'EOF' >> "$FAKE_LOG"
import json, os, sys
print(json.dumps({"cmd": "srun", "args": sys.argv[1:],
                  "env": {k: os.environ.get(k) for k in ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "MASTER_ADDR",
                                                         "MASTER_PORT", "SRUN_CPUS_PER_TASK")}}))
EOF
case "$FAKE_SRUN" in
exit:*) exit "${FAKE_SRUN#exit:}" ;;
wait)   # stands for training: on USR2, write the marker like rank 0 does, and exit 0
    trap 'echo "{\"cmd\": \"srun-got-USR2\"}" >> "$FAKE_LOG"; mkdir -p "${FAKE_MARKER%/*}"; echo "{\"step\": 7}" > "$FAKE_MARKER"; exit 0' USR2
    echo started > "$FAKE_LOG.started"
    for _ in $(seq 600); do sleep 0.1; done
    exit 99 ;;
esac
"""

FAKE_SCONTROL = r"""#!/bin/bash
echo "{\"cmd\": \"scontrol\", \"args\": \"$*\"}" >> "$FAKE_LOG"
case "$1 $2" in
"show hostnames") tr ',' '\n' <<<"$3" ;;
esac
"""


@pytest.fixture
def fake(tmp_path):
    """A repository root with a config, and a PATH whose srun/scontrol are stand-ins."""
    root = tmp_path / "root"
    (root / "launch").mkdir(parents=True)
    (root / "launch" / "train.py").write_text("")
    (root / "slurm").symlink_to(REPO / "slurm")
    (root / "c.yaml").write_text(f"run: {{name: exp, output_dir: runs}}\n"
                                 f"data: {{path: {tmp_path / 'd.h5'}, create_if_missing: digits}}\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    marker = root / "runs" / "exp" / "REQUEUE"

    class Fake:
        pass

    f = Fake()
    f.root, f.log, f.marker = root, log, marker
    f.env = {
        "PATH": f"{bin_dir}:{VENV_BIN}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "DDP_KIT_ROOT": str(root),
        "FAKE_LOG": str(log),
        "FAKE_MARKER": str(marker),
        "FAKE_SRUN": "exit:0",
        "SLURM_JOB_ID": "123",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_CPUS_PER_TASK": "3",
    }

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def run(script="multinode.sbatch", args=("c.yaml", "train.epochs=1"), **env):
        return subprocess.run(["bash", str(REPO / "slurm" / script), *args], cwd=root,
                              env={**f.env, **{k: str(v) for k, v in env.items()}},
                              capture_output=True, text=True, timeout=60)

    f.calls, f.run = calls, run
    return f


def _srun(fake) -> dict:
    calls = [c for c in fake.calls() if c["cmd"] == "srun"]
    assert len(calls) == 1, fake.calls()
    return calls[0]


def test_torchrun_command_on_gpu_nodes(fake):
    out = fake.run(SLURM_JOB_NUM_NODES=2, SLURM_NTASKS=2, SLURM_JOB_NODELIST="gpu1,gpu2", SLURM_GPUS_ON_NODE=4)
    assert out.returncode == 0, out.stderr
    srun = _srun(fake)
    args = srun["args"]
    assert args[:3] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    torchrun = args[args.index("torchrun"):]
    assert torchrun == ["torchrun", "--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d",
                        "--rdzv-endpoint=gpu1:20123", "--rdzv-id=123", "--max-restarts=2",
                        "launch/train.py", "--config", "c.yaml", "train.epochs=1"]
    # torchrun is started with USR1/USR2 ignored, or srun's forwarded signal would kill it.
    assert 'trap "" USR1 USR2' in " ".join(args)
    assert srun["env"]["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert srun["env"]["SRUN_CPUS_PER_TASK"] == "3"
    assert "2 node(s) [gpu1,gpu2], 4 process(es) per node (4 GPU(s) per node)" in out.stdout


def test_cpu_job_runs_one_process_per_cpu_and_options_apply(fake):
    out = fake.run(MAX_RESTARTS=0, RDZV_PORT=29999)
    assert out.returncode == 0, out.stderr
    torchrun = " ".join(_srun(fake)["args"])
    assert "--nnodes=1 --nproc-per-node=3 " in torchrun
    assert "--rdzv-endpoint=node1:29999" in torchrun and "--max-restarts=0" in torchrun
    assert "CPU job" in out.stdout
    fake.log.unlink()
    assert fake.run(NPROC_PER_NODE=2).returncode == 0
    assert "--nproc-per-node=2 " in " ".join(_srun(fake)["args"])


def test_gpus_per_node_read_from_typed_request(fake):
    out = fake.run(SLURM_GPUS_PER_NODE="a100:8")
    assert out.returncode == 0, out.stderr
    assert "--nproc-per-node=8 " in " ".join(_srun(fake)["args"])


@pytest.mark.parametrize("env, message", [
    (dict(SLURM_JOB_NUM_NODES=2, SLURM_NTASKS=8, SLURM_GPUS_ON_NODE=4),
     "runs one task per node (each starts one process per GPU), but this allocation has 8 tasks on 2 node(s)"),
    (dict(SLURM_GPUS_ON_NODE=2, NPROC_PER_NODE=4), "NPROC_PER_NODE=4 but only 2 GPU(s) per node"),
    (dict(LAUNCHER="srun", SLURM_JOB_NUM_NODES=2, SLURM_NTASKS=6, SLURM_GPUS_ON_NODE=4),
     "runs one task per GPU, but this allocation has 6 tasks for 2 node(s) x 4 GPU(s). "
     "Submit with --ntasks-per-node=4"),
    (dict(LAUNCHER="mpirun"), "LAUNCHER must be torchrun or srun"),
])
def test_allocation_mismatch_fails_before_launch(fake, env, message):
    out = fake.run(**env)
    assert out.returncode == 2
    assert message in out.stderr.replace("\n", " ")
    assert not [c for c in fake.calls() if c["cmd"] == "srun"]


def test_srun_launcher_exports_rendezvous_for_the_runtime(fake):
    out = fake.run(LAUNCHER="srun", SLURM_JOB_NUM_NODES=2, SLURM_NTASKS=8, SLURM_GPUS_ON_NODE=4,
                   SLURM_JOB_NODELIST="gpu7,gpu8", SLURM_JOB_CPUS_PER_NODE="16,10")
    assert out.returncode == 0, out.stderr
    srun = _srun(fake)
    assert srun["args"] == ["--kill-on-bad-exit=1", "python", "launch/train.py", "--config", "c.yaml",
                            "train.epochs=1"]
    assert srun["env"]["MASTER_ADDR"] == "gpu7" and srun["env"]["MASTER_PORT"] == "20123"
    # Each task's CPUs: the smaller node's 10 shared by its 4 tasks, not the batch step's --cpus-per-task (3).
    assert srun["env"]["SRUN_CPUS_PER_TASK"] == "2"
    assert "launcher srun (2 CPU(s) per task: 10 per node / 4 tasks)" in out.stdout


def test_usage_and_missing_files_are_clear_errors(fake, tmp_path):
    out = fake.run(args=())
    assert out.returncode == 2 and "usage:" in out.stderr
    out = fake.run(args=("nope.yaml",))
    assert out.returncode == 2 and "config file nope.yaml not found" in out.stderr
    out = fake.run(args=("c.yaml", "train.epoch=1"))
    assert out.returncode == 2 and "train.epoch" in out.stderr
    out = fake.run(DDP_KIT_ROOT=tmp_path)
    assert out.returncode == 2 and "submit from the ddp_kit repository root" in out.stderr


def test_train_sbatch_is_one_node(fake):
    out = fake.run("train.sbatch", SLURM_JOB_NUM_NODES=2, SLURM_NTASKS=2)
    assert out.returncode == 2 and "use slurm/multinode.sbatch" in out.stderr
    out = fake.run("train.sbatch")
    assert out.returncode == 0, out.stderr
    assert "--nnodes=1 --nproc-per-node=3 " in " ".join(_srun(fake)["args"])


def test_exit_code_of_the_step_is_the_jobs_without_marker(fake):
    out = fake.run(FAKE_SRUN="exit:3")
    assert out.returncode == 3
    assert not [c for c in fake.calls() if c["cmd"] == "scontrol" and c["args"].startswith("requeue")]


def test_stale_marker_is_removed_before_launch(fake):
    fake.marker.parent.mkdir(parents=True)
    fake.marker.write_text("{}")
    out = fake.run()
    assert out.returncode == 0
    assert not fake.marker.exists()
    assert not [c for c in fake.calls() if c["cmd"] == "scontrol" and c["args"].startswith("requeue")]


@pytest.mark.parametrize("script", ["multinode.sbatch", "train.sbatch"])
def test_usr2_is_forwarded_and_the_marker_requeues(fake, script):
    proc = subprocess.Popen(["bash", str(REPO / "slurm" / script), "c.yaml"], cwd=fake.root,
                            env={**fake.env, "FAKE_SRUN": "wait"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        started = Path(str(fake.log) + ".started")
        end = time.monotonic() + 30
        while not started.exists() and time.monotonic() < end:
            time.sleep(0.05)
        assert started.exists(), "the stand-in srun did not start"
        proc.send_signal(signal.SIGUSR2)  # what SLURM sends the batch shell (--signal=B:USR2@...)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    cmds = [c["cmd"] + " " + str(c.get("args", "")) for c in fake.calls()]
    assert any(c.startswith("srun-got-USR2") for c in cmds), cmds
    assert "scontrol requeue 123" in cmds
    assert "received SIGUSR2; passing it on" in out and "job 123 requeued" in out
    assert not fake.marker.exists()  # removed, so a crash of the next run cannot requeue it again


# ---------------------------------------------------------------------------------------------------------
# Part 2: under a real SLURM, with the digits demo on CPU.

# Small and fast, with periodic checkpoints so a preempted run has something to resume from.
OVERRIDES = ["train.epochs=2", "checkpoint.every_steps=5", "data.num_workers=1", "train.record_sample_ids=true"]




def _submit(slurm, work: Path, name: str, *extra: str) -> str:  # noqa: F811
    return slurm.sbatch(["--gpus-per-node=0", "--cpus-per-task=2", "--time=10", f"--job-name={name}",
                         f"--output={work}/%x-%j.out",
                         str(REPO / "slurm" / "train.sbatch"), str(REPO / "configs" / "digits.yaml"),
                         f"run.output_dir={work / 'runs'}", f"run.name={name}", f"data.path={work / 'digits.h5'}",
                         *OVERRIDES, *extra],
                        cwd=REPO, env={"PATH": f"{VENV_BIN}:{os.environ['PATH']}"})



@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm_runs")


@pytest.fixture(scope="module")
def full_run(slurm, work):  # noqa: F811
    """An uninterrupted sbatch run: what test 1 checks and test 2 compares with."""
    job = _submit(slurm, work, "full")
    info = slurm.wait_state(job, FINISHED, timeout=300)
    return job, info, work / "runs" / "full"


@pytest.mark.slow
@pytest.mark.slurm
def test_sbatch_trains_digits(slurm, full_run):  # noqa: F811
    job, info, run_dir = full_run
    log = slurm.output(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "0"
    epochs = metrics(run_dir)
    epochs = [r for r in epochs if "val_acc" in r]
    assert [r["epoch"] for r in epochs] == [0, 1], log
    assert epochs[-1]["val_acc"] > 0.5
    assert (run_dir / "model.pt").exists() and (run_dir / "checkpoints").is_dir()
    assert not (run_dir / "REQUEUE").exists()
    assert "launcher torchrun" in log and "2 process(es) per node (CPU job)" in log


@pytest.mark.slow
@pytest.mark.slurm
def test_usr2_preempts_requeues_and_resumes_bit_identical(slurm, full_run, work):  # noqa: F811
    job = _submit(slurm, work, "preempted")
    run_dir = work / "runs" / "preempted"
    ledger = run_dir / "samples" / "rank0.jsonl"
    # Signal mid-epoch, between two periodic checkpoints (epoch 0 has 23 steps, one every 5 is saved).
    end = time.monotonic() + 180
    while time.monotonic() < end:
        lines = ledger.read_text().splitlines() if ledger.exists() else []
        if lines and json.loads(lines[-1])["step"] >= 7:
            break
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), slurm.output(job)
        time.sleep(0.05)
    else:
        pytest.fail(f"training did not reach step 7 within 180 s:\n{slurm.output(job)}")
    slurm.cmd(["scancel", "--signal=USR2", "--batch", job])  # as #SBATCH --signal=B:USR2@... would
    info = slurm.wait_state(job, {"PENDING", *FINISHED}, timeout=120)
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", slurm.output(job)
    slurm.release(job)
    info = slurm.wait_state(job, FINISHED, timeout=300)
    log = slurm.output(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "1", log
    assert "received SIGUSR2; passing it on" in log and f"job {job} requeued" in log
    assert "(restart 1)" in log
    stopped = json.loads(re.search(r"requeue marker \S+ found: (\{.*\})", log).group(1))["step"]
    assert re.search(rf"resumed from \S+ at epoch 0, step {stopped}\b", log), log
    assert not (run_dir / "REQUEUE").exists()
    # Nothing redone: every micro-batch of every rank was recorded once, across both runs of the job.
    for rank in (0, 1):
        keys = [(r["epoch"], r["step"], r["micro"]) for r in map(json.loads, (run_dir / "samples" / f"rank{rank}.jsonl")
                                                                 .read_text().splitlines())]
        assert len(keys) == len(set(keys)) == 46
    reference = final_model(full_run[2])
    resumed = final_model(run_dir)
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key


@pytest.mark.slurm
def test_allocation_mismatch_fails_fast_under_slurm(slurm, work):  # noqa: F811
    job = slurm.sbatch(["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--job-name=mismatch",
                        f"--output={work}/%x-%j.out",
                        str(REPO / "slurm" / "train.sbatch"), str(REPO / "configs" / "digits.yaml")],
                       cwd=REPO, env={"PATH": f"{VENV_BIN}:{os.environ['PATH']}"})
    info = slurm.wait_state(job, FINISHED, timeout=60)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0"
    assert "Submit with --ntasks-per-node=1" in slurm.output(job)


# Stands in for `python` in the batch script: `python -m ddp_kit.preemption`, the script's last command before
# it starts training, waits at a gate the test opens, so the test can signal the batch shell at that point.
GATED_PYTHON = r"""#!/bin/bash
if [ "$1 $2" = "-m ddp_kit.preemption" ] && [ ! -e "$GATE.open" ]; then
    touch "$GATE.waiting"
    for _ in $(seq 1200); do [ -e "$GATE.open" ] && break; sleep 0.1; done
fi
exec "$REAL_PYTHON" "$@"
"""


@pytest.mark.slurm
def test_signal_before_training_requeues_without_starting(slurm, work, tiny_h5):  # noqa: F811
    bin_dir, gate = work / "gated_bin", work / "gate"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(GATED_PYTHON)
    (bin_dir / "python").chmod(0o755)
    name = "early"
    job = slurm.sbatch(["--gpus-per-node=0", "--cpus-per-task=2", "--time=10", f"--job-name={name}",
                        f"--output={work}/%x-%j.out", str(REPO / "slurm" / "train.sbatch"),
                        str(REPO / "configs" / "digits.yaml"),
                        *tiny_overrides(tiny_h5, work / "runs", name, **{"train.epochs": 1})],
                       cwd=REPO, env={"PATH": f"{bin_dir}:{VENV_BIN}:{os.environ['PATH']}", "GATE": str(gate),
                                      "REAL_PYTHON": sys.executable})
    end = time.monotonic() + 120
    while not Path(f"{gate}.waiting").exists():
        assert time.monotonic() < end and slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), slurm.output(job)
        time.sleep(0.1)
    slurm.cmd(["scancel", "--signal=USR2", "--batch", job])
    # slurmstepd has sent it to the batch shell, which is waiting for the gated command: its trap runs after.
    slurm.wait_for_log(rf"sent signal 12 to pid \d+ StepId={job}\.batch", timeout=60)
    Path(f"{gate}.open").touch()
    info = slurm.wait_state(job, {"PENDING", *FINISHED}, timeout=120)
    log = slurm.output(job)
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", log
    assert "received SIGUSR2 before training started; not starting" in log
    run_dir = work / "runs" / name
    assert not (run_dir / "checkpoints").exists() and "ddp_kit 0.1.0" not in log  # training never started
    slurm.release(job)
    info = slurm.wait_state(job, FINISHED, timeout=300)
    log = slurm.output(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", log
    assert "(restart 1)" in log and "resumed from" not in log
    epochs = metrics(run_dir)
    assert [r["epoch"] for r in epochs if "val_acc" in r] == [0]
