"""Checkpoints: atomic files, a rolling `last` pointer with retention, weights-only loading, wrapper-proof weights.

Everything written here loads with `torch.load(..., weights_only=True)`; nothing read here can run pickled code.
Model weights are stored under canonical keys (no DDP / DataParallel / torch.compile / AveragedModel wrapper
segments), and `load_weights` maps any wrapping on either side onto the target by matching key names.
docs/checkpoints.md describes the file layout and the retention rules.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import pickle
import random
import re
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from .config import CheckpointConfig
from .files import TEMP_NAME, atomic_write, atomic_write_text, require_free_space, write_errors

__all__ = [
    "CheckpointError", "CheckpointManager", "LoadReport", "capture_rng_state", "export_weights", "load_checkpoint",
    "load_weights", "model_state_dict", "register_cli", "restore_rng_state", "save_atomic", "unwrap_model",
]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, refused as unsafe, or does not fit the model; the message says which."""


# ---------------------------------------------------------------------------------------------------------
# Wrappers and canonical key names.

# Key segments that wrappers insert: DDP, DataParallel and AveragedModel hold the model as `.module`,
# torch.compile's OptimizedModule as `._orig_mod`.
WRAPPER_SEGMENTS = ("module", "_orig_mod")
# AveragedModel's own buffer: bookkeeping of the average, not a weight of the model.
AVERAGING_BOOKKEEPING = "n_averaged"


def _wrapped_attribute(module: nn.Module) -> Optional[str]:
    """Name of the attribute through which `module` wraps another model, or None if it is not a wrapper."""
    if isinstance(module, (DistributedDataParallel, DataParallel, AveragedModel)):
        return "module"
    # Duck-typed: naming OptimizedModule would import torch._dynamo (over a second) in every process.
    if isinstance(getattr(module, "_orig_mod", None), nn.Module):
        return "_orig_mod"
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside any nesting of DDP, DataParallel, torch.compile and AveragedModel (the averaged copy)."""
    while (attribute := _wrapped_attribute(model)) is not None:
        model = getattr(model, attribute)
    return model


def _canonical_names(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """The unwrapped model and its state-dict keys mapped to canonical names.

    Wrappers inside the model (torch.compile applied per block) are found by walking the module tree, so a
    submodule that is really called `module` keeps its name."""
    bare = unwrap_model(model)
    wrapper_paths = set()
    for path, submodule in bare.named_modules(remove_duplicate=False):
        attribute = _wrapped_attribute(submodule)
        if attribute is not None:
            wrapper_paths.add(f"{path}.{attribute}" if path else attribute)
    names = {}
    for key in bare.state_dict():
        kept, prefix = [], ""
        for segment in key.split("."):
            prefix = f"{prefix}.{segment}" if prefix else segment
            if prefix not in wrapper_paths:
                kept.append(segment)
        names[key] = ".".join(kept)
    return bare, names


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict under canonical keys: loads into the bare model with a plain `load_state_dict`."""
    bare, names = _canonical_names(model)
    return {names[key]: value for key, value in bare.state_dict().items()}


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
# Loading weights into a model, whatever wrapped the model when it was saved and when it is loaded.

# Entries of a checkpoint dict that hold a model's state dict, in the order they are tried: the trained model
# comes before averaged copies, so a full ddp_kit checkpoint loads its `model`. Pass key= to pick another.
STATE_DICT_ENTRIES = ("model", "state_dict", "model_state_dict", "module", "ema", "swa_model", "swa")
REPORT_EXAMPLES = 10


def _listing(keys: Iterable[str], limit: int = REPORT_EXAMPLES) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


