"""Checkpoint files: atomic saves that always load, weights-only reading, RNG states, and the checkpoint
directory with its rolling `last` pointer and retention.

Everything written here loads with `torch.load(..., weights_only=True)`; nothing read here can run pickled code.
docs/checkpoints.md describes the file layout and the retention rules; model weights inside a checkpoint and
moving them between wrappers are `ddp_kit.weights`.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import pickle
import random
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from . import distributed
from .config import CheckpointConfig
from .distributed import Runtime
from .files import TEMP_NAME, WriteError, atomic_write, atomic_write_text, require_free_space, write_errors

T = TypeVar("T")

__all__ = [
    "CheckpointError", "CheckpointManager", "capture_rng_state", "load_checkpoint", "restore_rng_state",
    "save_atomic", "tensor_bytes",
]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, refused as unsafe, or does not fit the model; the message says which."""


# ---------------------------------------------------------------------------------------------------------
# Files: atomic writes, weights-only reads, completeness checks.

CHECKPOINT_NAME = re.compile(r"^ckpt_step(\d+)\.pt$")


def _refused_global(exc: pickle.UnpicklingError) -> Optional[str]:
    """The pickled global (function or class) the weights-only unpickler refused, or None if the data was
    corrupt rather than unsafe."""
    match = re.search(r"GLOBAL (\S+)", str(exc))
    return match.group(1) if match else None


def _find_instance(obj: Any, type_name: str, where: str = "") -> Optional[str]:
    """Where in nested dicts/lists/tuples `obj` holds an instance of the type named `type_name`."""
    if f"{type(obj).__module__}.{type(obj).__qualname__}" == type_name:
        return where or "the object itself"
    items = obj.items() if isinstance(obj, Mapping) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _find_instance(value, type_name, f"{where}[{key!r}]")
        if found is not None:
            return found
    return None


def _verify_weights_only(obj: Any, path: Path) -> None:
    # mmap: only the pickled structure is read; tensor data stays on disk.
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        refused = _refused_global(exc) or "an object"
        location = _find_instance(obj, refused)
        raise CheckpointError(
            f"not writing {path.name}: it holds {refused}{f' at {location}' if location else ''}, which "
            f"torch.load(weights_only=True) refuses; store only tensors, numbers, plain str/int/float/bool "
            f"and dicts/lists/tuples of them (e.g. str(torch.__version__), not the TorchVersion)") from None


def tensor_bytes(obj: Any) -> int:
    """Bytes of tensor data in nested dicts/lists/tuples: about the size torch.save will write."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    items = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(tensor_bytes(item) for item in items)


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` atomically and durably. Raises CheckpointError, leaving `path` untouched, if
    the result would not load with weights_only=True (so resume can never meet a file it must refuse), and
    WriteError if the file system fails it (a full disk)."""
    atomic_write(path, lambda stream: torch.save(obj, stream), verify=lambda temp: _verify_weights_only(obj, temp),
                 needed_bytes=tensor_bytes(obj))


def _first_sentence(exc: BaseException) -> str:
    text = str(exc).strip().split("\n")[0]
    return f"{type(exc).__name__}: {text.split('. ')[0]}" if text else type(exc).__name__


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint onto the CPU, refusing anything but tensors and plain containers."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as exc:
        refused = _refused_global(exc)
        if refused is not None:
            raise CheckpointError(
                f"refused to load {path}: it contains a pickled reference to {refused}, and unpickling it would run "
                f"pickled code; nothing from the file was executed. Only tensors, numbers, strings and plain "
                f"containers are accepted (torch.load weights_only=True)") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: corrupt pickle data "
                              f"({_first_sentence(exc)})") from exc
    except Exception as exc:  # garbage bytes make the weights-only unpickler fail in any way (IndexError, ...)
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: truncated, corrupt or not written by "
                              f"torch.save ({_first_sentence(exc)})") from exc


