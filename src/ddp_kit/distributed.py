"""Process group, ranks and devices: who this process is, which device it drives, how ranks agree.

Three ways in, detected from the environment:
- torchrun (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT),
- `srun` starting one task per GPU without torchrun (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, rendezvous on
  the first host of SLURM_JOB_NODELIST),
- a plain single process (no process group at all: the CPU debugging mode).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from .config import ConfigError, DistributedConfig

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """What the launcher told this process about itself."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # processes of this job on this node
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # single | torchrun | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class Runtime:
    """The initialized distributed runtime of this process."""

    env: DistEnv
    device: torch.device
    backend: str | None  # None when running as a single process without a process group
    cpu_threads: str = ""  # torch's intra-op threads and why, for the start-up line

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.is_main


def _int_env(environ: Mapping[str, str], key: str) -> int:
    value = environ[key]
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {key}={value!r} is not an integer; check the launcher") from None


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list: 'gpu[01-03,07],cpu5' -> gpu01, gpu02, gpu03, gpu07, cpu5."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
    return hosts


def _slurm_tasks_on_this_node(environ: Mapping[str, str]) -> int:
    """This node's entry of SLURM_TASKS_PER_NODE ('4(x2),1': 4 on nodes 0 and 1, 1 on node 2), by SLURM_NODEID."""
    counts: list[int] = []
    for entry in environ.get("SLURM_TASKS_PER_NODE", "").split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", entry.strip())
        if match:
            counts += [int(match.group(1))] * int(match.group(2) or 1)
    node = _int_env(environ, "SLURM_NODEID") if "SLURM_NODEID" in environ else 0
    return counts[node] if node < len(counts) else 1


