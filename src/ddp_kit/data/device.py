"""Moving a batch to the device and preparing it there: scaling, augmentation, normalization.

Batches travel as stored (uint8 is 4x smaller than float32) and become float on the device. Augmentation
runs per batch on the device with per-sample random parameters drawn from that device's generator, seeded
per micro-batch by the training loop (data/seeding.py), so draws survive a resume and ignore dropout.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ddp_kit.config import DataConfig
from ddp_kit.data.fields import image_fields
from ddp_kit.data.seeding import seeded


@functools.lru_cache(maxsize=16)
def _per_channel(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    # Cached: building it every batch would be a small blocking host-to-device copy per step.
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def random_crop(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad every side by `padding`, then crop each image back to its size at its own random offset."""
    n, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding)).permute(0, 2, 3, 1)  # N x H' x W' x C
    offsets = torch.randint(0, 2 * padding + 1, (2, n, 1), device=images.device)
    rows = offsets[0] + torch.arange(height, device=images.device)  # N x H
    cols = offsets[1] + torch.arange(width, device=images.device)  # N x W
    batch = torch.arange(n, device=images.device).view(n, 1, 1)
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_horizontal_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)


def _augment(x: torch.Tensor, cfg: DataConfig, batch_transform) -> torch.Tensor:
    if cfg.random_crop_padding:
        x = random_crop(x, cfg.random_crop_padding)
    if cfg.horizontal_flip:
        x = random_horizontal_flip(x)
    return batch_transform(x) if batch_transform is not None else x


def unit_float(images: torch.Tensor) -> torch.Tensor:
    """float32 images in [0, 1]: uint8 divided by 255, float images taken as already scaled."""
    x = images.to(torch.float32)
    return x.div_(255) if images.dtype == torch.uint8 else x  # in place is safe: the cast made a new tensor


def prepare_images(images: torch.Tensor, device: torch.device, cfg: DataConfig, *, train: bool,
                   channels_last: bool = False, batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                   augment_seed: Optional[int] = None) -> torch.Tensor:
    """Transfer an N x C x H x W image batch (non-blocking; pinned memory makes it asynchronous), scale uint8
    to [0, 1] (float images are taken as already scaled), augment when `train` (cfg's crop and flip, then
    `batch_transform`, e.g. `Loaders.batch_transform` from data.batch_transforms), normalize with cfg.mean/std.
    The augmentation draws from generators seeded by `augment_seed` (the training loop passes one per
    micro-batch, data/seeding.py), or from the device's global generator if None.

    Returns float32 images on `device` (channels-last memory format if asked).
    """
    x = unit_float(images.to(device, non_blocking=True))
    if train and (cfg.random_crop_padding or cfg.horizontal_flip or batch_transform is not None):
        draws = (seeded(augment_seed, [x.device], torch_only=True) if augment_seed is not None
                 else contextlib.nullcontext())
        with draws:
            x = _augment(x, cfg, batch_transform)
    x = (x - _per_channel(tuple(cfg.mean), x.device)) / _per_channel(tuple(cfg.std), x.device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=memory_format)


def prepare_batch(batch, device: torch.device, cfg: DataConfig, *, train: bool, channels_last: bool = False,
                  batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                  augment_seed: Optional[int] = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A batch `(fields, rows)` as the loaders yield it, on `device` and ready for the model and the objective:
    the fields by name, image fields (data.image_fields) prepared by `prepare_images`, the others as stored
    (non-blocking copies), and the row ids (1-D int64, on the CPU) the ledger and resume use."""
    fields, rows = batch
    images = image_fields(cfg, fields)
    return {name: prepare_images(values, device, cfg, train=train, channels_last=channels_last,
                                 batch_transform=batch_transform, augment_seed=augment_seed)
            if name in images else values.to(device, non_blocking=True)
            for name, values in fields.items()}, rows
