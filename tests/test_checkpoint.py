"""Checkpoint files: atomic saves, weights-only loading, the manager's pointer and retention, RNG states, export."""

from __future__ import annotations

import io
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel

from ddp_kit.checkpoint import (CheckpointError, CheckpointManager, capture_rng_state, load_checkpoint,
                                restore_rng_state, save_atomic)
from ddp_kit.weights import export_weights, load_weights, model_state_dict
from ddp_kit.cli import build_parser
from ddp_kit.config import CheckpointConfig, Config, to_dict

SUBPROCESS_TIMEOUT_S = 120


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def assert_same(a, b, where="state"):
    """Nested containers equal, tensors bit-identical (and of the same dtype)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def truncate_to_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class WritesMarkerWhenUnpickled:
    """Unpickling this calls open(marker, "w"): stands in for any payload that runs code on load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# ---------------------------------------------------------------------------------------------------------
# save_atomic / load_checkpoint


def test_save_atomic_round_trip_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "x.pt"
    save_atomic({"a": torch.arange(5), "b": [1, "two", None]}, path)
    assert_same(load_checkpoint(path), {"a": torch.arange(5), "b": [1, "two", None]})
    assert temp_files(path.parent) == []


def test_save_atomic_refuses_what_weights_only_cannot_load_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.pt"
    save_atomic({"a": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        save_atomic({"a": torch.zeros(2), "path": Path("somewhere")}, path)
    assert_same(load_checkpoint(path), {"a": torch.ones(2)})
    assert temp_files(tmp_path) == []
    # torch.__version__ is a str subclass that weights_only refuses: the message says where it is.
    with pytest.raises(CheckpointError, match=r"TorchVersion at \['versions'\]\['torch'\]"):
        save_atomic({"versions": {"torch": torch.__version__}}, path)


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n" * 20, os.urandom(4096)],
                         ids=["empty", "text", "random"])
def test_load_checkpoint_names_the_file_it_cannot_read(tmp_path, content):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_checkpoint(path)


def test_load_checkpoint_of_a_truncated_or_missing_file(tmp_path):
    path = tmp_path / "cut.pt"
    save_atomic({"model": {"w": torch.randn(1000)}}, path)
    truncate_to_half(path)
    with pytest.raises(CheckpointError, match=r"cut\.pt.*truncated"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"0.weight": torch.zeros(8, 4)}, "payload": WritesMarkerWhenUnpickled(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refused .*evil\.pt.*would run pickled code"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused"):
        load_weights(small_model(), path)
    with pytest.raises(CheckpointError, match="refused"):
        export_weights(path, tmp_path / "out.pt")
    assert not marker.exists()


def test_the_refused_payload_is_live(tmp_path):
    # Control for the test above: a plain unpickler does run the payload, so its absence there means something.
    marker = tmp_path / "marker"
    buffer = io.BytesIO()
    torch.save({"payload": WritesMarkerWhenUnpickled(marker)}, buffer)
    with zipfile.ZipFile(buffer) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    pickle.loads(data)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------------------
# A full training state, as the loop saves it


def realistic_state() -> tuple[dict, dict]:
    """A checkpoint dict as the training loop builds it, and the live objects it came from."""
    torch.manual_seed(0)
    model = small_model()
    swa_model = AveragedModel(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: min(1.0, (step + 1) / 10))
    swa_scheduler = SWALR(sgd, swa_lr=0.01, anneal_epochs=2)
    scaler = torch.amp.GradScaler("cpu")
    for _ in range(3):
        loss = model(torch.randn(16, 4)).square().mean()
        sgd.zero_grad()
        adamw.zero_grad()
        loss.backward()
        sgd.step()
        adamw.step()
        scheduler.step()
        swa_model.update_parameters(model)
    scaler.scale(torch.ones(()))  # the scale tensor is created on first use
    scaler.update(1024.0)
    state = {
        "model": model_state_dict(model), "optimizer": sgd.state_dict(), "adamw": adamw.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "swa_model": model_state_dict(swa_model), "swa_n_averaged": int(swa_model.n_averaged),
        "swa_scheduler": swa_scheduler.state_dict(), "epoch": 1, "step": 3, "batches_in_epoch": 0,
        "rng": [capture_rng_state(), capture_rng_state()], "config": to_dict(Config()), "world_size": 2,
        "batch_size": 16, "accum_steps": 1, "versions": {"torch": str(torch.__version__), "ddp_kit": "0.1.0"},
        "metrics": {"val_acc": 0.5, "val_loss": None, "train_loss": float("nan")},
    }
    return state, {"model": model, "sgd": sgd, "adamw": adamw, "scheduler": scheduler, "scaler": scaler}


def test_full_training_state_round_trips_with_weights_only(tmp_path):
    state, live = realistic_state()
    path = CheckpointManager(tmp_path, CheckpointConfig()).save(state, step=3, epoch=1, metrics=state["metrics"])
    loaded = load_checkpoint(path)
    assert_same(state, loaded)

    # ... and every piece goes back into fresh objects.
    model = small_model()
    load_weights(model, loaded)
    assert_same(model_state_dict(model), state["model"])
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sgd.load_state_dict(loaded["optimizer"])
    assert_same(sgd.state_dict(), live["sgd"].state_dict())
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    adamw.load_state_dict(loaded["adamw"])
    assert_same(adamw.state_dict(), live["adamw"].state_dict())
    scheduler = torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: min(1.0, (step + 1) / 10))
    scheduler.load_state_dict(loaded["scheduler"])
    assert scheduler.get_last_lr() == live["scheduler"].get_last_lr()
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict(loaded["scaler"])
    assert scaler.get_scale() == live["scaler"].get_scale() == 1024.0
    swa_model = AveragedModel(small_model())
    load_weights(swa_model, loaded, key="swa_model")
    assert_same(model_state_dict(swa_model), state["swa_model"])


