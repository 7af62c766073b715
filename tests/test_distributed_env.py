import pytest
import torch

from ddp_kit.config import ConfigError, DistributedConfig
from ddp_kit.distributed import DistEnv, detect_env, expand_hostlist, resolve_backend, resolve_device


def test_single_process_when_nothing_is_set():
    assert detect_env({}) == DistEnv(rank=0, local_rank=0, world_size=1, launcher="single")


def test_torchrun_environment():
    env = detect_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node7",
                      "MASTER_PORT": "29555", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port, env.launcher) == (
        3, 1, 4, "node7", 29555, "torchrun")  # torchrun inside a SLURM job wins over SLURM's variables


def test_torchrun_environment_missing_master_is_clear():
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        detect_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"})


def test_srun_without_torchrun():
    env = detect_env({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
                      "SLURM_JOB_NODELIST": "gpu[03-04,10],cpu1", "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.launcher) == (5, 1, 8, "gpu03", "slurm")
    assert env.master_port == 20000 + 123456 % 20000


def test_single_task_slurm_job_is_a_single_process():
    assert detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"}).launcher == "single"


def test_bad_integer_is_named():
    with pytest.raises(RuntimeError, match="WORLD_SIZE='two'"):
        detect_env({"RANK": "0", "WORLD_SIZE": "two", "MASTER_ADDR": "a", "MASTER_PORT": "1"})


@pytest.mark.parametrize("nodelist, hosts", [
    ("n1", ["n1"]),
    ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
    ("a[1,3-4],b7,c[009-010]", ["a1", "a3", "a4", "b7", "c009", "c010"]),
])
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


def test_device_and_backend_on_cpu():
    env = DistEnv()
    assert resolve_device(DistributedConfig(device="cpu"), env) == torch.device("cpu")
    assert resolve_backend(DistributedConfig(), torch.device("cpu")) == "gloo"
    with pytest.raises(ConfigError, match="nccl"):
        resolve_backend(DistributedConfig(backend="nccl"), torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device(DistributedConfig(device="cuda"), env)


def test_cuda_device_follows_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device(DistributedConfig(), DistEnv(local_rank=2)) == torch.device("cuda", 2)
    assert resolve_backend(DistributedConfig(), torch.device("cuda", 2)) == "nccl"
    with pytest.raises(RuntimeError, match="LOCAL_RANK=5 but only 4"):
        resolve_device(DistributedConfig(), DistEnv(local_rank=5))
    assert resolve_device(DistributedConfig(device="cpu"), DistEnv(local_rank=2)) == torch.device("cpu")


@pytest.mark.parametrize("local, expected", [
    ({"SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "3,2", "SLURM_NODEID": "1"}, (1, 2)),  # srun, RANK exported
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, (2, 4)),  # Open MPI
    ({"MPI_LOCALRANKID": "3", "MPI_LOCALNRANKS": "4"}, (3, 4)),  # MPICH, Intel MPI
    ({"LOCAL_RANK": "0", "SLURM_LOCALID": "1"}, (0, 1)),  # torchrun's own wins
])
def test_local_rank_from_other_launchers_when_local_rank_is_missing(local, expected):
    env = detect_env({"RANK": "5", "WORLD_SIZE": "8", "MASTER_ADDR": "a", "MASTER_PORT": "1", **local})
    assert (env.local_rank, env.local_world_size) == expected


def test_missing_local_rank_is_refused_not_guessed():
    with pytest.raises(RuntimeError, match="LOCAL_RANK is not .*SLURM_LOCALID.*same GPU.*export LOCAL_RANK"):
        detect_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    assert detect_env({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "a", "MASTER_PORT": "1"}).local_rank == 0


def _fake_gpus(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


SRUN_TWO_TASKS = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_NODEID": "1",
                  "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "g[1-2]"}


def test_srun_task_bound_to_one_gpu_takes_cuda0(monkeypatch):
    _fake_gpus(monkeypatch, 1)  # --gpus-per-task=1 / --gpu-bind=single:1: each task sees its own GPU only
    assert resolve_device(DistributedConfig(), detect_env(SRUN_TWO_TASKS)) == torch.device("cuda", 0)
    _fake_gpus(monkeypatch, 2)  # every task sees the node's GPUs
    assert resolve_device(DistributedConfig(), detect_env(SRUN_TWO_TASKS)) == torch.device("cuda", 1)


def test_srun_tasks_and_visible_gpus_that_do_not_match_name_the_options(monkeypatch):
    _fake_gpus(monkeypatch, 4)
    with pytest.raises(RuntimeError, match=r"srun started 2 task\(s\) on this node and each sees 4 CUDA device\(s\)"
                                           r".*--gpus-per-task=1.*--gpu-bind=single:1.*--ntasks-per-node"):
        resolve_device(DistributedConfig(), detect_env(SRUN_TWO_TASKS))
    _fake_gpus(monkeypatch, 1)  # torchrun binds nothing: a second process per node with one GPU is an error
    with pytest.raises(RuntimeError, match="LOCAL_RANK=1 but only 1"):
        resolve_device(DistributedConfig(), DistEnv(local_rank=1, local_world_size=2, launcher="torchrun"))
