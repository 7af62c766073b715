"""Fault tolerance without SLURM: torchrun on loopback with the digits demo on CPU (gloo).

Every run is compared with the uninterrupted reference run of the same number of processes: final parameters
bit-identical (torch.equal), and the sample ledger (train.record_sample_ids) identical once a restart's
re-written lines are reduced to their last occurrence. Exactness is tested at 3 and 4 processes as well as 2:
with two ranks a + b == b + a hides a change in the order gradients are summed (issue 18). Every process runs
under a timeout; every process a test started (torchrun, its workers, their DataLoader workers, orphans
included) is found by a tag in its environment and killed at the end.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from ddp_kit.checkpoint import CheckpointManager, load_checkpoint
from ddp_kit.config import load_config
from ddp_kit.preemption import read_requeue_marker
from procs import within_test_timeout
from runs import assert_same_weights, final_model
from ledger import ledger, ledger_lines, rows_seen, train_rows

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
CONFIG = str(REPO / "configs" / "digits.yaml")
CHECKPOINT_EVERY = 5
# Two short epochs (about 23 optimizer steps each on 2 processes, fewer with more: see mid_epoch_step), a
# checkpoint every 5 steps, one DataLoader worker per rank as in the demo config, and the per-micro-batch ledger.
OVERRIDES = ["train.epochs=2", f"checkpoint.every_steps={CHECKPOINT_EVERY}", "data.num_workers=1",
             "train.record_sample_ids=true"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """One launcher process (torchrun or python) started for a test, with everything it starts."""

    def __init__(self, args: list[str], log: Path, tag: str, cwd: Path, env: dict | None = None):
        self.log = log
        self.tag = tag
        # One intra-op thread everywhere: torchrun sets it only with several processes per launcher, and
        # CPU kernels with more threads sum in another order, which would hide what the tests compare.
        full_env = {**os.environ, "DDP_KIT_TEST_TAG": tag, "OMP_NUM_THREADS": "1"}
        full_env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)  # set only where a test means it
        full_env.update(env or {})
        self.out = open(log, "w")
        self.proc = subprocess.Popen(args, cwd=cwd, env=full_env, stdout=self.out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def workers(self) -> dict[tuple[int, int], psutil.Process]:
        """Live workers by (RANK, TORCHELASTIC_RESTART_COUNT)."""
        found = {}
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return found
        for child in children:
            try:
                env = child.environ()
                found[(int(env["RANK"]), int(env.get("TORCHELASTIC_RESTART_COUNT", 0)))] = child
            except (psutil.NoSuchProcess, KeyError):
                continue
        return found

    def wait(self, timeout: float) -> int:
        timeout = within_test_timeout(timeout)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.proc.args[:3]} still running after {timeout:.0f} s:\n{self.output()[-6000:]}")

    def output(self) -> str:
        self.out.flush()
        return self.log.read_text(errors="replace")

    def cleanup(self) -> None:
        for p in psutil.process_iter():
            try:
                if p.environ().get("DDP_KIT_TEST_TAG") == self.tag:
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self.out.close()


@pytest.fixture
def launches():
    started: list[Launch] = []
    yield started
    for launch in started:
        launch.cleanup()


class Runs:
    def __init__(self, root: Path):
        self.root = root
        self.data = root / "digits.h5"

    def run_dir(self, name: str) -> Path:
        return self.root / "runs" / name

    def train_args(self, name: str) -> list[str]:
        return [str(REPO / "launch" / "train.py"), "--config", CONFIG, f"run.output_dir={self.root / 'runs'}",
                f"run.name={name}", f"data.path={self.data}", *OVERRIDES]

    def start(self, launches: list, name: str, args: list[str], log_suffix: str = "", env: dict | None = None):
        launch = Launch(args, self.root / f"{name}{log_suffix}.log", f"{name}-{uuid.uuid4().hex}", self.root, env)
        launches.append(launch)
        return launch

    def torchrun(self, launches: list, name: str, *torchrun_args: str, log_suffix: str = "",
                 script_args: list[str] | None = None) -> Launch:
        """torchrun as the README runs it: with what worker-group restarts need in its environment."""
        return self.start(launches, name, [TORCHRUN, *torchrun_args, *(script_args or self.train_args(name))],
                          log_suffix, env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("ft"))






def max_step(run_dir: Path, rank: int) -> int:
    lines = ledger_lines(run_dir, rank)
    return max((r["step"] for r in lines), default=0)


def wait_for_step(run_dir: Path, launch: Launch, step: int, rank: int = 0, timeout: float = 120) -> int:
    timeout = within_test_timeout(timeout)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        current = max_step(run_dir, rank)
        if current >= step:
            return current
        if launch.proc.poll() is not None:
            pytest.fail(f"the run ended before step {step}:\n{launch.output()[-6000:]}")
        time.sleep(0.01)
    pytest.fail(f"rank {rank} did not reach step {step} within {timeout:.0f} s:\n{launch.output()[-6000:]}")


def resumed_step(output: str) -> int:
    found = re.findall(r"resumed from \S+ at epoch \d+, step (\d+)", output)
    assert found, f"no 'resumed from' line in:\n{output[-6000:]}"
    return int(found[-1])


def _run_reference(runs, world_size: int) -> Path:
    """An uninterrupted run started as the interrupted runs of `world_size` processes are: one plain process,
    or torchrun. Its ledger covers each epoch exactly once."""
    name = f"reference{world_size}"
    started: list[Launch] = []
    try:
        if world_size == 1:
            launch = runs.start(started, name, [sys.executable, *runs.train_args(name)])
        else:
            launch = runs.torchrun(started, name, "--standalone", f"--nproc_per_node={world_size}")
        rc = launch.wait(240)
        assert rc == 0, launch.output()[-6000:]
    finally:
        for launch in started:
            launch.cleanup()
    run_dir = runs.run_dir(name)
    entries, counts = ledger(run_dir, world=world_size)
    assert set(counts.values()) == {1}
    n_train = train_rows(run_dir)
    for epoch in range(2):
        seen = rows_seen(entries, epoch)
        assert set(seen) == set(range(n_train)), "a sample is missing from the epoch"
        # Padding repeats at most world_size - 1 samples so that every rank sees as many batches.
        assert sum(seen.values()) - n_train <= world_size - 1
    return run_dir


@pytest.fixture(scope="module")
def reference(runs):
    """reference(world_size): the run directory of the uninterrupted run every run of that many processes must
    match, run on first use."""
    done: dict[int, Path] = {}

    def get(world_size: int) -> Path:
        if world_size not in done:
            done[world_size] = _run_reference(runs, world_size)
        return done[world_size]
    return get


def mid_epoch_step(reference_dir: Path, after_checkpoint: int) -> int:
    """The step `after_checkpoint` steps past the first periodic checkpoint, checked to leave the first epoch
    a few steps to go at the reference's world size (more processes, fewer steps per epoch): a signal lands a
    step or two after the step a test waits for, and what it tests must happen inside the epoch."""
    per_epoch = len({r["step"] for r in ledger_lines(reference_dir, 0) if r["epoch"] == 0})
    step = CHECKPOINT_EVERY + after_checkpoint
    assert step + 2 < per_epoch and after_checkpoint < CHECKPOINT_EVERY, (
        f"step {step} is not mid-epoch between two checkpoints with {per_epoch} steps per epoch")
    return step


def test_launch_helper_command():
    from ddp_kit.launch import main

    out = subprocess.run([sys.executable, "-m", "ddp_kit.launch", "--nnodes", "2", "--nproc-per-node", "4",
                          "--rdzv-endpoint", "node1:29400", "--rdzv-id", "exp", "--max-restarts", "3",
                          "--dry-run", "--config", "c.yaml", "train.epochs=1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
        "--rdzv-backend=c10d", "--rdzv-endpoint=node1:29400", "--rdzv-id=exp", "--nproc-per-node=4",
        "--max-restarts=3", "-m", "ddp_kit.cli", "train", "--config", "c.yaml", "train.epochs=1"]
    with pytest.raises(SystemExit, match="needs --rdzv-endpoint"):
        main(["--nnodes", "2", "--config", "c.yaml"])


# At 4 processes, not 2: the restarted group's sums must keep their order with more than two addends, and the
# killed rank is neither 0 (which writes checkpoints) nor the last.
@pytest.mark.parametrize("world, killed", [(4, 2)])
def test_kill9_of_one_rank_restarts_from_last_checkpoint_bit_identical(runs, reference, launches, world, killed):
    name = f"kill9_{world}"
    run_dir = runs.run_dir(name)
    step = mid_epoch_step(reference(world), after_checkpoint=3)
    # Through `ddp-kit launch` (as `python -m ddp_kit.launch`), which must itself set up torchrun for restarts:
    # this process's environment does not have TORCH_DISABLE_SHARE_RDZV_TCP_STORE.
    launch = runs.start(launches, name, [sys.executable, "-m", "ddp_kit.launch", "--nproc-per-node", str(world),
                                         "--max-restarts", "1", *runs.train_args(name)[1:]])
    wait_for_step(run_dir, launch, step, rank=killed)
    launch.workers()[(killed, 0)].send_signal(signal.SIGKILL)
    killed_at = max(max_step(run_dir, rank) for rank in range(world))
    assert launch.wait(240) == 0, launch.output()[-6000:]
    out = launch.output()
    # torchrun saw the kill and restarted the group
    assert "exitcode: -9" in out and f"local_rank: {killed}" in out, out[-6000:]

    resumed = resumed_step(out)
    assert resumed % CHECKPOINT_EVERY == 0 and CHECKPOINT_EVERY <= resumed <= killed_at
    entries, counts = ledger(run_dir, world=world)
    redone = {(e, s) for (r, e, s, m), n in counts.items() if n > 1}
    assert redone, "nothing was redone: the kill came too late to test a restart"
    # Only the steps after the checkpoint it resumed from were done twice.
    assert {s for e, s in redone} <= set(range(resumed + 1, killed_at + 2)) and {e for e, s in redone} == {0}
    assert entries == ledger(reference(world), world=world)[0]  # no sample lost or seen twice, in its order
    assert_same_weights(final_model(reference(world)), final_model(run_dir))


def test_restart_budget_exhausted_fails_and_names_the_rank(runs, launches):
    launch = runs.torchrun(launches, "budget", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
                           "--monitor-interval=0.5")
    for attempt in (0, 1):
        end = time.monotonic() + within_test_timeout(120)
        while (1, attempt) not in launch.workers():
            assert time.monotonic() < end, launch.output()[-6000:]
            assert launch.proc.poll() is None, launch.output()[-6000:]
            time.sleep(0.05)
        launch.workers()[(1, attempt)].send_signal(signal.SIGKILL)
        killed = time.monotonic()
    rc = launch.wait(120)
    took = time.monotonic() - killed
    out = launch.output()
    assert rc != 0
    # From the kill that exhausts the budget: torchrun stops the surviving rank without its 30 s SIGKILL grace.
    assert took < 20, f"exited {took:.1f} s after the last kill:\n{out[-6000:]}"
    failure = out[out.index("Failures:") if "Failures:" in out else out.index("Root Cause"):]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: -9", failure), failure


FAILING_ENTRY = textwrap.dedent("""
    # The real entry point, with rank 1 raising in its second training step (calls 1-3 are the probe's loss and
    # sums and the discarded step that settles DDP's buckets); it prints when, for the test to time.
    import os, sys, time
    import torch.nn.functional as F
    from ddp_kit.cli import main

    calls = 0
    cross_entropy = F.cross_entropy

    def failing(*args, **kwargs):
        global calls
        calls += 1
        if os.environ["RANK"] == "1" and calls == 5:
            print(f"raising at {time.time()!r}", flush=True)
            raise RuntimeError("injected failure on rank 1")
        return cross_entropy(*args, **kwargs)

    F.cross_entropy = failing
    sys.exit(main(["train", *sys.argv[1:]]))
