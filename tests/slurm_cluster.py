"""Real SLURM clusters on this machine, for tests of the slurm/ scripts (see slurm/README.md).

- ``SlurmCluster``: one node on localhost (session fixture ``slurm``).
- ``TwoNodeCluster``: two nodes, node1 and node2, each in its own network namespace with its own address on a
  bridge made for the session (a private /24 the machine does not use), and its own hostname, /etc/hosts,
  slurmd, spool and log; slurmctld and munged are shared and run in the host namespace (session fixture
  ``slurm2``). Job steps start from the nodes' slurmd, so they run inside the nodes: ``hostname`` says node1 or
  node2, and traffic between the nodes crosses the bridge. The nodes declare 4 CPUs and 2 GPUs each
  (``SlurmdParameters=config_overrides``; the GPUs are placeholder files, so SLURM sets CUDA_VISIBLE_DEVICES
  as on a GPU cluster but nothing can use them).

Each cluster has its own munged socket, config, state, logs and ports under a fresh directory, so a SLURM or
munge already running on the machine is neither used nor disturbed, and several test sessions can each have
theirs (bridge and namespace names carry the session's pid and a random tag). Daemons are stopped by their pid
files, and processes inside a node by their network namespace, never by name; the teardown runs on every exit
path of the fixtures.

SLURM itself (Debian's slurmctld, slurmd, slurm-client, munge) is installed when missing, once per test
session and before the first test starts, with its own time limit (``INSTALL_TIMEOUT_S``), so the install is
not charged to a test's timeout; see ``install_if_needed`` (called from tests/conftest.py). Without root,
apt-get, or within the time limit, the tests that need SLURM are skipped with the reason.

A session that dies without its teardown (a crash, SIGKILL) leaves its cluster running; the next session
removes it before starting its own (``remove_stale_clusters``; each cluster records its owner's pid).

Also runnable by hand to debug a script:
    python tests/slurm_cluster.py start        # one node; prints the SLURM_CONF to export, runs until Ctrl-C
    python tests/slurm_cluster.py start2       # the two-node cluster (root)
    python tests/slurm_cluster.py cleanup      # remove clusters whose session died
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import pytest

from procs import within_test_timeout

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "munged"]
INSTALL_TIMEOUT_S = 300  # apt-get update and install together; the suite's 20-minute CI budget includes it

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


class SlurmUnavailable(Exception):
    """SLURM cannot be installed or started here; the message says why."""


_install_failure: Optional[str] = None  # why SLURM is missing after install_if_needed, for the skip message


def _installed() -> bool:
    return all(shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") for b in BINARIES)


def ensure_installed(timeout: float = INSTALL_TIMEOUT_S) -> None:
    """Install SLURM with apt-get unless it is there; raises SlurmUnavailable saying why it cannot be."""
    if _installed():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("SLURM is not installed and installing it needs root (apt-get install "
                               + " ".join(PACKAGES) + ")")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("SLURM is not installed and apt-get is not available to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    deadline = time.monotonic() + timeout
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                 timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"installing SLURM took longer than {timeout:.0f} s ({' '.join(cmd)}); install "
                                   f"{' '.join(PACKAGES)} beforehand") from None
        if out.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n"
                                   f"{out.stderr[-3000:]}")


def install_if_needed(session) -> None:
    """pytest_collection_finish: install SLURM before the tests run when a collected test needs a cluster."""
    global _install_failure
    if not any({"slurm", "slurm2"} & set(getattr(item, "fixturenames", ())) for item in session.items):
        return
    try:
        ensure_installed()
    except SlurmUnavailable as exc:
        _install_failure = str(exc)


def _require_installed() -> None:
    if _install_failure is not None:
        pytest.skip(_install_failure)
    try:
        ensure_installed()  # only reached without the conftest hook, e.g. this module used on its own
    except SlurmUnavailable as exc:
        pytest.skip(str(exc))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_from(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Running: neither gone nor a zombie (a zombie child of ours is dead but waits to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _terminate(pid: int, grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it is still there after `grace` seconds."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def _process_started(pid: int) -> Optional[str]:
    """When the process started (clock ticks since boot), which tells it from a later one with its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _pids_with_env(entry: str) -> list[int]:
    """Processes whose environment holds `entry` ("NAME=value"), other than this one."""
    needle = entry.encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except (FileNotFoundError, PermissionError, ProcessLookupError):
                continue
    return pids


