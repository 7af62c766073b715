"""Unit tests of ddp_kit.preemption: signal -> flag, handler restore, the stop watchdog, marker files."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from ddp_kit.preemption import (
    PREEMPTED_EXIT_CODE,
    StopSignals,
    clear_requeue_marker,
    read_requeue_marker,
    write_requeue_marker,
)


def _wait_for(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_exit_code_is_zero_so_torchrun_does_not_restart():
    assert PREEMPTED_EXIT_CODE == 0


def test_signal_sets_flag_and_remembers_first_signal():
    with StopSignals(["SIGUSR2", "SIGTERM"]) as stop:
        assert not stop.requested and stop.signal_name is None and stop.signal_number == 0
        os.kill(os.getpid(), signal.SIGUSR2)
        assert _wait_for(lambda: stop.requested)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.signal_name == "SIGUSR2" and stop.signal_number == signal.SIGUSR2


def test_short_names_and_numbers_are_accepted():
    with StopSignals(["USR1", signal.SIGUSR2]) as stop:
        assert stop.signals == [signal.SIGUSR1, signal.SIGUSR2]
        os.kill(os.getpid(), signal.SIGUSR1)
        assert _wait_for(lambda: stop.requested)
        assert stop.signal_name == "SIGUSR1"


def test_restore_puts_previous_handlers_back():
    seen = []

    def previous(signum, frame):
        seen.append(signum)

    old = signal.signal(signal.SIGUSR2, previous)
    try:
        term_before = signal.getsignal(signal.SIGTERM)
        stop = StopSignals(["SIGUSR2", "SIGTERM"])
        assert signal.getsignal(signal.SIGUSR2) != previous
        stop.restore()
        stop.restore()  # idempotent: teardown may run it again after an exception path did
        assert signal.getsignal(signal.SIGUSR2) is previous
        assert signal.getsignal(signal.SIGTERM) == term_before
        assert signal.set_wakeup_fd(-1) == -1  # the watchdog's wakeup fd is gone too
        os.kill(os.getpid(), signal.SIGUSR2)
        assert _wait_for(lambda: seen == [signal.SIGUSR2])
        assert not stop.requested
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_restore_runs_on_exceptions_with_context_manager():
    before = signal.getsignal(signal.SIGUSR2)
    with pytest.raises(KeyError):
        with StopSignals(["SIGUSR2"]):
            raise KeyError("boom")
    assert signal.getsignal(signal.SIGUSR2) == before


def test_only_one_instance_and_only_main_thread():
    with StopSignals(["SIGUSR2"]):
        with pytest.raises(RuntimeError, match="already installed"):
            StopSignals(["SIGUSR2"])
    errors = []

    def in_thread():
        try:
            StopSignals(["SIGUSR2"])
        except RuntimeError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert errors and "main thread" in errors[0]


def test_unknown_signal_name_is_an_error():
    with pytest.raises(ValueError, match="SIGNOPE"):
        StopSignals(["SIGNOPE"])


_WORKER = textwrap.dedent("""
    import os, signal, sys, time
    from ddp_kit.preemption import protect_dataloader_worker
    protect_dataloader_worker()
    print("ready", flush=True)
    for _ in range(600):
        time.sleep(0.1)