def _incomplete_reason(path: Path) -> Optional[str]:
    """Why `path` is not a complete torch.save file, or None if it is. Checks the zip directory (lost when a file
    is truncated) and every record's CRC (bit rot) without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("/data.pkl") for name in archive.namelist()):
                return "not a torch.save file (no data.pkl record)"
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"truncated or not a torch.save file ({_first_sentence(exc)})"
    return f"record {damaged} fails its CRC check" if damaged is not None else None


# ---------------------------------------------------------------------------------------------------------
# Random number generator states, stored as types that weights_only=True loads.


def capture_rng_state() -> dict:
    """This process's Python, NumPy (global), torch CPU and torch CUDA (every device) generator states."""
    version, internal, gauss_next = random.getstate()
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        # The key array as int64: a numpy array would need pickled numpy globals, which weights_only refuses.
        "numpy": {"bit_generator": bit_generator, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    """Put back the states `capture_rng_state` returned; the generators then continue exactly as they would have."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["bit_generator"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda_states = state["cuda"]
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda_states) > available:
        warnings.warn(f"checkpoint holds CUDA generator states for {len(cuda_states)} devices, this process sees "
                      f"{available}; only those are restored, so CUDA random numbers will differ", RuntimeWarning,
                      stacklevel=2)
    if cuda_states and available:
        torch.cuda.set_rng_state_all(cuda_states[:available])


# ---------------------------------------------------------------------------------------------------------
# The checkpoint directory: periodic saves, the `last` pointer, retention, finding the newest complete file.

TAGS = ("periodic", "preempt", "final", "nonfinite")
# Resume points superseded by newer ones; `final` and `nonfinite` checkpoints are kept until deleted by hand.
ROLLING_TAGS = ("periodic", "preempt")
LAST_POINTER = "last"


@dataclass
class _Entry:
    path: Path
    step: int
    tag: str = "periodic"
    metrics: dict = field(default_factory=dict)


def _json_metrics(metrics: Optional[Mapping]) -> dict:
    """Metrics as JSON numbers (None kept: a metric not computed this time); anything else is a caller error."""
    converted = {}
    for name, value in (metrics or {}).items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise TypeError(f"metric {name!r}={value!r}: metrics must be numbers or None")
        converted[str(name)] = None if value is None else float(value)
    return converted


class CheckpointManager:
    """Owns one directory of checkpoints: `ckpt_step<step>.pt` files, each with a `.json` sidecar (step, epoch,
    tag, metrics), and a `last` pointer file naming the newest. Only rank 0 may call `save`."""

    def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig):
        self.directory = Path(directory)
        self.cfg = cfg

    def checkpoint_path(self, step: int) -> Path:
        return self.directory / f"ckpt_step{step:09d}.pt"

    def should_save(self, *, step: int, epoch_end: bool, epoch: int) -> bool:
        """Whether the configured cadence asks for a checkpoint now. `step` counts optimizer steps done; `epoch`
        is the 0-based epoch, and with epoch_end=True the one that just ended."""
        every_steps, every_epochs = self.cfg.every_steps, self.cfg.every_epochs
        by_steps = every_steps > 0 and step > 0 and step % every_steps == 0
        by_epochs = epoch_end and every_epochs > 0 and (epoch + 1) % every_epochs == 0
        return by_steps or by_epochs

    def save(self, state: dict, *, step: int, epoch: int, metrics: Optional[dict] = None,
             tag: str = "periodic") -> Path:
        """Write `state` as the checkpoint of `step`, point `last` at it, then retire old checkpoints. Each
        step is finished before the next starts, so a kill at any moment leaves a loadable `latest()`."""
        if tag not in TAGS:
            raise ValueError(f"tag={tag!r}: must be one of {', '.join(TAGS)}")
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            raise RuntimeError("CheckpointManager.save runs on rank 0 only; other ranks would race it for the files")
        sidecar = {"step": step, "epoch": epoch, "tag": tag, "metrics": _json_metrics(metrics)}
        path = self.checkpoint_path(step)
        with write_errors(path):
            self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temp_files()
        # The previous checkpoint's size (container overhead included) estimates this one's unless its tensors
        # say more (an SWA model joined); the previous one stays until this one is complete.
        previous = max(self._entries(), key=lambda entry: entry.step, default=None)
        require_free_space(path, max(previous.path.stat().st_size if previous is not None else 0,
                                     tensor_bytes(state)))
        save_atomic(state, path)
        atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=1))
        atomic_write_text(self.directory / LAST_POINTER, path.name + "\n")
        self._retire_old_checkpoints()
        return path

    def write_on_rank0(self, action: Callable[[], T], rt: Runtime) -> Optional[T]:
        """`action` (a save, or any other write of the run's rank 0: run directory, metrics, marker, exports) on
        rank 0 alone, every rank learning how it ended (`distributed.on_main_rank`); a failed write also says
        which checkpoint is intact and what to do."""
        try:
            return distributed.on_main_rank(action, rt)
        except WriteError as exc:
            raise WriteError(f"{exc}. {self.resume_note()}") from None

    def resume_note(self) -> str:
        """What a failed write leaves behind and what to do, for the error message of a run that must stop."""
        latest = self.latest()
        kept = (f"The newest intact checkpoint is {latest}, so nothing saved before was lost" if latest is not None
                else f"No checkpoint has been written to {self.directory} yet")
        return f"{kept}. Free space and rerun the same command to resume"

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint: the one `last` names, else the highest step. Files that are truncated
        or damaged are skipped with a warning naming them; None if there is no complete checkpoint."""
        pointed = self._pointed()
        by_step = [entry.path for entry in sorted(self._entries(), key=lambda e: e.step, reverse=True)]
        candidates = ([pointed] if pointed is not None else []) + [p for p in by_step if p != pointed]
        for path in candidates:
            reason = _incomplete_reason(path)
            if reason is None:
                return path
            warnings.warn(f"skipping checkpoint {path}: {reason}; falling back to an older one", RuntimeWarning,
                          stacklevel=2)
        return None

    def best(self) -> Optional[Path]:
        """The checkpoint with the best `cfg.best_metric` (by `cfg.best_mode`; the earlier one on a tie), or None."""
        return self._best_of(self._entries())

    def _best_of(self, entries: list[_Entry]) -> Optional[Path]:
        metric = self.cfg.best_metric
        scored = [(entry.metrics[metric], entry.step, entry.path) for entry in entries
                  if metric is not None and isinstance(entry.metrics.get(metric), float)
                  and math.isfinite(entry.metrics[metric])]
        if not scored:
            return None
        sign = -1.0 if self.cfg.best_mode == "max" else 1.0
        return min(scored, key=lambda s: (sign * s[0], s[1]))[2]

    def _entries(self) -> list[_Entry]:
        if not self.directory.is_dir():
            return []
        entries = []
        for path in self.directory.iterdir():
            match = CHECKPOINT_NAME.match(path.name)
            if match is None:
                continue
            entry = _Entry(path, int(match.group(1)))
            sidecar = path.with_suffix(".json")
            # A checkpoint without its sidecar (killed between the two writes) counts as periodic, no metrics.
            if sidecar.is_file():
                try:
                    described = json.loads(sidecar.read_text())
                    entry.tag, entry.metrics = described["tag"], described["metrics"]
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    warnings.warn(f"ignoring unreadable {sidecar} ({_first_sentence(exc)}); {path.name} counts as a "
                                  f"periodic checkpoint without metrics", RuntimeWarning, stacklevel=3)
            entries.append(entry)
        return entries

    def _pointed(self) -> Optional[Path]:
        pointer = self.directory / LAST_POINTER
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        if CHECKPOINT_NAME.match(name) is None or not (self.directory / name).is_file():
            warnings.warn(f"{pointer} names {name!r}, which is not a checkpoint in {self.directory}; scanning for "
                          f"the newest one instead", RuntimeWarning, stacklevel=3)
            return None
        return self.directory / name

    def _remove_stale_temp_files(self) -> None:
        # Only rank 0 saves, one save at a time: a temporary file present now was left by a killed save.
        for path in self.directory.iterdir():
            if TEMP_NAME.match(path.name):
                path.unlink(missing_ok=True)

    def _retire_old_checkpoints(self) -> None:
        entries = self._entries()
        rolling = sorted((e for e in entries if e.tag in ROLLING_TAGS), key=lambda e: e.step, reverse=True)
        keep = {e.path for e in rolling[:self.cfg.keep_last]}
        keep |= {e.path for e in entries if e.tag not in ROLLING_TAGS}
        keep |= {p for p in (self._pointed(), self._best_of(entries)) if p is not None}
        for entry in entries:
            if entry.path not in keep:
                # Sidecar first: a kill in between leaves a plain periodic checkpoint, retired next time.
                entry.path.with_suffix(".json").unlink(missing_ok=True)
                entry.path.unlink(missing_ok=True)
