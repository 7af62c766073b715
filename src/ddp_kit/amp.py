"""Mixed precision: the autocast dtype that `amp.dtype` names, and a warning where it would run slowly."""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch

from .config import AmpConfig

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(cfg: AmpConfig, device: torch.device) -> tuple[torch.dtype, str | None]:
    """The dtype for torch.autocast, and a warning for the log when it would be slow on this device.

    bf16 needs compute capability 8.0 (A100, H100, RTX 30xx and newer). Older GPUs (V100, T4) have no bf16
    units, yet torch.cuda.is_bf16_supported() is true there because CUDA emulates it, several times slower
    than fp16; nothing else would say so."""
    dtype = AMP_DTYPES[cfg.dtype]
    if not cfg.enabled or dtype != torch.bfloat16 or device.type != "cuda":
        return dtype, None
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return dtype, None
    return dtype, (f"warning: amp.dtype=bf16 on {torch.cuda.get_device_name(device)} (compute capability "
                   f"{major}.{minor}), which has no bf16 units: bf16 is emulated there and runs several times slower "
                   f"than fp16. Set amp.dtype=fp16 (its GradScaler keeps small gradients from underflowing)")


def autocast_factory(cfg: AmpConfig, device: torch.device) -> tuple[Callable, str | None]:
    """A callable that enters autocast as `amp` configures it, and `autocast_dtype`'s warning. Without AMP it
    returns no autocast at all: entering a disabled one every micro-step is a measurable cost."""
    dtype, warning = autocast_dtype(cfg, device)
    return (functools.partial(torch.autocast, device.type, dtype=dtype) if cfg.enabled
            else contextlib.nullcontext), warning