# ---------------------------------------------------------------------------------------------------------
# RNG states


def draw() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
            torch.rand(3), torch.randn(2))


def test_rng_restore_reproduces_the_same_numbers_after_a_weights_only_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    # Leave a cached Gaussian in Python's and NumPy's generators: part of the state, easily forgotten.
    random.gauss(0, 1)
    np.random.standard_normal()
    state = capture_rng_state()
    save_atomic(state, tmp_path / "rng.pt")
    expected = draw()
    draw()
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt"))
    assert_same(draw(), expected)


# ---------------------------------------------------------------------------------------------------------
# CheckpointManager: cadence, retention, the `last` pointer, finding the newest complete checkpoint


def tiny_state(step: int) -> dict:
    return {"model": {"w": torch.full((4,), float(step))}, "step": step}


def saved_steps(directory: Path) -> list[int]:
    return sorted(int(p.name[len("ckpt_step"):-3]) for p in directory.glob("ckpt_step*.pt"))


def pointer(directory: Path) -> str:
    return (directory / "last").read_text().strip()


@pytest.mark.parametrize("every_steps, every_epochs, calls, expected", [
    (0, 1, [(5, False, 0), (10, True, 0), (20, True, 1)], [False, True, True]),
    (0, 2, [(10, True, 0), (20, True, 1), (30, True, 2), (40, True, 3)], [False, True, False, True]),
    (100, 0, [(0, False, 0), (99, False, 0), (100, False, 0), (150, True, 0), (200, True, 1)],
     [False, False, True, False, True]),
    (0, 0, [(100, True, 0), (200, False, 1)], [False, False]),
])
def test_should_save_follows_the_configured_cadence(tmp_path, every_steps, every_epochs, calls, expected):
    manager = CheckpointManager(tmp_path, CheckpointConfig(every_steps=every_steps, every_epochs=every_epochs))
    assert [manager.should_save(step=s, epoch_end=e, epoch=ep) for s, e, ep in calls] == expected


def test_retention_keeps_the_last_periodic_ones_the_best_and_final(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep_last=2, best_metric="val_acc", best_mode="max"))
    accuracies = {1: 0.3, 2: 0.9, 3: 0.5, 4: 0.4, 5: 0.6}
    for step, acc in accuracies.items():
        path = manager.save(tiny_state(step), step=step, epoch=step, metrics={"val_acc": acc, "val_loss": None})
        assert pointer(tmp_path) == path.name
    assert saved_steps(tmp_path) == [2, 4, 5]  # 4 and 5: the last two; 2: the best
    assert manager.best() == manager.checkpoint_path(2)
    assert manager.latest() == manager.checkpoint_path(5)
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [f"ckpt_step{s:09d}.json" for s in (2, 4, 5)]

    manager.save(tiny_state(6), step=6, epoch=6, metrics={"val_acc": 0.95}, tag="final")
    manager.save(tiny_state(7), step=7, epoch=6, tag="preempt")
    manager.save(tiny_state(8), step=8, epoch=6)
    # 6: final (kept for good) and now the best; 7, 8: the rolling two; 2 is no longer the best.
    assert saved_steps(tmp_path) == [6, 7, 8]
    assert manager.best() == manager.checkpoint_path(6)
    assert pointer(tmp_path) == "ckpt_step000000008.pt"
    assert load_checkpoint(manager.latest())["step"] == 8


