"""slurm/multinode.sbatch on a real two-node SLURM (tests/slurm_cluster.py TwoNodeCluster: two network
namespaces on a bridge, each its own slurmd and hostname), submitted as a user would, with tiny CPU runs:

- 2 nodes x 1 and 2 nodes x 2 processes (torchrun) end with the weights of 1 node x 2 and 1 node x 4;
- LAUNCHER=srun (one task per process, ranks from SLURM_PROCID) trains and ends with the same weights;
- under srun, one GPU per task (--gpus-per-task=1) and all of the node's GPUs per task each pick the right
  device, and each task gets its share of the node's CPUs (GPUs are SLURM GRES on placeholder devices and a
  faked CUDA device count);
- preemption by the time limit's warning (--signal=B:USR2@N) and by `scancel --signal=USR2 --batch`, both of
  which reach only the batch shell: every rank on both nodes receives the forwarded signal and stops at the
  same step, the job requeues twice, resumes on two nodes and ends bit-identical to an uninterrupted run;
- a node lost mid-run: the job fails with NODE_FAIL naming the node, and a resubmission resumes from the last
  complete checkpoint and ends bit-identical too.

The uninterrupted references run on this machine's loopback (torchrun --standalone, the same number of
processes). Bit-identical on CPU/gloo: every layout uses one CPU thread per process (the allocation's CPUs per
process, distributed.fit_cpu_threads) and the ranks' order of summation does not depend on the nodes.
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from ddp_kit.checkpoint import CheckpointManager, load_checkpoint
from ddp_kit.config import CheckpointConfig

from runs import assert_same_weights, final_model, make_classification_file, tiny_overrides
from procs import REPO, run, train_command, within_test_timeout
from slurm_cluster import FINISHED, TwoNodeCluster, slurm2  # noqa: F401  (session fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CONFIG = REPO / "configs" / "digits.yaml"
VENV_BIN = str(Path(sys.executable).parent)
TRAIN_ROWS = 1024
EPOCHS = {2: 2, 4: 6}  # per world size: 2 epochs of 64 optimizer steps at 2 processes, 6 of 32 at 4
BATCH = 8  # per process (tiny_overrides)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    path = tmp_path_factory.mktemp("slurm2")
    # Rows of 1x8x8: a step takes milliseconds, and a run lasts longer only where a test slows the network.
    make_classification_file(path / "data.h5", n_train=TRAIN_ROWS, n_val=100)
    return path


def _overrides(work: Path, name: str, world_size: int, **extra) -> list[str]:
    return tiny_overrides(work / "data.h5", work / "runs", name, **{
        "train.epochs": EPOCHS[world_size], "checkpoint.every_steps": 10, "train.record_sample_ids": "true",
        "train.log_every_steps": 10, **extra})


@pytest.fixture(scope="module")
def reference(work):
    """reference(world_size): the final weights of an uninterrupted one-node run on loopback (run once)."""
    done: dict[int, dict] = {}

    def get(world_size: int) -> dict:
        if world_size not in done:
            name = f"reference{world_size}"
            run(train_command(world_size, CONFIG, _overrides(work, name, world_size)), timeout=300)
            done[world_size] = final_model(work / "runs" / name)
        return done[world_size]
    return get






def _submit(cluster, work: Path, name: str, world_size: int, *options: str, env=None, extra=None) -> str:
    return cluster.sbatch(["--nodes=2", "--gpus-per-node=0", "--time=10", f"--job-name={name}",
                           f"--output={work}/%x-%j.out", *options, str(REPO / "slurm" / "multinode.sbatch"),
                           str(CONFIG), *_overrides(work, name, world_size, **(extra or {}))],
                          cwd=REPO, env={"PATH": f"{VENV_BIN}:{os.environ['PATH']}", **(env or {})})



def _ledger_step(run_dir: Path, rank: int = 0) -> int:
    """The optimizer step the rank's latest micro-batch belongs to (0 before the first)."""
    path = run_dir / "samples" / f"rank{rank}.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def _wait_for_step(cluster, job: str, run_dir: Path, step: int, timeout: float = 240) -> None:
    timeout = within_test_timeout(timeout)
    end = time.monotonic() + timeout
    while _ledger_step(run_dir) < step:
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), cluster.output(job)
        assert time.monotonic() < end, f"rank 0 did not reach step {step} within {timeout} s:\n{cluster.output(job)}"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_node", [1, 2])