def _netns_pids(name: str) -> list[int]:
    """Processes inside the network namespace /run/netns/`name`."""
    try:
        target = os.stat(f"/run/netns/{name}")
    except FileNotFoundError:
        return []
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ns = os.stat(proc / "ns" / "net")
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        if (ns.st_dev, ns.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(proc.name))
    return pids


def _kill_all(list_pids, what: str, timeout: float = 30.0, reap=lambda: None) -> None:
    """SIGKILL the processes `list_pids()` returns until there are none; `reap` waits for our own children."""
    end = time.monotonic() + timeout
    while True:
        reap()
        pids = list_pids()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > end:
            raise RuntimeError(f"processes {pids} of {what} survived SIGKILL for {timeout:.0f} s")
        time.sleep(0.1)


def _ip(*args: str, check: bool = True) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({out.returncode}): {out.stderr}")


def remove_stale_clusters() -> list[Path]:
    """Remove the clusters of test sessions that died without their teardown (a crash, SIGKILL): their
    processes (the daemons and every job process carry the cluster's SLURM_CONF; the nodes' are found by
    network namespace), namespaces, bridge and directory. A cluster whose session still runs is left alone.
    Returns the directories removed."""
    removed = []
    for record in Path(tempfile.gettempdir()).glob("ddp_kit_slurm_*/owner.json"):
        try:
            owner = json.loads(record.read_text())
        except (OSError, ValueError):
            continue  # being written by a session starting right now
        if _process_started(owner["pid"]) == owner["started"]:
            continue
        base = record.parent
        _kill_all(lambda: _pids_with_env(f"SLURM_CONF={base / 'slurm.conf'}"), f"the cluster in {base}")
        for ns in owner["netns"]:
            _kill_all(lambda ns=ns: _netns_pids(ns), f"namespace {ns}")
            _ip("netns", "del", ns, check=False)
        for link in owner["links"]:
            _ip("link", "del", link, check=False)
        shutil.rmtree(base, ignore_errors=True)
        removed.append(base)
    return removed