@dataclass
class LoadReport:
    """What `load_weights` did. Key names are the model's canonical names (see `model_state_dict`)."""

    loaded: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)  # checkpoint key -> model key, where they differ
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    # model key -> (checkpoint shape, model shape)
    shape_mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # bookkeeping dropped on purpose: AveragedModel's n_averaged

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatched)

    def __str__(self) -> str:
        total = len(self.loaded) + len(self.missing) + len(self.shape_mismatched)
        lines = [f"loaded {len(self.loaded)} of the model's {total} entries"]
        if self.renamed:
            source, target = next(iter(self.renamed.items()))
            lines.append(f"renamed {len(self.renamed)} checkpoint keys, e.g. {source!r} -> {target!r}")
        if self.missing:
            lines.append(f"missing {len(self.missing)} (in the model, not in the checkpoint): {_listing(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected {len(self.unexpected)} (in the checkpoint, not in the model): "
                         f"{_listing(self.unexpected)}")
        if self.shape_mismatched:
            shapes = [f"{key!r} checkpoint {tuple(a)} vs model {tuple(b)}"
                      for key, (a, b) in list(self.shape_mismatched.items())[:REPORT_EXAMPLES]]
            more = len(self.shape_mismatched) - REPORT_EXAMPLES
            lines.append(f"shape mismatched {len(self.shape_mismatched)}: " + ", ".join(shapes)
                         + (f", ... and {more} more" if more > 0 else ""))
        if self.ignored:
            lines.append(f"ignored bookkeeping: {_listing(self.ignored)}")
        return "\n".join(lines)


def _find_state_dict(checkpoint: Mapping, key: Optional[str], source_name: str) -> Mapping:
    """The state dict inside `checkpoint`: `checkpoint[key]` if a key is given, then the first entry of
    STATE_DICT_ENTRIES holding a dict, repeatedly (a state dict's own values are tensors, never dicts)."""
    found = checkpoint
    if key is not None:
        found = checkpoint.get(key)
        if not isinstance(found, Mapping):
            raise CheckpointError(f"{source_name} has no {key!r} weights ({key!r} is "
                                  f"{'missing' if key not in checkpoint else repr(found)}); "
                                  f"its entries: {_listing(checkpoint)}")
    while (entry := next((e for e in STATE_DICT_ENTRIES if isinstance(found.get(e), Mapping)), None)) is not None:
        found = found[entry]
    if found and not any(isinstance(value, torch.Tensor) for value in found.values()):
        raise CheckpointError(f"{source_name} holds no state dict: no tensors and none of the entries "
                              f"{', '.join(STATE_DICT_ENTRIES)}; its entries: {_listing(found)}")
    return found


def _is_bookkeeping(key: str) -> bool:
    *wrappers, name = key.split(".")
    return name == AVERAGING_BOOKKEEPING and all(segment in WRAPPER_SEGMENTS for segment in wrappers)


def _without_compile_segments(key: str) -> str:
    return ".".join(segment for segment in key.split(".") if segment != "_orig_mod")


def _shared_wrapper_depth(split_keys: list[list[str]]) -> int:
    """How many leading segments every key shares that are wrapper segments (never a key's last segment)."""
    depth = 0
    shortest = min((len(parts) for parts in split_keys), default=0)
    while depth < shortest - 1:
        segment = split_keys[0][depth]
        if segment not in WRAPPER_SEGMENTS or any(parts[depth] != segment for parts in split_keys):
            break
        depth += 1
    return depth


def _candidate_renamings(keys: list[str]) -> Iterator[dict[str, str]]:
    """Ways to read checkpoint keys, least change first: as stored, then with torch.compile's `_orig_mod`
    segments removed; each with 0, 1, 2 ... of the wrapper segments that lead every key removed."""
    for drop_compile in (False, True):
        names = {key: _without_compile_segments(key) if drop_compile else key for key in keys}
        # Two keys collapsing onto one name would make the renaming ambiguous; such a reading is not offered.
        if len(set(names.values())) < len(names):
            continue
        split = {key: name.split(".") for key, name in names.items()}
        for depth in range(_shared_wrapper_depth(list(split.values())) + 1):
            yield {key: ".".join(parts[depth:]) for key, parts in split.items()}


def _match_keys(checkpoint_keys: list[str], model_keys: set[str]) -> dict[str, str]:
    """checkpoint key -> model key, by the reading that matches the most model keys. Wrapper segments are
    removed only where that is what makes keys match, so a submodule really named `module` keeps its name."""
    best: dict[str, str] = {}
    for renaming in _candidate_renamings(checkpoint_keys):
        matched = {key: name for key, name in renaming.items() if name in model_keys}
        if len(matched) > len(best):
            best = matched
    return best


