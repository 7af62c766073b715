"""DataLoaders for DDP training and evaluation, built from DataConfig.

The loaders run with batch_size=None: the samplers yield whole batches of row ids and the dataset makes
one read per batch. DataLoader settings (pin_memory, persistent workers, prefetching, start method, worker
seeding) are chosen here from the config so the training loop only iterates.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ddp_kit.config import DataConfig
from ddp_kit.data.dataset import H5Dataset, check_classes, held_fields
from ddp_kit.data.device import unit_float
from ddp_kit.data.errors import DataError
from ddp_kit.data.fields import image_fields
from ddp_kit.data.hdf5 import FieldInfo, SplitInfo, config_splits
from ddp_kit.data.sampler import ShardBatchSampler, TrainBatchSampler
from ddp_kit.data.seeding import draw_seed
from ddp_kit.data.user import user_datasets
from ddp_kit.data.transforms import EpochBatches, SampleTransformDataset, Transform, build_transform, check_transform
from ddp_kit.preemption import protect_dataloader_worker


@dataclass
class Loaders:
    train: DataLoader  # yields (fields, row_ids) batches; len() is the same on every rank
    val: DataLoader  # this rank's disjoint shard of the validation split, unpadded
    train_sampler: TrainBatchSampler  # call set_epoch(epoch), or resume_epoch for an interrupted one, every epoch
    train_size: int  # rows in the training split (before padding or drop_last)
    val_size: int  # rows in the validation split (the sum over ranks of the rows evaluated)
    train_eval: DataLoader  # the training split (its first `stats_rows`) sharded like `val`: statistics passes
    field_shapes: dict[str, tuple[int, ...]]  # one row of every field as prepare_batch returns it (images C, H, W)
    sample_shape: Optional[tuple[int, ...]]  # field_shapes["image"], None without a field named image
    batch_transform: Optional[Transform]  # data.batch_transforms: pass to prepare_batch(..., batch_transform=)


def init_worker(worker_id: int, *, seed: int, rank: int, sharing_strategy: str) -> None:
    """DataLoader worker_init_fn: seed numpy, random and torch from (seed, rank, worker id) for any draw made
    outside the per-sample seeding of data/seeding.py (ddp_kit makes none), so no two workers share a stream;
    choose how this worker's batches travel; keep the worker alive through a stop signal."""
    worker_seed = draw_seed(seed, rank, worker_id)
    np.random.seed(worker_seed % 2**32)
    random.seed(worker_seed)
    torch.manual_seed(worker_seed)
    # The sender's strategy decides how a tensor is shared, so this affects only the batches this worker
    # sends, never the trainer's own tensors (data.worker_sharing_strategy, docs/data.md).
    torch.multiprocessing.set_sharing_strategy(sharing_strategy)
    # Launchers signal whole process groups: a worker must outlive a stop until its trainer checkpointed.
    protect_dataloader_worker()


def _check_shapes(train: SplitInfo, val: SplitInfo, image_channels: Optional[int]) -> None:
    for split in (train, val):
        for info in split.images:
            _check_channels(split, info, image_channels)
    for info in train.fields:
        other = val.field(info.name)
        if info.shape != other.shape:
            raise DataError(f"{val.path}: '{other.path}' holds rows of shape {other.shape} but {train.path}: "
                            f"'{info.path}' holds {info.shape}; both splits need the same row shape for field "
                            f"{info.name!r} (images as C, H, W)")


def _check_channels(split: SplitInfo, info: FieldInfo, image_channels: Optional[int]) -> None:
    if image_channels is None or info.channels == image_channels:
        return
    hint = "fix model.in_channels or convert the images"
    if info.layout == "NCHW" and info.row_shape[-1] == image_channels:
        hint = "the images look like N x H x W x C: set data.layout: NHWC (or store a layout attribute)"
    raise DataError(f"{split.path}: '{info.path}' has {info.channels} channel(s) (each image {info.row_shape}, "
                    f"layout {info.layout}) but model.in_channels is {image_channels}; {hint}")


def _chunks_spanned(rows: int, split: SplitInfo) -> int:
    return max(math.ceil(rows / info.chunk_rows) if info.chunk_rows else 1 for info in split.fields)