class SlurmCluster:
    """One node (this machine, 127.0.0.1) with its real CPUs and memory."""

    def __init__(self, base: Path):
        self.base = base
        self.hostname = socket.gethostname().split(".")[0]
        self.conf = base / "slurm.conf"
        self.munge_socket = base / "munge" / "munge.socket"
        # Stopped in this order: the nodes, then the controller, then munge.
        self.pid_files = {**self._slurmd_pid_files(), "slurmctld": base / "slurmctld.pid",
                          "munged": base / "munge" / "munged.pid"}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.env["PATH"] = self.env.get("PATH", "") + ":/usr/sbin:/sbin"
        # What remove_stale_clusters needs should this session die without its teardown.
        netns, links = self._network_names()
        (base / "owner.json").write_text(json.dumps({"pid": os.getpid(), "started": _process_started(os.getpid()),
                                                      "netns": netns, "links": links}))

    # ---- what differs between the single-node and the two-node cluster ---------------------------------
    def _slurmd_pid_files(self) -> dict[str, Path]:
        return {"slurmd": self.base / "slurmd.pid"}

    def _network_names(self) -> tuple[list[str], list[str]]:
        """The network namespaces and links this cluster creates."""
        return [], []

    def _controller_address(self) -> str:
        return "127.0.0.1"

    def _node_conf(self) -> list[str]:
        """The node lines, the partition and the nodes' files."""
        b = self.base
        (b / "spool").mkdir()
        # The node's real CPUs, sockets and memory as slurmd sees them, so the node is not drained as 'low'.
        first = subprocess.run(["slurmd", "-C"], env=self.env, capture_output=True, text=True, timeout=60,
                               check=True).stdout.splitlines()[0]
        fields = [f for f in first.split() if not f.startswith(("NodeName=", "UpTime="))]
        return [f"SlurmdSpoolDir={b / 'spool'}", f"SlurmdPidFile={self.pid_files['slurmd']}",
                f"SlurmdLogFile={b / 'slurmd.log'}",
                f"NodeName={self.hostname} NodeAddr=127.0.0.1 " + " ".join(fields) + " State=UNKNOWN",
                f"PartitionName=debug Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP"]

    def _start_nodes(self) -> None:
        self._run(["slurmd", "-f", str(self.conf)])

    def _log_files(self) -> list[Path]:
        return [self.base / "slurmd.log"]

    # ---- lifecycle -------------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        self._start_munge()
        self._write_conf()
        # -i: ignore state from any earlier cluster in this directory; the state dir is fresh anyway.
        self._run(["slurmctld", "-i", "-f", str(self.conf)])
        self._start_nodes()
        self.wait_nodes_idle(timeout)

    def wait_nodes_idle(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        states = ""
        while time.monotonic() < end:
            states = self.cmd(["sinfo", "-h", "-N", "-o", "%t"], check=False).split()
            if states and all(s == "idle" for s in states):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node(s) did not become idle within {timeout:.0f} s (sinfo: {states!r});"
                           f" logs in {self.base}:\n{self.logs()}")

    def stop(self) -> None:
        for path in self.pid_files.values():
            pid = _pid_from(path)
            if pid is not None and _alive(pid):
                _terminate(pid)
        # Whatever a job left running (its processes carry the cluster's SLURM_CONF).
        _kill_all(lambda: _pids_with_env(f"SLURM_CONF={self.conf}"), f"the cluster in {self.base}",
                  reap=self._reap)

    def _reap(self) -> None:
        """Wait for daemons that are this process's children and have exited (the single node's daemonize)."""

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
        (b / "state").mkdir()
        lines = [
            "ClusterName=ddpkit",
            f"SlurmctldHost={self.hostname}({self._controller_address()})",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={b / 'state'}",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmctldLogFile={b / 'slurmctld.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobRequeue=1",
            "MinJobAge=3600",  # keep finished jobs visible to `scontrol show job` for the whole session
            "KillWait=30",
            # 'verbose' logs slurmstepd's "sent signal N to pid P StepId=J.batch": when the batch shell got a signal
            "SlurmdDebug=verbose",
            *self._node_conf(),
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _run(self, cmd: list[str]) -> None:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stdout}{out.stderr}\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        parts = []
        for p in (self.base / "slurmctld.log", *self._log_files(), self.base / "munge" / "munged.log"):
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

    def output(self, job_id: str) -> str:
        """What the job has written to its output file so far."""
        path = Path(self.job(job_id)["StdOut"])
        return path.read_text(errors="replace") if path.exists() else f"(no output file {path})"

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        timeout = within_test_timeout(timeout)
        end = time.monotonic() + timeout
        info = self.job(job_id)
        while info["JobState"] not in states:
            if time.monotonic() > end:
                raise TimeoutError(f"job {job_id} still {info['JobState']} after {timeout:.0f} s, wanted one of"
                                   f" {sorted(states)}:\n{info}\n{self.logs()}")
            time.sleep(0.5)
            info = self.job(job_id)
        return info

    def wait_for_log(self, pattern: str, timeout: float) -> re.Match:
        """The first line of the daemons' logs that matches `pattern`, waiting for it up to `timeout` seconds."""
        timeout = within_test_timeout(timeout)
        end = time.monotonic() + timeout
        while True:
            for path in (self.base / "slurmctld.log", *self._log_files()):
                if path.exists():
                    match = re.search(pattern, path.read_text(errors="replace"), re.MULTILINE)
                    if match:
                        return match
            if time.monotonic() > end:
                raise TimeoutError(f"no log line matching {pattern!r} within {timeout:.0f} s:\n{self.logs()}")
            time.sleep(0.2)

    def release(self, job_id: str) -> None:
        """Start a requeued job now instead of after SLURM's hold-off (about 2 minutes). Not at once: slurmd
        refuses a credential issued in the same second as the revocation of the previous run's ("Job
        credential revoked")."""
        time.sleep(3)
        self.cmd(["scontrol", "update", f"jobid={job_id}", "StartTime=now"])

    def cancel_all(self) -> None:
        self.cmd(["scancel", "--full", "--user", "root"], check=False)