# Where launchers put a process's index on its node, and the number of processes there: torchrun, srun,
# Open MPI, MPICH / Intel MPI.
LOCAL_RANK_SOURCES = (("LOCAL_RANK", "LOCAL_WORLD_SIZE"), ("SLURM_LOCALID", "SLURM_TASKS_PER_NODE"),
                      ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
                      ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"))


def _local_rank_and_size(environ: Mapping[str, str], world_size: int) -> tuple[int, int]:
    """LOCAL_RANK and LOCAL_WORLD_SIZE, else what srun or MPI set. Guessing 0 would put every process of a
    node on cuda:0, and NCCL would fail much later ("Duplicate GPU detected")."""
    for rank_key, size_key in LOCAL_RANK_SOURCES:
        if rank_key not in environ:
            continue
        if size_key not in environ:
            size = 1
        elif size_key == "SLURM_TASKS_PER_NODE":
            size = _slurm_tasks_on_this_node(environ)
        else:
            size = _int_env(environ, size_key)
        return _int_env(environ, rank_key), size
    if world_size > 1:
        others = ", ".join(rank_key for rank_key, _ in LOCAL_RANK_SOURCES[1:])
        raise RuntimeError(
            f"RANK and WORLD_SIZE are set but LOCAL_RANK is not (nor {others}), so this process's index on its "
            f"node is unknown and every process of a node would take the same GPU. Start with torchrun, or export "
            f"LOCAL_RANK (0 .. processes per node - 1) for each process")
    return 0, 1


def detect_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Read torchrun's variables, else SLURM's (srun without torchrun), else a single process."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in environ:
                raise RuntimeError(f"RANK and WORLD_SIZE are set but {key} is not; start with torchrun or set it")
        world_size = _int_env(environ, "WORLD_SIZE")
        local_rank, local_world_size = _local_rank_and_size(environ, world_size)
        return DistEnv(
            rank=_int_env(environ, "RANK"),
            local_rank=local_rank,
            world_size=world_size,
            local_world_size=local_world_size,
            master_addr=environ["MASTER_ADDR"],
            master_port=_int_env(environ, "MASTER_PORT"),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and _int_env(environ, "SLURM_NTASKS") > 1:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
        if "MASTER_ADDR" in environ:
            master_addr = environ["MASTER_ADDR"]
        elif nodelist:
            master_addr = expand_hostlist(nodelist)[0]
        else:
            raise RuntimeError("started by srun with several tasks, but neither MASTER_ADDR nor SLURM_JOB_NODELIST "
                               "is set, so the rendezvous host is unknown")
        # A job-specific port keeps two jobs sharing a node from meeting at the same rendezvous.
        port = _int_env(environ, "MASTER_PORT") if "MASTER_PORT" in environ else (
            20000 + _int_env(environ, "SLURM_JOB_ID") % 20000 if "SLURM_JOB_ID" in environ else 29500)
        return DistEnv(
            rank=_int_env(environ, "SLURM_PROCID"),
            local_rank=_int_env(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0,
            world_size=_int_env(environ, "SLURM_NTASKS"),
            local_world_size=_slurm_tasks_on_this_node(environ),
            master_addr=master_addr,
            master_port=port,
            launcher="slurm",
        )
    return DistEnv()


def resolve_device(cfg: DistributedConfig, env: DistEnv) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is wanted and present, else the CPU. A task that srun bound to one GPU
    (--gpus-per-task=1, --gpu-bind=single:1, a MIG slice) sees only that one: cuda:0."""
    if cfg.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if cfg.device == "cuda":
            raise ConfigError("distributed.device='cuda' but CUDA is not available here; use 'auto' or 'cpu'")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if env.launcher == "slurm" and count != env.local_world_size:
        if count == 1:
            return torch.device("cuda", 0)
        raise RuntimeError(
            f"srun started {env.local_world_size} task(s) on this node and each sees {count} CUDA device(s) (task "
            f"{env.local_rank}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}); a task "
            f"drives one GPU. Bind one GPU to each task (srun/sbatch --gpus-per-task=1, or --gpu-bind=single:1), "
            f"or let every task see all of the node's GPUs with --ntasks-per-node equal to --gpus-per-node")
    if env.local_rank >= count:
        raise RuntimeError(
            f"LOCAL_RANK={env.local_rank} but only {count} CUDA device(s) are visible on this node; start at most "
            f"{count} processes per node (torchrun --nproc_per_node) or check CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", env.local_rank)


def fit_cpu_threads(cfg: DistributedConfig, env: DistEnv, environ: Mapping[str, str] = os.environ) -> str:
    """Set torch's intra-op threads to this process's share of the CPUs it may use; returns "N CPU threads (why)".

    distributed.cpu_threads wins, then OMP_NUM_THREADS (torchrun sets 1 when it starts several processes per
    node); otherwise the CPUs of the affinity mask, capped by SLURM's allocation (SLURM_CPUS_PER_TASK, else
    SLURM_CPUS_ON_NODE), shared by the processes that share that allocation. Without this, a process alone on
    its node (one process per node, or any single-process run) takes every core of the machine, whatever the
    allocation, and other layouts of the same run sum in other orders. DataLoader workers use one thread each
    (PyTorch sets it)."""
    if cfg.cpu_threads is not None:
        threads, why = cfg.cpu_threads, "distributed.cpu_threads"
    elif "OMP_NUM_THREADS" in environ:
        threads, why = max(1, _int_env(environ, "OMP_NUM_THREADS")), "OMP_NUM_THREADS"
    else:
        cpus = len(os.sched_getaffinity(0))
        why = f"{cpus} CPUs in the affinity mask"
        if env.launcher == "slurm":  # srun started one task per process, each with its own allocation
            allocation, sharing = environ.get("SLURM_CPUS_PER_TASK"), 1
            if allocation is None and "SLURM_CPUS_ON_NODE" in environ:
                allocation, sharing = environ["SLURM_CPUS_ON_NODE"], env.local_world_size
        else:  # one launcher (torchrun, or this process alone) holds the allocation for its local processes
            allocation = environ.get("SLURM_CPUS_PER_TASK", environ.get("SLURM_CPUS_ON_NODE"))
            sharing = env.local_world_size if env.launcher == "torchrun" else 1
        if allocation is not None and int(allocation) < cpus:
            cpus = int(allocation)
            why = f"{cpus} CPUs allocated by SLURM"
        if sharing > 1:
            why += f" / {sharing} processes on this node"
        threads = max(1, cpus // sharing)
    torch.set_num_threads(threads)
    return f"{threads} CPU thread{'s' if threads > 1 else ''} ({why})"


def resolve_backend(cfg: DistributedConfig, device: torch.device) -> str:
    if cfg.backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if cfg.backend == "nccl" and device.type != "cuda":
        raise ConfigError("distributed.backend='nccl' needs CUDA devices; use 'gloo' (or 'auto') on the CPU")
    return cfg.backend


@contextlib.contextmanager
def process_group(cfg: DistributedConfig, environ: Mapping[str, str] = os.environ) -> Iterator[Runtime]:
    """Set the device, start the process group, and destroy it on every exit path (exceptions included)."""
    env = detect_env(environ)
    cpu_threads = fit_cpu_threads(cfg, env, environ)
    device = resolve_device(cfg, env)
    if device.type == "cuda":
        # Before anything touches the GPU: otherwise every rank creates a context on cuda:0.
        torch.cuda.set_device(device)
    backend = None
    if env.is_distributed:
        backend = resolve_backend(cfg, device)
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{_url_host(env.master_addr)}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=cfg.timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    try:
        yield Runtime(env=env, device=device, backend=backend, cpu_threads=cpu_threads)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def barrier(runtime: Runtime) -> None:
    if runtime.env.is_distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.env.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.env.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_buffers(module: torch.nn.Module, runtime: Runtime) -> None:
    """Make every rank's buffers (BatchNorm running statistics) rank 0's. DDP broadcasts them before each
    training forward, so after the last one each rank holds its own; evaluation and checkpoints need one set."""
    if runtime.env.is_distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def all_gather_objects(obj: object, runtime: Runtime) -> list:
    if not runtime.env.is_distributed:
        return [obj]
    gathered: list = [None] * runtime.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: object, runtime: Runtime) -> object:
    """Rank 0's `obj` on every rank."""
    if not runtime.env.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class PeerFailed(RuntimeError):
    """Rank 0 failed in an action every rank waited for; the other ranks stop with this one-line pointer."""


def on_main_rank(action: Callable[[], T], runtime: Runtime) -> T | None:
    """Run `action` on rank 0 alone while the others wait, and let every rank learn how it ended: rank 0
    re-raises its error, the others raise PeerFailed naming it, instead of failing later in a collective
    with a transport error ("Connection closed by peer"). Returns rank 0's result there, None elsewhere."""
    result, error = None, None
    if runtime.is_main:
        try:
            result = action()
        except Exception as exc:  # every failure, so no rank is left waiting for the broadcast
            error = exc
    reason = None if error is None else f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    reason = broadcast_object(reason, runtime)
    if error is not None:
        raise error
    if reason is not None:
        raise PeerFailed(f"rank 0 failed, so rank {runtime.rank} stops too: {reason} (rank 0's message has the "
                         f"details)")
    return result


def rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed derived from the run's seed; distinct ranks never share a stream."""
    return (seed * 1_000_003 + rank * 7919) % (2**31)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