def _dataset(split: SplitInfo, cfg: DataConfig, *, class_counts: Optional[Mapping[str, int]], shuffle: str,
             batch_size: int, block_rows: int) -> Dataset:
    """The dataset for one split, its reads tuned to the sampler's `shuffle` mode (chunk, full or none)."""
    held = held_fields(split, cfg.in_memory)
    for name, num_classes in (class_counts or {}).items():
        if name not in split.names:
            raise DataError(f"{split.path}: the split '{split.group or '/'}' has no field {name!r} to hold class "
                            f"indices; its fields are {split.names} (data.fields)")
        check_classes(split, name, num_classes, held.get(name))
    if cfg.in_memory or shuffle == "full":
        return H5Dataset(split, held)
    if shuffle == "chunk":
        # Every block one batch can touch: a batch spans its windows plus one it straddles into, and the
        # next batch continues in the last of them, so each block is read once per worker. The 2 extra
        # hold the partial blocks at a rank's slice boundaries.
        windows = math.ceil(batch_size / (cfg.shuffle_window * block_rows)) + 1
        blocks = cfg.shuffle_window * windows + 2
        return H5Dataset(split, held, block_rows=block_rows, cache_blocks=blocks,
                         chunks_per_read=_chunks_spanned(block_rows, split))
    return H5Dataset(split, held, chunks_per_read=_chunks_spanned(batch_size, split))


def _augmented_image(cfg: DataConfig, names: list[str]) -> str:
    """The one image field that augmentation (crop, flip, data.sample_transforms / batch_transforms) applies to."""
    images = image_fields(cfg, names)
    if len(images) != 1:
        raise DataError(f"data augmentation (random_crop_padding, horizontal_flip, sample_transforms, "
                        f"batch_transforms) needs exactly one image field; the batch has {images or 'none'} among "
                        f"{names}: set data.image_fields, or remove the augmentation (it would also not move "
                        "fields aligned with the image, such as masks)")
    return images[0]


def _transforms(cfg: DataConfig, dataset: Dataset, source: str
                ) -> tuple[Optional[Transform], Optional[Transform], Optional[str]]:
    """(per-sample, per-batch) training transforms from the config and the image field they apply to, each
    tried on the first rows of `dataset` (from `source`) so a wrong name, argument or output shape fails now,
    naming its config key."""
    sample_transform = build_transform(cfg.sample_transforms, "data.sample_transforms")
    batch_transform = build_transform(cfg.batch_transforms, "data.batch_transforms")
    if not (sample_transform or batch_transform or cfg.random_crop_padding or cfg.horizontal_flip):
        return None, None, None
    probe, _ = dataset[np.arange(min(2, len(dataset)))]
    if isinstance(dataset, H5Dataset):
        dataset.close()  # the workers open their own handles; this process reads no more
    image = _augmented_image(cfg, list(probe))
    images = probe[image]
    if sample_transform is not None:
        images = torch.stack([check_transform(sample_transform, row, key="data.sample_transforms",
                                              source=f"{source} row {i}") for i, row in enumerate(images)])
    if batch_transform is not None:
        check_transform(batch_transform, unit_float(images), key="data.batch_transforms", source=f"a batch of {source}")
    return sample_transform, batch_transform, image


def prefetch_batches(cfg: DataConfig, *, shuffle: str, batch_size: int, block_rows: int) -> int:
    """Batches each worker of a loader prepares ahead: `data.prefetch_factor` if set, else 2, or for a
    chunk-mode reader of the file enough batches to span one window of blocks plus one.

    A chunk-mode worker decodes a whole window of blocks for the first batch of the window and then serves
    the window's other batches almost for free. The DataLoader returns batches in order, so while one worker
    decodes, the trainer waits on it unless that worker is already ahead by about a window's batches; with
    2 batches of prefetch a 2-worker gzip run was 0.6x as fast (docs/data.md). The extra batches in flight
    hold about one window of rows per worker, less than its block cache.
    """
    if cfg.prefetch_factor is not None:
        return cfg.prefetch_factor
    if shuffle != "chunk" or cfg.in_memory:
        return 2
    return max(2, math.ceil(cfg.shuffle_window * block_rows / batch_size) + 1)


def _loader(dataset: Dataset, sampler, cfg: DataConfig, *, device: torch.device, seed: int, rank: int,
            prefetch_factor: int) -> DataLoader:
    workers = cfg.num_workers
    options = {}
    if workers:
        options = dict(persistent_workers=cfg.persistent_workers, prefetch_factor=prefetch_factor,
                       multiprocessing_context=cfg.multiprocessing_context)
    pin = cfg.pin_memory if cfg.pin_memory is not None else device.type == "cuda"
    # A private generator: creating worker iterators must not consume the training's global torch RNG.
    generator = torch.Generator().manual_seed(draw_seed(seed, rank))
    init = functools.partial(init_worker, seed=seed, rank=rank, sharing_strategy=cfg.worker_sharing_strategy)
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers, pin_memory=pin,
                      worker_init_fn=init, generator=generator, **options)