def test_best_by_a_metric_to_minimize_ignores_missing_and_nan_values(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep_last=1, best_metric="val_loss", best_mode="min"))
    for step, loss in [(1, 0.5), (2, None), (3, float("nan")), (4, 0.7), (5, 0.9)]:
        manager.save(tiny_state(step), step=step, epoch=0, metrics={"val_loss": loss})
    assert saved_steps(tmp_path) == [1, 5]
    assert manager.best() == manager.checkpoint_path(1)
    assert CheckpointManager(tmp_path, CheckpointConfig(best_metric=None)).best() is None


def test_save_refuses_unknown_tags_and_non_numeric_metrics_before_writing(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointConfig())
    with pytest.raises(ValueError, match="tag"):
        manager.save(tiny_state(1), step=1, epoch=0, tag="hourly")
    with pytest.raises(TypeError, match="val_acc"):
        manager.save(tiny_state(1), step=1, epoch=0, metrics={"val_acc": "high"})
    assert manager.latest() is None and saved_steps(tmp_path) == []


def test_latest_without_checkpoints(tmp_path):
    assert CheckpointManager(tmp_path / "absent", CheckpointConfig()).latest() is None
    assert CheckpointManager(tmp_path, CheckpointConfig()).latest() is None


def test_latest_skips_a_truncated_newest_checkpoint_with_a_warning(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep_last=3))
    for step in (10, 20, 30):
        manager.save(tiny_state(step), step=step, epoch=0)
    truncate_to_half(manager.checkpoint_path(30))
    with pytest.warns(RuntimeWarning, match=r"ckpt_step000000030\.pt.*truncated"):
        found = manager.latest()
    assert found == manager.checkpoint_path(20)
    assert load_checkpoint(found)["step"] == 20


def test_latest_skips_a_checkpoint_with_flipped_bits(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep_last=3))
    for step in (1, 2):
        manager.save({"model": {"w": torch.randn(10_000)}}, step=step, epoch=0)
    damaged = bytearray(manager.checkpoint_path(2).read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # inside the tensor data: torch.load would not notice
    manager.checkpoint_path(2).write_bytes(bytes(damaged))
    with pytest.warns(RuntimeWarning, match=r"ckpt_step000000002\.pt.*CRC"):
        assert manager.latest() == manager.checkpoint_path(1)


def test_latest_scans_by_step_when_the_pointer_is_bad(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep_last=3))
    for step in (5, 7):
        manager.save(tiny_state(step), step=step, epoch=0)
    (tmp_path / "last").write_text("../../etc/passwd\n")
    with pytest.warns(RuntimeWarning, match="not a checkpoint"):
        assert manager.latest() == manager.checkpoint_path(7)
    (tmp_path / "last").unlink()
    assert manager.latest() == manager.checkpoint_path(7)


def test_latest_follows_the_pointer_over_a_higher_step(tmp_path):
    # A run restarted from an older checkpoint: the pointer, not the highest step, says which one is current.
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep_last=5))
    for step in (100, 200, 150):
        manager.save(tiny_state(step), step=step, epoch=0)
    assert manager.latest() == manager.checkpoint_path(150)


KILLED_SAVER = textwrap.dedent("""
    import sys, torch
    from ddp_kit.checkpoint import CheckpointManager
    from ddp_kit.config import CheckpointConfig
    manager = CheckpointManager(sys.argv[1], CheckpointConfig(keep_last=1, best_metric=None))
    manager.save({"model": {"w": torch.ones(4)}, "step": 1}, step=1, epoch=0)  # w[0] == step, as below
    big = torch.randn(16 * 2**20)  # 64 MiB: a write long enough to be caught in the middle
    step = 2
    while True:
        big[0] = step
        manager.save({"model": {"w": big}, "step": step}, step=step, epoch=0)
        step += 1
""")


def wait_until_stopped(pid: int) -> None:
    # SIGSTOP takes effect asynchronously; the process state in /proc says when it has.
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        time.sleep(0.0001)


def stop_during_a_write(process: subprocess.Popen, directory: Path, deadline: float) -> None:
    """SIGKILL `process` while a checkpoint temp file is on disk. The process is frozen (SIGSTOP) before the
    check, so the file cannot be renamed between seeing it and killing."""
    while time.monotonic() < deadline:
        assert process.poll() is None, "the saver exited on its own"
        if any(p.name.startswith(".ckpt_step") for p in temp_files(directory)):
            process.send_signal(signal.SIGSTOP)
            wait_until_stopped(process.pid)
            if any(p.name.startswith(".ckpt_step") and p.stat().st_size > 0 for p in temp_files(directory)):
                process.kill()
                process.wait(timeout=SUBPROCESS_TIMEOUT_S)
                return
            process.send_signal(signal.SIGCONT)
        time.sleep(0.001)
    pytest.fail("never saw a checkpoint being written")