def _free_subnet() -> str:
    """A random 10.x.y.0/24 that overlaps no address or route on this machine: its first three octets."""
    text = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, timeout=30).stdout
    text += subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True,
                           timeout=30).stdout
    used = []
    for word in re.findall(r"\b\d+\.\d+\.\d+\.\d+(?:/\d+)?\b", text):
        net = ipaddress.ip_network(word, strict=False)
        if net.prefixlen > 0:  # the default route's 0.0.0.0/0 overlaps everything but is no address in use
            used.append(net)
    for _ in range(100):
        candidate = ipaddress.ip_network(f"10.{secrets.randbelow(155) + 100}.{secrets.randbelow(256)}.0/24")
        if not any(candidate.overlaps(n) for n in used):
            return str(candidate.network_address).rsplit(".", 1)[0]
    raise SlurmUnavailable("found no free private /24 for the two-node cluster's bridge")


class TwoNodeCluster(SlurmCluster):
    """node1 and node2 in network namespaces on a private bridge; see the module docstring."""

    NODES = ("node1", "node2")
    CPUS_PER_NODE = 4
    GPUS_PER_NODE = 2
    SLURMD_TIMEOUT_S = 20  # a lost node is marked down after this (the node-loss test waits for it)

    def __init__(self, base: Path):
        # Interface names have at most 15 characters: "dk" + pid + 4 hex + 2.
        tag = f"dk{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.bridge = f"{tag}br"
        self.netns = {n: f"{tag}-{n}" for n in self.NODES}
        self.veth_host = {n: f"{tag}h{i}" for i, n in enumerate(self.NODES, 1)}
        self.veth_node = {n: f"{tag}n{i}" for i, n in enumerate(self.NODES, 1)}
        self.subnet = _free_subnet()
        self.address = {n: f"{self.subnet}.{10 + i}" for i, n in enumerate(self.NODES, 1)}
        self._slurmd: dict[str, subprocess.Popen] = {}
        super().__init__(base)

    def _slurmd_pid_files(self) -> dict[str, Path]:
        return {f"slurmd {n}": self.base / f"slurmd-{n}.pid" for n in self.NODES}

    def _network_names(self) -> tuple[list[str], list[str]]:
        return list(self.netns.values()), [*self.veth_host.values(), self.bridge]

    def _controller_address(self) -> str:
        return f"{self.subnet}.1"

    def _node_conf(self) -> list[str]:
        b = self.base
        (b / "gpus").mkdir()
        for i in range(self.GPUS_PER_NODE):  # stand-ins for /dev/nvidiaN: character devices, as slurmd checks
            os.mknod(b / "gpus" / f"nvidia{i}", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's numbers
        (b / "gres.conf").write_text(f"Name=gpu File={b / 'gpus'}/nvidia[0-{self.GPUS_PER_NODE - 1}]\n")
        nodes = ",".join(self.NODES)
        return [
            f"SlurmdSpoolDir={b}/spool-%n", f"SlurmdPidFile={b}/slurmd-%n.pid", f"SlurmdLogFile={b}/slurmd-%n.log",
            "SlurmdParameters=config_overrides",  # the nodes declare more CPUs and GPUs than this machine has
            f"SlurmdTimeout={self.SLURMD_TIMEOUT_S}",
            "EnforcePartLimits=ALL",  # as at many sites: a request no node can meet fails at submission
            "GresTypes=gpu",
            *(f"NodeName={n} NodeAddr={self.address[n]} NodeHostname={n} CPUs={self.CPUS_PER_NODE} Boards=1 "
              f"SocketsPerBoard=1 CoresPerSocket={self.CPUS_PER_NODE} ThreadsPerCore=1 RealMemory=4000 "
              f"Gres=gpu:{self.GPUS_PER_NODE} State=UNKNOWN" for n in self.NODES),
            f"PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP",
        ]

    def _log_files(self) -> list[Path]:
        return [self.base / f"slurmd-{n}.{ext}" for n in self.NODES for ext in ("log", "out")]

    # ---- network ------------------------------------------------------------------------------------------
    def _make_network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self._controller_address()}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for n in self.NODES:
            ns, host, node = self.netns[n], self.veth_host[n], self.veth_node[n]
            _ip("netns", "add", ns)
            _ip("link", "add", host, "type", "veth", "peer", "name", node)
            _ip("link", "set", node, "netns", ns)
            _ip("link", "set", host, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.address[n]}/24", "dev", node)
            _ip("-n", ns, "link", "set", node, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            # The node's /etc/hosts: the controller's name and both nodes by their bridge addresses.
            (self.base / f"hosts-{n}").write_text(
                f"127.0.0.1 localhost\n{self._controller_address()} {self.hostname}\n"
                + "".join(f"{self.address[m]} {m}\n" for m in self.NODES))

    @contextlib.contextmanager
    def slow_network(self, rate: str = "4mbit"):
        """Limit what the bridge delivers to each node to `rate` (tbf): a step's gradient all-reduce then takes
        about a second, so a test can signal a tiny run mid-training and wait for SLURM at little CPU cost."""
        try:
            for n in self.NODES:
                subprocess.run(["tc", "qdisc", "add", "dev", self.veth_host[n], "root", "tbf", "rate", rate,
                                "burst", "16kb", "limit", "4mb"], check=True, capture_output=True, timeout=30)
            yield
        finally:
            for n in self.NODES:
                subprocess.run(["tc", "qdisc", "del", "dev", self.veth_host[n], "root"], capture_output=True,
                               timeout=30)

    def bridge_bytes(self, node: str) -> int:
        """Bytes sent and received by `node` over the bridge so far."""
        stats = Path("/sys/class/net") / self.veth_host[node] / "statistics"
        return sum(int((stats / f).read_text()) for f in ("rx_bytes", "tx_bytes"))

    # ---- nodes ----------------------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        self._make_network()
        super().start(timeout)

    def _start_nodes(self) -> None:
        for n in self.NODES:
            self.start_node(n)

    def start_node(self, node: str) -> None:
        """slurmd in the node's network namespace, with its own hostname and /etc/hosts in private UTS and
        mount namespaces. Not `ip netns exec`: it remounts /sys, which hides the cgroup mounts slurmd needs."""
        log = (self.base / f"slurmd-{node}.out").open("a")
        self._slurmd[node] = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns[node]}", "unshare", "--uts", "--mount",
             "--propagation", "private", "--", "sh", "-c",
             f"mount --bind {self.base / f'hosts-{node}'} /etc/hosts && hostname {node} && "
             f"exec slurmd -D -N {node} -f {self.conf}"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def _reap(self) -> None:
        for node, proc in list(self._slurmd.items()):
            if proc.poll() is not None:
                del self._slurmd[node]  # reaped: a zombie would still count as inside the namespace

    def kill_node_processes(self, node: str) -> None:
        """SIGKILL everything running inside the node: its slurmd, job steps, batch scripts."""
        _kill_all(lambda: _netns_pids(self.netns[node]), f"{node}'s namespace", reap=self._reap)

    def lose_node(self, node: str) -> None:
        """The node drops off the network and everything on it dies at once (as a power loss would)."""
        _ip("link", "set", self.veth_host[node], "down")
        self.kill_node_processes(node)

    def restore_node(self, node: str, timeout: float = 60.0) -> None:
        """Back on the network with a fresh slurmd, and back in service."""
        _ip("link", "set", self.veth_host[node], "up")
        self.start_node(node)
        end = time.monotonic() + timeout
        state = ""
        while time.monotonic() < end:
            state = self.cmd(["sinfo", "-h", "-n", node, "-o", "%t"], check=False).strip()
            if state == "idle":
                return
            if state in ("down", "drain"):  # responding again ('*' gone) but still out of service
                self.cmd(["scontrol", "update", f"nodename={node}", "state=resume"], check=False)
            time.sleep(0.5)
        raise RuntimeError(f"{node} did not come back within {timeout:.0f} s (sinfo: {state!r}):\n{self.logs()}")

    def stop(self) -> None:
        """Everything this cluster started, and its network; each step runs even when an earlier one failed."""
        errors = []
        for step in (super().stop, *(lambda n=n: self.kill_node_processes(n) for n in self.NODES)):
            try:
                step()
            except Exception as exc:  # keep tearing down; report at the end
                errors.append(exc)
        for n in self.NODES:
            _ip("link", "del", self.veth_host[n], check=False)
            _ip("netns", "del", self.netns[n], check=False)
        _ip("link", "del", self.bridge, check=False)
        if errors:
            raise errors[0]


