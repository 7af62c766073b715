"""Start training processes from tests: always under a timeout, always in their own process group, always
cleaned up (a hung distributed test is a failed test, not a hung CI)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def torchrun_command(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def train_command(nproc: int, config: str | Path, overrides: list[str]) -> list[str]:
    """`ddp-kit train` with `nproc` processes (torchrun) or a single plain process."""
    args = ["-m", "ddp_kit.cli", "train", "--config", str(config), *overrides]
    return torchrun_command(nproc, *args) if nproc > 1 else [sys.executable, *args]


def run(command: list[str], *, timeout: float = 180, env: dict | None = None, check: bool = True,
        cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run to completion; on timeout kill the whole process group and fail with the output so far."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            env=full_env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(command)}\n{output[-6000:]}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    result = subprocess.CompletedProcess(command, proc.returncode, output, "")
    if check and proc.returncode != 0:
        raise AssertionError(f"exit code {proc.returncode}: {' '.join(command)}\n{output[-6000:]}")
    return result