def test_kill_during_save_leaves_a_complete_latest_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(directory)], stderr=stderr)
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while not (directory / "ckpt_step000000002.pt").exists():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
            time.sleep(0.01)
        stop_during_a_write(process, directory, deadline)
    finally:
        process.kill()
        process.wait(timeout=SUBPROCESS_TIMEOUT_S)

    stale = temp_files(directory)
    assert stale, "the kill should have left a partial temp file behind"
    manager = CheckpointManager(directory, CheckpointConfig(keep_last=1, best_metric=None))
    latest = manager.latest()
    assert latest is not None and latest not in stale
    state = load_checkpoint(latest)
    # The `last` pointer may still name the previous save if the kill came before it was updated: both are
    # complete, and the pointer wins (after a fresh start in an old run directory the highest step is stale).
    assert latest == manager.checkpoint_path(state["step"]) and state["step"] >= 1
    assert state["model"]["w"][0] == state["step"]
    # The next save clears what the killed one left behind.
    manager.save(tiny_state(state["step"] + 1000), step=state["step"] + 1000, epoch=0)
    assert temp_files(directory) == []


def test_save_on_a_non_zero_rank_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    with pytest.raises(RuntimeError, match="rank 0"):
        CheckpointManager(tmp_path, CheckpointConfig()).save(tiny_state(1), step=1, epoch=0)


# ---------------------------------------------------------------------------------------------------------
# Export


PLAIN_TORCH_LOADER = textwrap.dedent("""
    import importlib.util, sys
    sys.path.append(sys.argv[1])  # torch's site-packages, without its .pth files: the editable ddp_kit is one
    if importlib.util.find_spec("ddp_kit") is not None:
        sys.exit("ddp_kit is importable here; this check would prove nothing")
    import torch
    from torch import nn
    for exported, expected in zip(sys.argv[2::2], sys.argv[3::2]):
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        model.load_state_dict(torch.load(exported, weights_only=True))
        reference = torch.load(expected, weights_only=True)
        assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference), exported
    print("ok")
""")


def test_exported_weights_load_with_plain_torch_without_ddp_kit(tmp_path):
    state, _ = realistic_state()
    checkpoint = tmp_path / "ckpt.pt"
    save_atomic(state, checkpoint)
    model_out = export_weights(checkpoint, tmp_path / "export" / "model.pt")
    swa_out = export_weights(checkpoint, tmp_path / "export" / "swa_model.pt", swa=True)
    assert_same(load_checkpoint(model_out), state["model"])
    assert_same(load_checkpoint(swa_out), state["swa_model"])
    torch.save(state["model"], tmp_path / "expected_model.pt")
    torch.save(state["swa_model"], tmp_path / "expected_swa.pt")

    site_packages = str(Path(torch.__file__).parent.parent)
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", PLAIN_TORCH_LOADER, site_packages, str(model_out),
         str(tmp_path / "expected_model.pt"), str(swa_out), str(tmp_path / "expected_swa.pt")],
        cwd=tmp_path, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_export_swa_without_swa_weights_is_an_error(tmp_path):
    checkpoint = tmp_path / "ckpt.pt"
    save_atomic({"model": model_state_dict(small_model()), "swa_model": None}, checkpoint)
    with pytest.raises(CheckpointError, match="swa_model"):
        export_weights(checkpoint, tmp_path / "swa.pt", swa=True)
    assert not (tmp_path / "swa.pt").exists()


def test_export_drops_averaging_bookkeeping(tmp_path):
    averaged = AveragedModel(small_model())
    save_atomic({"swa_model": averaged.module.state_dict() | {"n_averaged": averaged.n_averaged}}, tmp_path / "c.pt")
    exported = load_checkpoint(export_weights(tmp_path / "c.pt", tmp_path / "w.pt", swa=True))
    assert "n_averaged" not in exported and exported.keys() == small_model().state_dict().keys()


def test_export_cli(tmp_path, capsys):
    state, _ = realistic_state()
    save_atomic(state, tmp_path / "ckpt.pt")
    parser = build_parser()
    for extra, name, expected in [([], "model.pt", state["model"]), (["--swa"], "swa.pt", state["swa_model"])]:
        args = parser.parse_args(["export", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / name), *extra])
        assert args.func(args) == 0
        assert_same(load_checkpoint(tmp_path / name), expected)
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["export", str(tmp_path / "ckpt.pt")])  # --out is required