def _cluster(kind: type[SlurmCluster]):
    _require_installed()
    if kind is TwoNodeCluster:
        if os.geteuid() != 0:
            pytest.skip("the two-node SLURM cluster needs root (network namespaces, a bridge)")
        missing = [tool for tool in ("ip", "tc", "nsenter", "unshare") if shutil.which(tool) is None]
        if missing:
            pytest.skip(f"the two-node SLURM cluster needs {', '.join(missing)} (iproute2, util-linux)")
    remove_stale_clusters()
    cluster = kind(Path(tempfile.mkdtemp(prefix="ddp_kit_slurm_")))
    try:
        try:
            cluster.start()
        except SlurmUnavailable as exc:
            pytest.skip(str(exc))
        yield cluster
    finally:
        try:
            cluster.cancel_all()
        finally:
            cluster.stop()
            shutil.rmtree(cluster.base, ignore_errors=True)  # failures already quoted the daemons' logs


@pytest.fixture(scope="session")
def slurm():
    """A started single-node SLURM cluster for the whole session; skipped with the reason where it cannot exist."""
    yield from _cluster(SlurmCluster)


@pytest.fixture(scope="session")
def slurm2():
    """A started two-node SLURM cluster (TwoNodeCluster) for the whole session; skipped where it cannot exist."""
    yield from _cluster(TwoNodeCluster)


if __name__ == "__main__":
    import sys

    kinds = {"start": SlurmCluster, "start2": TwoNodeCluster}
    if len(sys.argv) != 2 or sys.argv[1] not in (*kinds, "cleanup"):
        sys.exit("usage: python tests/slurm_cluster.py start|start2|cleanup")
    if sys.argv[1] == "cleanup":
        for path in remove_stale_clusters():
            print(f"removed the cluster of a dead session: {path}")
        sys.exit(0)
    ensure_installed()
    # Stop on SIGTERM as on Ctrl-C; both may be ignored when started in the background, so install them.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    c = kinds[sys.argv[1]](Path(tempfile.mkdtemp(prefix="ddp_kit_slurm_")))
    try:
        c.start()
        print(f"export SLURM_CONF={c.conf}   # then sbatch/squeue/scontrol as usual; Ctrl-C or SIGTERM stops it",
              flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.cancel_all()
        c.stop()
        shutil.rmtree(c.base, ignore_errors=True)
