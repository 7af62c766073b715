"""Preemption: stop signals become a flag the training loop acts on at an optimizer-step boundary.

The contract with the training loop:

* ``StopSignals(cfg.preemption.signals)`` installs handlers that only record that a signal arrived. The loop
  reads ``stop.requested`` at every optimizer-step boundary and combines it across ranks (all-reduce MAX) so
  that every rank stops after the same step, even when only one rank was signalled.
* On a stop the loop saves a checkpoint, waits for every rank (barrier), rank 0 calls
  ``write_requeue_marker`` and every rank exits with ``PREEMPTED_EXIT_CODE``.
* A batch script (``slurm/*.sbatch``) requeues the job when it finds the marker after the training step ends;
  the requeued run resumes from the checkpoint (``train.resume: auto``) and rank 0 removes the marker at
  startup with ``clear_requeue_marker``.

Why the exit code is 0: torchrun treats any non-zero worker exit as a failure and, with ``--max-restarts``
above 0, restarts the worker group, which would resume and keep training instead of stopping. A preempted
worker therefore exits 0 and the requeue decision is made on the marker file, never on an exit code.

Why there is a watchdog: a signal handler written in Python runs only between bytecodes of the main thread,
so a rank blocked inside a collective (its peer is stuck or gone) would not even notice SIGTERM until the
collective times out (``distributed.timeout_s``, minutes). SIGTERM is the signal that is followed by SIGKILL
after a grace period (torchrun: 30 s, ``--shutdown-timeout``; SLURM: ``KillWait``, 30 s by default), so after
SIGTERM or SIGINT a helper thread, woken by the interpreter's signal wakeup fd even while the main thread is
blocked, gives the loop ``deadline_s`` to finish stopping and otherwise ends the process itself, saying why,
with exit code 128 + signal number. The last complete checkpoint is untouched (checkpoints are written
atomically), so a resumed run loses only the steps since then. Signals sent ahead of a deadline (SIGUSR2 from
``#SBATCH --signal``) have no deadline: the loop has until the time limit to reach the next step boundary.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Iterable, Optional

from .files import atomic_write_text

PREEMPTED_EXIT_CODE = 0

# Signals after which the sender kills the process after a short grace period.
URGENT_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})

DEFAULT_DEADLINE_S = 25.0  # below torchrun's and SLURM's default 30 s grace, so our message gets out first

_active: Optional["StopSignals"] = None


def _to_signal(name: str | int | signal.Signals) -> signal.Signals:
    if isinstance(name, str):
        try:
            return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
        except KeyError:
            raise ValueError(f"unknown signal name {name!r} (e.g. SIGUSR2, SIGTERM)") from None
    return signal.Signals(name)


class StopSignals:
    """Record stop signals as a flag; see the module docstring for how the loop uses it.

    Must be created in the main thread (Python delivers signals only there). Use ``restore()`` (or ``with``)
    to put the previous handlers back.
    """

    def __init__(self, signals: Iterable[str | int | signal.Signals] = ("SIGUSR2", "SIGTERM"), *,
                 deadline_s: Optional[float] = DEFAULT_DEADLINE_S):
        global _active
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopSignals must be created in the main thread (signals are delivered there)")
        if _active is not None:
            raise RuntimeError("StopSignals is already installed in this process; restore() it first")
        self._signals = list(dict.fromkeys(_to_signal(s) for s in signals))
        self._signum = 0  # the first stop signal's number; 0 until one arrives
        # Who this process is, for the line each process writes when a stop signal reaches it: the log then shows
        # which ranks of which nodes the signal reached (all of them, when the batch script forwarded it right),
        # where the all-reduce at the step boundary would hide it.
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "?"))
        self._who = f"rank {rank} on {socket.gethostname()}, pid {os.getpid()}"
        self._deadline_s = deadline_s
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self._signals}
        self._done = threading.Event()
        self._watchdog: Optional[threading.Thread] = None
        self._wakeup_r = self._wakeup_w = None
        self._previous_wakeup_fd = -1
        if deadline_s is not None and URGENT_SIGNALS.intersection(self._signals):
            self._start_watchdog()
        _active = self

    def _handle(self, signum, frame) -> None:
        # Only record (and say so, with one unbuffered write): the loop does the I/O and collectives at the next
        # step boundary.
        if not self._signum:
            self._signum = signum
            line = f"ddp_kit: {signal.Signals(signum).name} received by {self._who}; stopping at the next step\n"
            with contextlib.suppress(OSError):  # stderr closed: the stop itself must still happen
                os.write(2, line.encode())

    @property
    def requested(self) -> bool:
        return self._signum != 0

    @property
    def signal_name(self) -> Optional[str]:
        return signal.Signals(self._signum).name if self._signum else None

    @property
    def signal_number(self) -> int:
        """The first signal's number, 0 before any. All-reduced with MAX instead of the 0/1 flag, it tells every
        rank that a signal arrived somewhere and which, so rank 0 can name it in the marker even when only
        another rank was signalled: ``signal.Signals(n).name``."""
        return self._signum

    @property
    def signals(self) -> list[signal.Signals]:
        return list(self._signals)

    def restore(self) -> None:
        """Reinstall the previous handlers and stop the watchdog; safe to call more than once."""
        global _active
        if _active is not self:
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        if self._watchdog is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            self._done.set()
            self._wakeup_w.send(b"\0")  # wakes the watchdog when it is still waiting for a signal
            self._watchdog.join()
            self._wakeup_r.close()
            self._wakeup_w.close()
        _active = None

    def __enter__(self) -> "StopSignals":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _start_watchdog(self) -> None:
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(True)
        self._wakeup_w.setblocking(False)
        # The C-level handler writes the signal number here at once, even while the main thread is blocked.
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        urgent = {int(s) for s in URGENT_SIGNALS.intersection(self._signals)}
        self._watchdog = threading.Thread(target=self._watch, args=(urgent,), name="ddp_kit-stop-watchdog",
                                          daemon=True)
        self._watchdog.start()

    def _watch(self, urgent: set[int]) -> None:
        while not self._done.is_set():
            data = self._wakeup_r.recv(64)
            hit = [b for b in data if b in urgent]
            if hit:
                break
        else:
            return
        if self._done.wait(self._deadline_s):
            return
        name = signal.Signals(hit[0]).name
        msg = (f"ddp_kit: {name} received {self._deadline_s:g} s ago and the training loop has not stopped "
               f"({self._who}); it is probably blocked in a "
               f"collective waiting for another rank. Exiting now, before the sender's SIGKILL; a resumed run "
               f"starts from the last complete checkpoint.\n")
        os.write(2, msg.encode())
        os._exit(128 + hit[0])


def _reset_in_child() -> None:
    # A forked child (e.g. a DataLoader worker) inherits the handlers and the wakeup fd, so its signals would
    # wake the parent's watchdog. Point the child's copy of the fd at /dev/null; dup2 works from any thread,
    # unlike signal.set_wakeup_fd, and keeps the fd number from being reused for an unrelated file.
    if _active is not None and _active._watchdog is not None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, _active._wakeup_w.fileno())
        os.close(devnull)


os.register_at_fork(after_in_child=_reset_in_child)


def protect_dataloader_worker() -> None:
    """Call first thing in a DataLoader ``worker_init_fn``: keeps the worker alive through a stop.

    torchrun sends SIGTERM to each worker's whole process group, and SLURM signals every process of a step,
    so DataLoader workers receive the stop signals too. PyTorch's worker handler exits on any SIGTERM, and the
    training process then raises "DataLoader worker ... is killed by signal" in the middle of its orderly stop.
    Here SIGTERM ends the worker only when its parent sends it (PyTorch and multiprocessing shut workers down
    that way); from anyone else it is ignored, and the parent shuts the worker down after its checkpoint.
    SIGUSR1/SIGUSR2 are ignored (a spawned worker would otherwise die of them). A worker whose parent died
    still exits on its own (PyTorch's worker watchdog). Threads started before this call do not block SIGTERM
    and may take its default action: none exist in a forked worker, but a spawned one has imported numpy, whose
    OpenBLAS starts a pool unless OMP_NUM_THREADS=1 (torchrun's default with several processes).
    """
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    # Blocked in this thread and in every thread started from it: only the waiter below receives SIGTERM,
    # and it can see who sent it, which a signal handler written in Python cannot.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parent = os.getppid()

    def wait_for_parents_sigterm() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            continue
        os._exit(0)

    threading.Thread(target=wait_for_parents_sigterm, name="ddp_kit-worker-sigterm", daemon=True).start()


def marker_path(run_dir: str | os.PathLike, name: str) -> Path:
    return Path(run_dir) / name


def write_requeue_marker(run_dir: str | os.PathLike, name: str, *, step: int,
                         signal_name: Optional[str]) -> Path:
    """Write the marker atomically (a batch script may look at any moment); returns its path."""
    path = marker_path(run_dir, name)
    info = {
        "step": step,
        "signal": signal_name,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    atomic_write_text(path, json.dumps(info) + "\n")
    return path


def read_requeue_marker(run_dir: str | os.PathLike, name: str) -> Optional[dict]:
    """The marker's contents, or None when there is no marker."""
    try:
        return json.loads(marker_path(run_dir, name).read_text())
    except FileNotFoundError:
        return None


def clear_requeue_marker(run_dir: str | os.PathLike, name: str) -> bool:
    """Remove the marker; True when there was one."""
    try:
        marker_path(run_dir, name).unlink()
    except FileNotFoundError:
        return False
    return True


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m ddp_kit.preemption marker --config C [overrides]`: print the marker's path for that run.

    The batch scripts use it to find the marker without parsing the YAML config themselves.
    """
    parser = argparse.ArgumentParser(prog="python -m ddp_kit.preemption")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("marker", help="print the absolute path of the run's requeue marker")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="key=value config overrides, as given to training")
    args = parser.parse_args(argv)

    from ddp_kit.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(marker_path(cfg.run_dir, cfg.preemption.requeue_marker).absolute())
    return 0


if __name__ == "__main__":
    sys.exit(main())
