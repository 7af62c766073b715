"""A real single-node SLURM cluster on localhost, for tests of the slurm/ scripts (see slurm/README.md).

Installs Debian's slurmctld, slurmd and munge when they are missing (root and apt-get required, as on a fresh
CI machine), then starts private daemons: their own munged socket, config, state, logs and ports under a fresh
directory, so a SLURM or munge already running on the machine is neither used nor disturbed, and two test
sessions can each have a cluster. Daemons are stopped by their pid files, never by name.

Used by the session fixture ``slurm`` below; also runnable by hand to debug a script:
    python tests/slurm_cluster.py start      # prints the SLURM_CONF to export, keeps running until Ctrl-C
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "munged"]


class SlurmUnavailable(Exception):
    """SLURM cannot be installed or started here; the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> None:
    if all(shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("SLURM is not installed and installing it needs root (apt-get install "
                               + " ".join(PACKAGES) + ")")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("SLURM is not installed and apt-get is not available to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def _node_line(hostname: str) -> str:
    """The node's real CPUs, sockets and memory as slurmd sees them, so the node is not drained as 'low'."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=60, check=True).stdout
    first = out.splitlines()[0]
    fields = [f for f in first.split() if not f.startswith(("NodeName=", "UpTime="))]
    return f"NodeName={hostname} NodeAddr=127.0.0.1 " + " ".join(fields) + " State=UNKNOWN"


def _pid_from(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class SlurmCluster:
    def __init__(self, base: Path):
        self.base = base
        self.hostname = socket.gethostname().split(".")[0]
        self.conf = base / "slurm.conf"
        self.munge_socket = base / "munge" / "munge.socket"
        self.pid_files = {
            "slurmd": base / "slurmd.pid",
            "slurmctld": base / "slurmctld.pid",
            "munged": base / "munge" / "munged.pid",
        }
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.env["PATH"] = self.env.get("PATH", "") + ":/usr/sbin:/sbin"

    # ---- lifecycle -------------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        self._start_munge()
        self._write_conf()
        # -i: ignore state from any earlier cluster in this directory; the state dir is fresh anyway.
        self._run(["slurmctld", "-i", "-f", str(self.conf)])
        self._run(["slurmd", "-f", str(self.conf)])
        end = time.monotonic() + timeout
        state = ""
        while time.monotonic() < end:
            state = self.cmd(["sinfo", "-h", "-o", "%t"], check=False).strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node did not become idle within {timeout:.0f} s (sinfo: {state!r});"
                           f" logs: {self.base}/slurmctld.log, {self.base}/slurmd.log\n{self.logs()}")

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            pid = _pid_from(self.pid_files[name])
            if pid is None or not _alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            end = time.monotonic() + 15
            while _alive(pid) and time.monotonic() < end:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def _start_munge(self) -> None:
        mdir = self.munge_socket.parent
        self.base.chmod(0o755)  # munged runs as 'munge' and must reach its directory
        mdir.mkdir(parents=True)
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        shutil.chown(mdir, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        mdir.chmod(0o755)  # clients of the socket need to traverse it
        key.chmod(0o400)
        # munged refuses to run as root; the 'munge' user comes with the package.
        args = [f"--socket={self.munge_socket}", f"--key-file={key}", f"--pid-file={self.pid_files['munged']}",
                f"--log-file={mdir / 'munged.log'}", f"--seed-file={mdir / 'munged.seed'}"]
        self._run(["runuser", "-u", "munge", "--", "munged", *args])

    def _write_conf(self) -> None:
        b = self.base
        for d in ("state", "spool"):
            (b / d).mkdir()
        lines = [
            "ClusterName=ddpkit",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={b / 'state'}",
            f"SlurmdSpoolDir={b / 'spool'}",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmdPidFile={self.pid_files['slurmd']}",
            f"SlurmctldLogFile={b / 'slurmctld.log'}",
            f"SlurmdLogFile={b / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobRequeue=1",
            "MinJobAge=3600",  # keep finished jobs visible to `scontrol show job` for the whole session
            "KillWait=30",
            _node_line(self.hostname),
            f"PartitionName=debug Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _run(self, cmd: list[str]) -> None:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stdout}{out.stderr}\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        parts = []
        for p in (self.base / "slurmctld.log", self.base / "slurmd.log", self.base / "munge" / "munged.log"):
            if p.exists():
                parts.append(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-tail:]))
        return "\n".join(parts)

    # ---- client helpers ----------------------------------------------------------------------------------
    def cmd(self, args: list[str], check: bool = True, cwd=None, env: Optional[dict] = None) -> str:
        out = subprocess.run(args, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                             timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, args))} failed ({out.returncode}): {out.stdout}{out.stderr}")
        return out.stdout

    def sbatch(self, args: list[str], cwd=None, env: Optional[dict] = None) -> str:
        """Submit; returns the job id."""
        return self.cmd(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=env).strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        text = self.cmd(["scontrol", "show", "job", "-o", job_id])
        return dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", text))

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        end = time.monotonic() + timeout
        info = self.job(job_id)
        while info["JobState"] not in states:
            if time.monotonic() > end:
                raise TimeoutError(f"job {job_id} still {info['JobState']} after {timeout:.0f} s, wanted one of"
                                   f" {sorted(states)}:\n{info}\n{self.logs()}")
            time.sleep(0.5)
            info = self.job(job_id)
        return info

    def cancel_all(self) -> None:
        self.cmd(["scancel", "--full", "--user", "root"], check=False)


FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="session")
def slurm():
    """A started SLURM cluster for the whole session; skipped with the reason where it cannot exist."""
    try:
        ensure_installed()
    except SlurmUnavailable as exc:
        pytest.skip(str(exc))
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="ddp_kit_slurm_")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cancel_all()
        cluster.stop()
        shutil.rmtree(cluster.base, ignore_errors=True)  # failures already quoted the daemons' logs


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["start"]:
        sys.exit("usage: python tests/slurm_cluster.py start")
    ensure_installed()
    # Stop on SIGTERM as on Ctrl-C; both may be ignored when started in the background, so install them.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    c = SlurmCluster(Path(tempfile.mkdtemp(prefix="ddp_kit_slurm_")))
    c.start()
    print(f"export SLURM_CONF={c.conf}   # then sbatch/squeue/scontrol as usual; Ctrl-C or SIGTERM stops it",
          flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.cancel_all()
        c.stop()