def load_weights(model: nn.Module, source: str | os.PathLike | Mapping, strict: bool = True, *,
                 key: Optional[str] = None) -> LoadReport:
    """Load weights from a checkpoint path or an already-loaded dict into `model`.

    `model` may be bare, DDP, DataParallel, compiled (whole or per block) or an AveragedModel (its averaged copy
    is loaded; n_averaged is left alone). The checkpoint may have been saved under any such wrapping. `key`
    picks the entry holding the weights (e.g. "swa_model"); by default STATE_DICT_ENTRIES are tried in order.
    strict=True raises CheckpointError, before changing the model, unless every entry matches in name and
    shape; strict=False loads what matches. Either way the returned LoadReport says what happened."""
    source_name = "the given state dict" if isinstance(source, Mapping) else str(source)
    checkpoint = source if isinstance(source, Mapping) else load_checkpoint(source)
    state = _find_state_dict(checkpoint, key, source_name)
    bare, names = _canonical_names(model)
    model_state = bare.state_dict()
    by_name = {name: raw for raw, name in names.items()}

    report = LoadReport()
    report.ignored = [k for k in state if _is_bookkeeping(k) and k not in by_name]
    checkpoint_keys = [k for k in state if k not in report.ignored]
    matches = _match_keys(checkpoint_keys, set(by_name))
    to_load = {}
    for checkpoint_key, name in matches.items():
        value, current = state[checkpoint_key], model_state[by_name[name]]
        if isinstance(value, torch.Tensor) and isinstance(current, torch.Tensor) and value.shape != current.shape:
            report.shape_mismatched[name] = (tuple(value.shape), tuple(current.shape))
            continue
        to_load[by_name[name]] = value
        report.loaded.append(name)
        if checkpoint_key != name:
            report.renamed[checkpoint_key] = name
    matched_names = set(matches.values())
    report.missing = [name for name in by_name if name not in matched_names]
    report.unexpected = [k for k in checkpoint_keys if k not in matches]

    if strict and not report.complete:
        raise CheckpointError(f"cannot load {source_name} into {type(bare).__name__} (strict): the model was left "
                              f"unchanged\n{report}")
    bare.load_state_dict(to_load, strict=strict)
    return report


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


# ---------------------------------------------------------------------------------------------------------
# Export: a plain state-dict file for use without ddp_kit.


def export_weights(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike, *, swa: bool = False) -> Path:
    """Write the model weights of a checkpoint (with swa=True: the SWA model's) as a plain state dict, loadable
    with `model.load_state_dict(torch.load(out_path, weights_only=True))`."""
    checkpoint = load_checkpoint(checkpoint_path)
    state = _find_state_dict(checkpoint, "swa_model" if swa else None, str(checkpoint_path))
    weights = {}
    for name, value in state.items():
        if _is_bookkeeping(name):
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{checkpoint_path}: weight {name!r} is a {type(value).__name__}, not a tensor")
        weights[name] = value
    out_path = Path(out_path)
    save_atomic(weights, out_path)
    return out_path


def _export_command(args: argparse.Namespace) -> int:
    out = export_weights(args.checkpoint, args.out, swa=args.swa)
    print(f"wrote {out}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `ddp-kit export CKPT --out model.pt [--swa]`; the command's handler is set as `func`."""
    parser = subparsers.add_parser(
        "export", help="write a checkpoint's model weights as a plain state_dict file",
        description="Write the model (or SWA model) weights of a ddp_kit checkpoint as a plain state_dict file: "
                    "model.load_state_dict(torch.load(OUT, weights_only=True)) loads it without ddp_kit.")
    parser.add_argument("checkpoint", type=Path, metavar="CKPT",
                        help="checkpoint file, e.g. runs/NAME/checkpoints/ckpt_step000001000.pt")
    parser.add_argument("--out", type=Path, required=True, help="file to write, e.g. model.pt")
    parser.add_argument("--swa", action="store_true", help="export the SWA (averaged) model instead")
    parser.set_defaults(func=_export_command)