def test_two_nodes_end_with_the_weights_of_one_node(slurm2, work, reference, per_node):  # noqa: F811
    name, world_size = f"two_by_{per_node}", 2 * per_node
    crossed_before = slurm2.bridge_bytes("node2")
    # A CPU job starts --cpus-per-task processes per node; one CPU thread each, like torchrun's on one node.
    job = _submit(slurm2, work, name, world_size, f"--cpus-per-task={per_node}")
    expected = reference(world_size)  # runs while the job does
    info = slurm2.wait_state(job, FINISHED, timeout=300)
    log = slurm2.output(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert_same_weights(final_model(work / "runs" / name), expected)
    assert info["NodeList"] == "node[1-2]"
    assert f"2 node(s) [node[1-2]], {per_node} process(es) per node (CPU job), launcher torchrun" in log
    assert f"{world_size} process(es) (torchrun), device cpu, backend gloo, 1 CPU thread" in log
    # The gradients crossed the bridge: at least one model's worth per optimizer step.
    model_bytes = sum(t.numel() * t.element_size() for t in expected.values())
    steps = EPOCHS[world_size] * TRAIN_ROWS // (BATCH * world_size)
    assert slurm2.bridge_bytes("node2") - crossed_before > steps * model_bytes


def test_srun_launcher_trains_with_ranks_from_slurm(slurm2, work, reference):  # noqa: F811
    name = "srun_launcher"
    job = _submit(slurm2, work, name, 4, "--ntasks-per-node=2", "--cpus-per-task=1", env={"LAUNCHER": "srun"})
    info = slurm2.wait_state(job, FINISHED, timeout=300)
    log = slurm2.output(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "launcher srun (1 CPU(s) per task: 2 per node / 2 tasks)" in log
    assert "4 process(es) (slurm), device cpu, backend gloo, 1 CPU thread (1 CPUs allocated by SLURM)" in log
    assert_same_weights(final_model(work / "runs" / name), reference(4))


# A stand-in training script for the srun launcher: CUDA is faked with as many devices as SLURM made visible to
# the task, and the task reports the device ddp_kit picks for it and the CPUs it was given.
PROBE = r"""
import json, os, socket
import torch
visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
torch.cuda.is_available = lambda: bool(visible)
torch.cuda.device_count = lambda: len(visible)
from ddp_kit.config import DistributedConfig
from ddp_kit.distributed import detect_env, resolve_device
env = detect_env()
try:
    device = str(resolve_device(DistributedConfig(), env))
except RuntimeError as exc:
    device = f"error: {exc}"
print("PROBE " + json.dumps({"host": socket.gethostname(), "rank": env.rank, "local_rank": env.local_rank,
                             "local_world_size": env.local_world_size, "visible": visible, "device": device,
                             "cpus": os.environ.get("SLURM_CPUS_PER_TASK")}), flush=True)
"""


def test_srun_tasks_get_one_gpu_each_and_their_share_of_the_cpus(slurm2, work):  # noqa: F811
    root = work / "probe_root"
    (root / "launch").mkdir(parents=True)
    (root / "launch" / "train.py").write_text(PROBE)
    (root / "slurm").symlink_to(REPO / "slurm")
    (root / "c.yaml").write_text(f"run: {{output_dir: {work / 'probe_runs'}}}\ndata: {{path: {work / 'data.h5'}}}\n")
    env = {"PATH": f"{VENV_BIN}:{os.environ['PATH']}", "LAUNCHER": "srun", "DDP_KIT_ROOT": str(root)}
    layouts = {
        # One GPU bound to each task, whole nodes: each task sees one device; 4 CPUs per node / 2 tasks.
        "bound": ["--gpus-per-node=2", "--gpus-per-task=1", "--cpus-per-task=1", "--exclusive"],
        # Each task sees both of the node's GPUs and drives the one of its local rank.
        "shared": ["--gpus-per-node=2", "--cpus-per-task=1"],
    }
    # --time=10: the script's --signal=B:USR2@300 warns a job of 5 minutes or less at once (a preemption).
    jobs = {name: slurm2.sbatch(["--nodes=2", "--ntasks-per-node=2", "--time=10", f"--job-name=probe_{name}",
                                 f"--output={work}/%x-%j.out", *options, str(REPO / "slurm" / "multinode.sbatch"),
                                 "c.yaml"], cwd=root, env=env)
            for name, options in layouts.items()}
    reports = {}
    for name, job in jobs.items():
        info = slurm2.wait_state(job, FINISHED, timeout=180)
        log = slurm2.output(job)
        assert info["JobState"] == "COMPLETED", log
        reports[name] = sorted((json.loads(line[6:]) for line in log.splitlines() if line.startswith("PROBE ")),
                               key=lambda r: r["rank"])
        assert [r["rank"] for r in reports[name]] == [0, 1, 2, 3], log
        assert collections.Counter(r["host"] for r in reports[name]) == {"node1": 2, "node2": 2}
        assert all(r["local_world_size"] == 2 for r in reports[name])
    bound = reports["bound"]
    assert all(len(r["visible"]) == 1 and r["device"] == "cuda:0" for r in bound), bound
    for host in ("node1", "node2"):  # the node's two tasks hold different GPUs
        assert sorted(r["visible"][0] for r in bound if r["host"] == host) == ["0", "1"], bound
    assert all(r["cpus"] == "2" for r in bound), bound
    assert "launcher srun (2 CPU(s) per task: 4 per node / 2 tasks)" in slurm2.output(jobs["bound"])
    shared = reports["shared"]
    assert all(r["visible"] == ["0", "1"] and r["device"] == f"cuda:{r['local_rank']}" for r in shared), shared
    assert all(r["cpus"] == "1" for r in shared), shared
    # The scripts' --cpus-per-task=32 is per task: with srun's tasks per node it asks more than a node has.
    with pytest.raises(RuntimeError, match="More processors requested than permitted|Requested node configuration"):
        slurm2.sbatch(["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--time=5",
                       str(REPO / "slurm" / "multinode.sbatch"), "c.yaml"], cwd=root, env=env)


def _signal_receipts(text: str, signal_name: str) -> dict[int, str]:
    """rank -> host, from the line each training process writes when a stop signal reaches it."""
    found = re.findall(rf"ddp_kit: {signal_name} received by rank (\d+) on ([^,\s]+), pid", text)
    return {int(rank): host for rank, host in found}


def _runs(log: str) -> list[str]:
    """The job's output, split into its runs (one per start: the first and each requeued one)."""
    return re.split(r"(?=ddp_kit sbatch \[[^]]*\]: job \d+ \(restart \d+\))", log)[1:]


def _check_stop(cluster, job: str, run_dir: Path, run_log: str, restarts: int, earlier: tuple = ()) -> int:
    """One preemption as seen after the job went back to PENDING: returns the step it stopped at. `earlier`:
    the steps of earlier stops, whose checkpoints may still be kept."""
    assert "received SIGUSR2; passing it on to the training processes" in run_log, run_log
    receipts = _signal_receipts(run_log, "SIGUSR2")
    # The signal reached only the batch shell on node1; the script forwarded it to every rank on both nodes.
    assert sorted(receipts) == [0, 1], run_log
    assert sorted(receipts.values()) == ["node1", "node2"], receipts
    stopped = json.loads(re.search(r"requeue marker \S+ found: (\{.*\})", run_log).group(1))["step"]
    assert f"stopping at step {stopped} on SIGUSR2" in run_log
    assert [_ledger_step(run_dir, rank) for rank in range(2)] == [stopped] * 2  # the same step on every rank
    sidecars = [json.loads(p.read_text()) for p in (run_dir / "checkpoints").glob("ckpt_step*.json")]
    preempt = [s["step"] for s in sidecars if s["tag"] == "preempt" and s["step"] not in earlier]
    assert preempt == [stopped]  # one checkpoint for the stop
    assert f"job {job} requeued" in run_log
    assert cluster.job(job)["Restarts"] == str(restarts)
    return stopped


def test_preemption_reaches_every_rank_on_both_nodes_and_resumes_bit_identical(slurm2, work, reference):  # noqa: F811
    name = "preempted"
    run_dir = work / "runs" / name
    # --signal=B:USR2@100: the time limit's warning goes to the batch shell only, 100 s before the limit.
    job = _submit(slurm2, work, name, 2, "--cpus-per-task=1", "--signal=B:USR2@100")
    _wait_for_step(slurm2, job, run_dir, 5)
    with slurm2.slow_network():
        # The limit draws near: SLURM's periodic time-limit check (every 30 s) sends the warning.
        slurm2.cmd(["scontrol", "update", f"jobid={job}", "TimeLimit=2"])
        info = slurm2.wait_state(job, {"PENDING", *FINISHED}, timeout=150)
    assert info["JobState"] == "PENDING", slurm2.output(job)
    first = _check_stop(slurm2, job, run_dir, _runs(slurm2.output(job))[0], restarts=1)

    slurm2.cmd(["scontrol", "update", f"jobid={job}", "TimeLimit=10"])  # no second warning
    slurm2.release(job)
    _wait_for_step(slurm2, job, run_dir, first + 5)
    with slurm2.slow_network():
        slurm2.cmd(["scancel", "--signal=USR2", "--batch", job])
        info = slurm2.wait_state(job, {"PENDING", *FINISHED}, timeout=150)
    assert info["JobState"] == "PENDING", slurm2.output(job)
    runs = _runs(slurm2.output(job))
    assert re.search(rf"resumed from \S+ at epoch \d+, step {first}\b", runs[1]), runs[1]
    second = _check_stop(slurm2, job, run_dir, runs[1], restarts=2, earlier=(first,))
    assert second > first

    slurm2.release(job)
    info = slurm2.wait_state(job, FINISHED, timeout=300)
    log = slurm2.output(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "2", log
    assert re.search(rf"resumed from \S+ at epoch \d+, step {second}\b", _runs(log)[2]), log
    # Nothing redone or skipped: every rank recorded each of its micro-batches exactly once over the three runs.
    for rank in range(2):
        records = [json.loads(line) for line in (run_dir / "samples" / f"rank{rank}.jsonl").read_text().splitlines()]
        keys = [(r["epoch"], r["step"], r["micro"]) for r in records]
        assert len(keys) == len(set(keys)) == EPOCHS[2] * TRAIN_ROWS // (BATCH * 2)
    assert_same_weights(final_model(run_dir), reference(2))


def test_lost_node_fails_the_job_naming_it_and_a_resubmission_resumes(slurm2, work, reference):  # noqa: F811
    name = "node_lost"
    run_dir = work / "runs" / name
    manager = CheckpointManager(run_dir / "checkpoints", CheckpointConfig())
    # The last rank still running stops 5 s after SLURM's SIGTERM instead of the default 25.
    extra = {"preemption.term_deadline_s": 5}
    job = _submit(slurm2, work, name, 2, "--cpus-per-task=1", "--no-requeue", extra=extra)
    _wait_for_step(slurm2, job, run_dir, 12)
    try:
        with slurm2.slow_network():
            slurm2.lose_node("node2")
            # SLURM marks the node down after SlurmdTimeout and ends the job; node1's ranks, blocked in an
            # all-reduce with the gone node, leave on SIGTERM.
            info = slurm2.wait_state(job, FINISHED, timeout=TwoNodeCluster.SLURMD_TIMEOUT_S + 120)
    finally:
        slurm2.restore_node("node2")
    log = slurm2.output(job)
    assert info["JobState"] == "NODE_FAIL", log
    assert "Node failure on node2" in log
    last = manager.latest()
    assert last is not None and load_checkpoint(last)["step"] >= 10

    again = _submit(slurm2, work, name, 2, "--cpus-per-task=1", "--no-requeue", extra=extra)
    info = slurm2.wait_state(again, FINISHED, timeout=300)
    log = slurm2.output(again)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert f"resumed from {last} at epoch" in log
    assert_same_weights(final_model(run_dir), reference(2))