""")


def test_protected_worker_ignores_sigterm_from_others_but_obeys_its_parent():
    # OMP_NUM_THREADS=1 as torchrun sets it: importing ddp_kit imports numpy, whose OpenBLAS would otherwise start
    # a thread pool before protect_dataloader_worker runs; a thread that does not block SIGTERM takes its default
    # action (a forked DataLoader worker has no such thread: fork copies only the calling thread)
    worker = subprocess.Popen([sys.executable, "-c", _WORKER], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert worker.stdout.readline().strip() == "ready"
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            worker.send_signal(sig)
        # From a process other than the worker's parent, as torchrun's or slurmstepd's SIGTERM.
        subprocess.run([sys.executable, "-c", f"import os, signal; os.kill({worker.pid}, signal.SIGTERM)"],
                       check=True, timeout=60)
        with pytest.raises(subprocess.TimeoutExpired):
            worker.wait(timeout=1.5)
        worker.send_signal(signal.SIGTERM)  # from this test process: its parent, as DataLoader shutdown does
        assert worker.wait(timeout=30) == 0
    finally:
        worker.kill()
        worker.wait()


# The watchdog runs in a child interpreter: it ends the process, and the test must see how.
_BLOCKED_CHILD = textwrap.dedent("""
    import os, sys, signal
    from ddp_kit.preemption import StopSignals
    stop = StopSignals(["SIGUSR2", "SIGTERM"], deadline_s=float(sys.argv[1]))
    r, w = os.pipe()
    print("ready", flush=True)
    # Stands for a rank blocked in a collective: nothing comes through this pipe.
    if sys.argv[2] == "block":
        os.read(r, 1)
    else:
        while not stop.requested:
            signal.pause()
        stop.restore()
        print("stopped in order by", stop.signal_name, flush=True)
""")


def _start_child(deadline, mode):
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKED_CHILD, str(deadline), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_watchdog_ends_a_blocked_process_after_sigterm_deadline():
    proc = _start_child(1.0, "block")
    try:
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert 0.9 <= took < 10
    assert "SIGTERM received 1 s ago" in err and "blocked in a collective" in err


def test_no_deadline_after_sigusr2():
    proc = _start_child(0.5, "block")
    try:
        proc.send_signal(signal.SIGUSR2)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=2)
    finally:
        proc.kill()
        proc.communicate()


def test_orderly_stop_within_deadline_is_not_cut_short():
    proc = _start_child(1.0, "loop")
    try:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopped in order by SIGTERM" in out
    assert "blocked in a collective" not in err


def test_signal_in_forked_child_does_not_arm_the_parents_watchdog():
    code = textwrap.dedent("""
        import os, signal, time
        from ddp_kit.preemption import StopSignals
        stop = StopSignals(["SIGTERM"], deadline_s=0.3)
        pid = os.fork()
        if pid == 0:
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(0)
        os.waitpid(pid, 0)
        time.sleep(1.0)
        print("parent alive, requested =", stop.requested)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "parent alive, requested = False" in out.stdout


def test_marker_write_read_clear(tmp_path):
    run_dir = tmp_path / "runs" / "exp"
    assert read_requeue_marker(run_dir, "REQUEUE") is None
    assert clear_requeue_marker(run_dir, "REQUEUE") is False
    path = write_requeue_marker(run_dir, "REQUEUE", step=42, signal_name="SIGUSR2")
    assert path == run_dir / "REQUEUE"
    info = read_requeue_marker(run_dir, "REQUEUE")
    assert info["step"] == 42 and info["signal"] == "SIGUSR2"
    assert json.loads(path.read_text()) == info
    assert sorted(p.name for p in run_dir.iterdir()) == ["REQUEUE"]  # no temporary file left behind
    write_requeue_marker(run_dir, "REQUEUE", step=43, signal_name=None)  # overwrites in place
    assert read_requeue_marker(run_dir, "REQUEUE")["step"] == 43
    assert clear_requeue_marker(run_dir, "REQUEUE") is True
    assert not path.exists()


def test_marker_cli_prints_the_path_the_batch_scripts_check(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{name: exp, output_dir: {tmp_path / 'out'}}}\n"
                   f"data: {{path: {tmp_path / 'd.h5'}, create_if_missing: digits}}\n")
    out = subprocess.run([sys.executable, "-m", "ddp_kit.preemption", "marker", "--config", str(cfg),
                          "run.name=other", "preemption.requeue_marker=PLEASE_REQUEUE"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "out" / "other" / "PLEASE_REQUEUE")
    bad = subprocess.run([sys.executable, "-m", "ddp_kit.preemption", "marker", "--config", str(cfg),
                          "run.nam=x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "run.nam" in bad.stderr
