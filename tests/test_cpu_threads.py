"""CPU threads fitted to what a process may use: the affinity mask, SLURM's allocation, the processes that share
it; distributed.cpu_threads and OMP_NUM_THREADS win. Same threads on every layout -> same sums -> same weights."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch

from ddp_kit.config import DistributedConfig
from ddp_kit.distributed import detect_env, fit_cpu_threads

from runs import assert_same_weights, final_model, tiny_overrides
from procs import REPO, run, run_together, torchrun_command, train_command

CONFIG = REPO / "configs" / "digits.yaml"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture
def eight_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "a",
                "MASTER_PORT": "1"}
SRUN_ENV = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODEID": "1",
            "SLURM_TASKS_PER_NODE": "4(x2)"}


@pytest.mark.parametrize("environ, cpu_threads, expected", [
    ({}, None, "8 CPU threads (8 CPUs in the affinity mask)"),
    ({"SLURM_CPUS_PER_TASK": "3"}, None, "3 CPU threads (3 CPUs allocated by SLURM)"),
    ({"SLURM_CPUS_ON_NODE": "6"}, None, "6 CPU threads (6 CPUs allocated by SLURM)"),
    (TORCHRUN_ENV, None, "4 CPU threads (8 CPUs in the affinity mask / 2 processes on this node)"),
    ({**TORCHRUN_ENV, "SLURM_CPUS_PER_TASK": "4"}, None,
     "2 CPU threads (4 CPUs allocated by SLURM / 2 processes on this node)"),
    ({**SRUN_ENV, "SLURM_CPUS_PER_TASK": "2"}, None, "2 CPU threads (2 CPUs allocated by SLURM)"),
    ({**SRUN_ENV, "SLURM_CPUS_ON_NODE": "8"}, None, "2 CPU threads (8 CPUs in the affinity mask / 4 processes on "
                                                    "this node)"),
    ({"SLURM_CPUS_PER_TASK": "1", "OMP_NUM_THREADS": "3"}, None, "3 CPU threads (OMP_NUM_THREADS)"),
    ({"OMP_NUM_THREADS": "3"}, 5, "5 CPU threads (distributed.cpu_threads)"),
])
def test_threads_are_this_process_share_of_its_cpus(eight_cpus, environ, cpu_threads, expected):
    chosen = fit_cpu_threads(DistributedConfig(cpu_threads=cpu_threads), detect_env(environ), environ)
    assert chosen == expected
    assert torch.get_num_threads() == int(expected.split()[0])


def test_one_process_under_a_one_cpu_affinity_mask_uses_one_thread(tiny_h5, tmp_path):
    overrides = tiny_overrides(tiny_h5, tmp_path, "pinned", **{"train.max_steps": 1})
    out = run(["taskset", "-c", "0", *train_command(1, CONFIG, overrides)], env={"OMP_NUM_THREADS": None}).stdout
    assert "1 CPU thread (1 CPUs in the affinity mask)" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




@pytest.mark.slow
def test_two_nodes_of_one_process_match_one_node_of_two(tiny_h5, tmp_path):
    # Each "node" is allocated one CPU by SLURM on this 2-CPU machine; without fitting, its lone process
    # would use both cores and sum in another order than the 1 x 2 run, whose torchrun sets one thread each.
    common = {"train.epochs": 1, "train.batch_size": 16, "model.name": "small_cnn"}
    args = ["-m", "ddp_kit.cli", "train", "--config", str(CONFIG)]
    port = _free_port()
    nodes = [[*TORCHRUN, "--nnodes=2", f"--node_rank={n}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
              f"--master_port={port}", *args, *tiny_overrides(tiny_h5, tmp_path, "two_nodes", **common)]
             for n in range(2)]
    outputs = run_together(nodes, env={"OMP_NUM_THREADS": None, "SLURM_CPUS_PER_TASK": "1"}, timeout=180)
    assert "1 CPU thread (1 CPUs allocated by SLURM)" in outputs[0].stdout
    one = run(torchrun_command(2, *args, *tiny_overrides(tiny_h5, tmp_path, "one_node", **common)),
              env={"OMP_NUM_THREADS": None}, timeout=180)
    assert "1 CPU thread (OMP_NUM_THREADS)" in one.stdout
    a, b = final_model(tmp_path / "two_nodes"), final_model(tmp_path / "one_node")
    assert_same_weights(a, b)