""")


def test_a_raising_rank_ends_the_job_quickly_with_its_traceback(runs, launches):
    entry = runs.root / "failing_entry.py"
    entry.write_text(FAILING_ENTRY)
    args = runs.train_args("raises")
    launch = runs.torchrun(launches, "raises", "--standalone", "--nproc_per_node=2", "--max-restarts=0",
                           script_args=[str(entry), *args[1:]])
    rc = launch.wait(120)
    ended = time.time()
    out = launch.output()
    raised = re.findall(r"raising at (\d+\.\d+)", out)
    assert rc != 0 and len(raised) == 1, out[-6000:]
    # From the failure, not the start-up: torchrun stops rank 0 (blocked in a collective) without its
    # 30 s SIGKILL grace.
    took = ended - float(raised[0])
    assert took < 20, f"exited {took:.1f} s after the failure:\n{out[-6000:]}"
    root_cause = out[out.index("Root Cause"):]
    # @record wrote the error file, so torchrun shows the rank's own traceback instead of "error_file: <N/A>".
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", root_cause), root_cause
    assert "injected failure on rank 1" in root_cause and "train.py" in root_cause, root_cause


# SIGTERM at 3 processes; SIGUSR2 to one rank at 2, which keeps the suite small (4 processes are tested by kill -9).
@pytest.mark.parametrize("how, world", [("sigterm_to_torchrun", 3), ("sigusr2_to_rank1", 2)])
def test_stop_signal_checkpoints_same_step_and_resumes_with_nothing_redone(runs, reference, launches, how, world):
    name = f"stop_{how}_{world}"
    run_dir = runs.run_dir(name)
    step = mid_epoch_step(reference(world), after_checkpoint=2)  # between two periodic checkpoints
    launch = runs.torchrun(launches, name, "--standalone", f"--nproc_per_node={world}", "--max-restarts=1")
    wait_for_step(run_dir, launch, step)
    if how == "sigterm_to_torchrun":
        launch.proc.send_signal(signal.SIGTERM)  # torchrun passes it to every worker's process group
    else:
        launch.workers()[(1, 0)].send_signal(signal.SIGUSR2)  # only rank 1 knows; the all-reduce tells rank 0
    rc = launch.wait(60)
    out = launch.output()
    if how == "sigusr2_to_rank1":
        assert rc == 0, out[-6000:]  # PREEMPTED_EXIT_CODE: torchrun must not restart the group
    assert "exitcode: -9" not in out and "forcefully exiting via SIGKILL" not in out, out[-6000:]

    marker = read_requeue_marker(run_dir, "REQUEUE")
    assert marker is not None, out[-6000:]
    stopped = marker["step"]
    if how == "sigterm_to_torchrun":
        assert marker["signal"] == "SIGTERM"
    else:
        # Rank 0 writes the marker and names the signal it saw itself; here only rank 1 was signalled.
        assert marker["signal"] in ("SIGUSR2", None)
    assert {max_step(run_dir, rank) for rank in range(world)} == {stopped}  # all stopped after the same step
    assert load_checkpoint(CheckpointManager(run_dir / "checkpoints",
                                             load_config(run_dir / "config.yaml").checkpoint).latest())["step"] == stopped

    resume = runs.torchrun(launches, name, "--standalone", f"--nproc_per_node={world}", log_suffix="-resume")
    assert resume.wait(240) == 0, resume.output()[-6000:]
    assert resumed_step(resume.output()) == stopped
    assert read_requeue_marker(run_dir, "REQUEUE") is None  # cleared by the resumed run
    entries, counts = ledger(run_dir, world=world)
    assert set(counts.values()) == {1}, "a step was redone after the stop"
    assert entries == ledger(reference(world), world=world)[0]
    assert_same_weights(final_model(reference(world)), final_model(run_dir))


def test_stop_signal_in_a_single_process_checkpoints_and_resumes_with_nothing_redone(runs, reference, launches):
    # One process takes the loop's no-collective path: the stop flag is read from the handler directly.
    name = "stop_single_process"
    run_dir = runs.run_dir(name)
    step = mid_epoch_step(reference(1), after_checkpoint=2)
    launch = runs.start(launches, name, [sys.executable, *runs.train_args(name)])
    wait_for_step(run_dir, launch, step)
    launch.proc.send_signal(signal.SIGUSR2)
    assert launch.wait(60) == 0, launch.output()[-6000:]
    marker = read_requeue_marker(run_dir, "REQUEUE")
    assert marker is not None and marker["signal"] == "SIGUSR2", launch.output()[-6000:]
    stopped = marker["step"]
    assert max_step(run_dir, 0) == stopped
    cfg = load_config(run_dir / "config.yaml")
    assert load_checkpoint(CheckpointManager(run_dir / "checkpoints", cfg.checkpoint).latest())["step"] == stopped

    resume = runs.start(launches, name, [sys.executable, *runs.train_args(name)], log_suffix="-resume")
    assert resume.wait(240) == 0, resume.output()[-6000:]
    assert resumed_step(resume.output()) == stopped
    entries, counts = ledger(run_dir, world=1)
    assert set(counts.values()) == {1}, "a step was redone after the stop"
    assert entries == ledger(reference(1), world=1)[0]
    assert_same_weights(final_model(reference(1)), final_model(run_dir))


def test_two_launchers_as_two_nodes_match_one_launcher(runs, reference, launches):
    name = "two_nodes"
    port = _free_port()
    nodes = [runs.torchrun(launches, name, "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                           f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={name}", log_suffix=f"-node{n}")
             for n in range(2)]
    for node in nodes:
        assert node.wait(240) == 0, node.output()[-6000:]
    run_dir = runs.run_dir(name)
    assert ledger(run_dir)[0] == ledger(reference(2))[0]
    assert_same_weights(final_model(reference(2)), final_model(run_dir))


STUCK = textwrap.dedent("""
    # Rank 1 never joins the second all_reduce. Both ranks install the stop handlers as the training loop does.
    import sys, time
    import torch
    from ddp_kit import distributed
    from ddp_kit.config import DistributedConfig
    from ddp_kit.preemption import StopSignals

    stop = StopSignals(["SIGUSR2", "SIGTERM"], deadline_s=2.0)
    with distributed.process_group(DistributedConfig(timeout_s=float(sys.argv[1]), device="cpu")) as rt:
        t = torch.ones(4)
        distributed.all_reduce_sum(t, rt)
        print(f"rank {rt.rank} joined", flush=True)
        if rt.rank == 1:
            time.sleep(3600)
        distributed.all_reduce_sum(t, rt)
