"""Model weights under canonical keys, whatever wraps the model: saving them, loading them into any other
wrapping with a readable report, and exporting a checkpoint's weights as a plain state dict.

Model weights are stored under canonical keys (no DDP / DataParallel / torch.compile / AveragedModel wrapper
segments), and `load_weights` maps any wrapping on either side onto the target by matching key names.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from .checkpoint import CheckpointError, load_checkpoint, save_atomic

__all__ = ["LoadReport", "export_weights", "load_weights", "model_state_dict", "unwrap_model"]


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
