"""Start training processes from tests: always under a timeout, always in their own process group, always
cleaned up (a hung distributed test is a failed test, not a hung CI)."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from ddp_kit import launch

REPO = Path(__file__).resolve().parents[1]

# When the running test's pytest timeout fires (time.monotonic()), less a margin; set by tests/conftest.py.
_test_deadline: float | None = None


def set_test_deadline(deadline: float | None) -> None:
    global _test_deadline
    _test_deadline = deadline


def within_test_timeout(timeout: float) -> float:
    """`timeout` shortened to end before the running test's pytest timeout (one budget, pyproject's or the
    test's @pytest.mark.timeout): a hung process then fails with its own message and output instead of
    pytest-timeout's stack dump, however many processes the test ran before it."""
    if _test_deadline is None:
        return timeout
    return max(1.0, min(timeout, _test_deadline - time.monotonic()))


def torchrun_command(nproc: int, *args: str) -> list[str]:
    """torchrun --standalone with `nproc` processes of `args` (a script and its arguments, or -m module ...)."""
    return launch.torchrun_command(nproc, list(args))


def train_command(nproc: int, config: str | Path, overrides: list[str]) -> list[str]:
    """`ddp-kit train` with `nproc` processes (torchrun) or a single plain process."""
    return launch.train_command(config, overrides, nproc_per_node=nproc)


def run(command: list[str], *, timeout: float = 180, env: dict | None = None, check: bool = True,
        cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run to completion; on timeout kill the whole process group and fail with the output so far.
    `env` adds to the environment; a value of None removes that variable."""
    return run_together([command], timeout=timeout, env=env, check=check, cwd=cwd)[0]


def run_together(commands: list[list[str]], *, timeout: float = 180, env: dict | None = None, check: bool = True,
                 cwd: Path = REPO) -> list[subprocess.CompletedProcess]:
    """`run` for commands that must run at the same time (e.g. one launcher per simulated node), under one
    shared timeout; every process group is killed on the way out."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env = {key: value for key, value in full_env.items() if value is not None}
    logs = [tempfile.TemporaryFile("w+") for _ in commands]
    procs = [subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=full_env,
                              start_new_session=True) for command, log in zip(commands, logs)]
    timeout = within_test_timeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        for proc, command, log in zip(procs, commands, logs):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"timed out after {timeout:.0f} s: {' '.join(command)}\n"
                                     f"{_read(log)[-6000:]}") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    results = [subprocess.CompletedProcess(command, proc.returncode, _read(log), "")
               for command, proc, log in zip(commands, procs, logs)]
    for log in logs:
        log.close()
    for result in results:
        if check and result.returncode != 0:
            raise AssertionError(f"exit code {result.returncode}: {' '.join(result.args)}\n{result.stdout[-6000:]}")
    return results


def _read(log) -> str:
    log.seek(0)
    return log.read()