""")


def _run_stuck(runs, launches, timeout_s: float) -> Launch:
    script = runs.root / "stuck.py"
    script.write_text(STUCK)
    launch = runs.torchrun(launches, f"stuck{timeout_s:g}", "--standalone", "--nproc_per_node=2",
                           script_args=[str(script), str(timeout_s)])
    end = time.monotonic() + within_test_timeout(60)
    while launch.output().count("joined") < 2:
        assert time.monotonic() < end and launch.proc.poll() is None, launch.output()[-6000:]
        time.sleep(0.05)
    return launch


def test_rank_stuck_past_the_collective_timeout_fails_fast_naming_the_collective(runs, launches):
    launch = _run_stuck(runs, launches, timeout_s=3)
    t0 = time.monotonic()
    rc = launch.wait(120)
    took = time.monotonic() - t0
    out = launch.output()
    assert rc != 0 and took < 30, out[-6000:]  # distributed.timeout_s=3, far from the 30-minute default
    assert re.search(r"\[rank0\]:.*all_reduce", out) and "Timed out waiting 3000ms" in out, out[-6000:]
    assert "forcefully exiting via SIGKILL" not in out


def test_sigterm_while_blocked_in_a_collective_exits_before_torchruns_sigkill(runs, launches):
    launch = _run_stuck(runs, launches, timeout_s=600)
    t0 = time.monotonic()
    launch.proc.send_signal(signal.SIGTERM)
    launch.wait(60)
    took = time.monotonic() - t0
    out = launch.output()
    assert took < 20, out[-6000:]  # the watchdog's 2 s, not torchrun's 30 s grace nor the 600 s timeout
    assert "forcefully exiting via SIGKILL" not in out
    assert "SIGTERM received 2 s ago and the training loop has not stopped (rank 0" in out, out[-6000:]