def _train_sampler(cfg: DataConfig, length: int, block_rows: int, where: str, *, batch_size: int, rank: int,
                   world_size: int, seed: int, accum_steps: int = 1) -> TrainBatchSampler:
    try:
        return TrainBatchSampler(length, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                                 shuffle=cfg.shuffle, block_rows=cfg.block_size or block_rows,
                                 shuffle_window=cfg.shuffle_window, drop_last=cfg.drop_last,
                                 num_workers=cfg.num_workers, accum_steps=accum_steps)
    except ValueError as exc:
        raise DataError(f"{where}: {exc}") from exc


def _where(split: SplitInfo) -> str:
    return f"{split.path}: the split '{split.group or '/'}'"


def train_batches_per_epoch(cfg: DataConfig, *, batch_size: int, world_size: int) -> int:
    """Training micro-batches per epoch on every rank, from the file's metadata alone (no loader is built)."""
    train_split, _ = config_splits(cfg)
    # The count is the same on every rank and for every seed.
    return len(_train_sampler(cfg, train_split.length, train_split.default_block_rows, _where(train_split),
                              batch_size=batch_size, rank=0, world_size=world_size, seed=0))


def start_workers(*loaders: DataLoader) -> None:
    """Fork the persistent workers of `loaders` now; each loader keeps this first iterator, and the next
    `iter` restarts it from its sampler's state then (batches prefetched before are dropped). Loaders without
    persistent workers start theirs at each iteration."""
    for loader in loaders:
        if loader.num_workers and loader.persistent_workers:
            iter(loader)


def build_dataloaders(cfg: DataConfig, *, batch_size: int, val_batch_size: int, rank: int, world_size: int,
                      seed: int, device: torch.device, accum_steps: int = 1,
                      class_counts: Optional[Mapping[str, int]] = None,
                      image_channels: Optional[int] = None, datasets: Optional[tuple[Dataset, Dataset]] = None,
                      stats_rows: Optional[int] = None) -> Loaders:
    """Validate the data and build this rank's training and validation loaders; `train_eval` covers the first
    `stats_rows` training rows (all if None).

    The data: cfg's HDF5 splits, or `datasets`, a user's map-style (train, val) datasets whose items are dicts
    of tensors (user.py). `class_counts` {field: number of classes} checks those fields hold class indices
    in range; `image_channels` checks the channels of every image field. Raises DataError (naming file and
    key, or dataset and field) for unusable data, before any batch is read.
    """
    if datasets is not None:
        train_set, val_set = user_datasets(datasets, cfg, class_counts=class_counts, image_channels=image_channels)
        block_rows, where, field_shapes = 1, train_set.name, train_set.field_shapes
    else:
        train_split, val_split = config_splits(cfg)
        _check_shapes(train_split, val_split, image_channels)
        block_rows, where, field_shapes = train_split.default_block_rows, _where(train_split), train_split.field_shapes
    train_sampler = _train_sampler(cfg, len(train_set) if datasets is not None else train_split.length, block_rows,
                                   where, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                                   accum_steps=accum_steps)
    block_rows = train_sampler.block_rows
    if datasets is None:
        train_set = _dataset(train_split, cfg, class_counts=class_counts, shuffle=cfg.shuffle, batch_size=batch_size,
                             block_rows=block_rows)
        val_set = _dataset(val_split, cfg, class_counts=class_counts, shuffle="none", batch_size=val_batch_size,
                           block_rows=block_rows)
    sample_transform, batch_transform, image = _transforms(cfg, train_set, where)
    val_sampler = ShardBatchSampler(len(val_set), batch_size=val_batch_size, rank=rank, world_size=world_size)
    train_eval_sampler = ShardBatchSampler(min(stats_rows or len(train_set), len(train_set)),
                                           batch_size=val_batch_size, rank=rank, world_size=world_size)
    augmented_train_set, train_batches = train_set, train_sampler
    if sample_transform is not None:
        augmented_train_set = SampleTransformDataset(train_set, sample_transform, seed, image)
        train_batches = EpochBatches(train_sampler)
    train_prefetch = prefetch_batches(cfg, shuffle=cfg.shuffle, batch_size=batch_size, block_rows=block_rows)
    eval_prefetch = prefetch_batches(cfg, shuffle="none", batch_size=val_batch_size, block_rows=block_rows)
    return Loaders(
        train=_loader(augmented_train_set, train_batches, cfg, device=device, seed=seed, rank=rank,
                      prefetch_factor=train_prefetch),
        val=_loader(val_set, val_sampler, cfg, device=device, seed=seed, rank=rank, prefetch_factor=eval_prefetch),
        train_sampler=train_sampler,
        train_size=len(train_set),
        val_size=len(val_set),
        train_eval=_loader(train_set, train_eval_sampler, cfg, device=device, seed=seed, rank=rank,
                           prefetch_factor=eval_prefetch),
        field_shapes=field_shapes,
        sample_shape=field_shapes.get("image"),
        batch_transform=batch_transform,
    )
