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
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ddp_kit.config import DataConfig
from ddp_kit.data.dataset import H5ImageDataset, InMemoryImageDataset, load_images, load_labels, to_nchw
from ddp_kit.data.device import unit_float
from ddp_kit.data.errors import DataError
from ddp_kit.data.hdf5 import SplitInfo, config_splits, open_h5
from ddp_kit.data.sampler import ShardBatchSampler, TrainBatchSampler
from ddp_kit.data.seeding import draw_seed
from ddp_kit.data.transforms import EpochBatches, SampleTransformDataset, Transform, build_transform, check_transform
from ddp_kit.preemption import protect_dataloader_worker


@dataclass
class Loaders:
    train: DataLoader  # yields (images, labels, row_ids); len() is the same on every rank
    val: DataLoader  # this rank's disjoint shard of the validation split, unpadded
    train_sampler: TrainBatchSampler  # call set_epoch(epoch, start_batch=0) before every epoch
    train_size: int  # rows in the training split (before padding or drop_last)
    val_size: int  # rows in the validation split (the sum over ranks of the rows evaluated)
    train_eval: DataLoader  # the training split (its first `stats_rows`) sharded like `val`: statistics passes
    sample_shape: tuple[int, int, int]  # (C, H, W) of one image, as the loaders yield it
    batch_transform: Optional[Transform]  # data.batch_transforms: pass to to_device(..., batch_transform=) in training


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


def _check_shapes(train: SplitInfo, val: SplitInfo, in_channels: Optional[int]) -> None:
    for split in (train, val):
        _check_channels(split, in_channels)
    if train.image_shape != val.image_shape:
        raise DataError(f"{val.path}: '{val.images_path}' holds images of shape {val.image_shape} (C, H, W) but "
                        f"{train.path}: '{train.images_path}' holds {train.image_shape}; both splits need the "
                        "same image size")


def _check_channels(split: SplitInfo, in_channels: Optional[int]) -> None:
    if in_channels is None or split.channels == in_channels:
        return
    hint = "fix model.in_channels or convert the images"
    if split.layout == "NCHW" and split.row_shape[-1] == in_channels:
        hint = "the images look like N x H x W x C: set data.layout: NHWC (or store a layout attribute)"
    raise DataError(f"{split.path}: '{split.images_path}' has {split.channels} channel(s) (each image "
                    f"{split.row_shape}, layout {split.layout}) but model.in_channels is {in_channels}; {hint}")


def _chunks_spanned(rows: int, split: SplitInfo) -> int:
    return math.ceil(rows / split.chunk_rows) if split.chunk_rows else 1


def _dataset(split: SplitInfo, cfg: DataConfig, *, num_classes: Optional[int], shuffle: str, batch_size: int,
             block_rows: int) -> Dataset:
    """The dataset for one split, its reads tuned to the sampler's `shuffle` mode (chunk, full or none)."""
    labels = load_labels(split, num_classes)
    if cfg.in_memory:
        return InMemoryImageDataset(split, load_images(split), labels)
    if shuffle == "chunk":
        # Every block one batch can touch: a batch spans its windows plus one it straddles into, and the
        # next batch continues in the last of them, so each block is read once per worker. The 2 extra
        # hold the partial blocks at a rank's slice boundaries.
        windows = math.ceil(batch_size / (cfg.shuffle_window * block_rows)) + 1
        blocks = cfg.shuffle_window * windows + 2
        return H5ImageDataset(split, labels, block_rows=block_rows, cache_blocks=blocks,
                              chunks_per_read=_chunks_spanned(block_rows, split))
    if shuffle == "full":
        return H5ImageDataset(split, labels)
    return H5ImageDataset(split, labels, chunks_per_read=_chunks_spanned(batch_size, split))


def _transforms(cfg: DataConfig, split: SplitInfo) -> tuple[Optional[Transform], Optional[Transform]]:
    """(per-sample, per-batch) training transforms from the config, each tried on the split's first images
    so a wrong name, argument or output shape fails now, naming its config key."""
    sample_transform = build_transform(cfg.sample_transforms, "data.sample_transforms")
    batch_transform = build_transform(cfg.batch_transforms, "data.batch_transforms")
    if sample_transform is None and batch_transform is None:
        return None, None
    with open_h5(split.path) as f:
        probe = to_nchw(torch.from_numpy(split.dataset(f, "images")[:min(2, split.length)]), split.layout)
    source = f"{split.path}: '{split.images_path}'"
    if sample_transform is not None:
        probe = torch.stack([check_transform(sample_transform, image, key="data.sample_transforms",
                                             source=f"{source} row {row}") for row, image in enumerate(probe)])
    if batch_transform is not None:
        check_transform(batch_transform, unit_float(probe), key="data.batch_transforms", source=f"a batch of {source}")
    return sample_transform, batch_transform


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


def _train_sampler(cfg: DataConfig, split: SplitInfo, *, batch_size: int, rank: int, world_size: int,
                   seed: int) -> TrainBatchSampler:
    try:
        return TrainBatchSampler(split.length, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                                 shuffle=cfg.shuffle, block_rows=cfg.block_size or split.default_block_rows,
                                 shuffle_window=cfg.shuffle_window, drop_last=cfg.drop_last,
                                 num_workers=cfg.num_workers)
    except ValueError as exc:
        raise DataError(f"{split.path}: '{split.images_path}': {exc}") from exc


def train_batches_per_epoch(cfg: DataConfig, *, batch_size: int, world_size: int) -> int:
    """Training micro-batches per epoch on every rank, from the file's metadata alone (no loader is built)."""
    train_split, _ = config_splits(cfg)
    # The count is the same on every rank and for every seed.
    return len(_train_sampler(cfg, train_split, batch_size=batch_size, rank=0, world_size=world_size, seed=0))


def build_dataloaders(cfg: DataConfig, *, batch_size: int, val_batch_size: int, rank: int, world_size: int,
                      seed: int, device: torch.device, num_classes: Optional[int], in_channels: Optional[int],
                      stats_rows: Optional[int] = None) -> Loaders:
    """Validate the splits against the model and build this rank's training and validation loaders;
    `train_eval` covers the first `stats_rows` training rows (all if None).

    Raises DataError (naming file and key) for unusable data, before any batch is read.
    """
    train_split, val_split = config_splits(cfg)
    _check_shapes(train_split, val_split, in_channels)
    train_sampler = _train_sampler(cfg, train_split, batch_size=batch_size, rank=rank, world_size=world_size,
                                   seed=seed)
    block_rows = train_sampler.block_rows
    val_sampler = ShardBatchSampler(val_split.length, batch_size=val_batch_size, rank=rank, world_size=world_size)
    train_eval_sampler = ShardBatchSampler(min(stats_rows or train_split.length, train_split.length),
                                           batch_size=val_batch_size, rank=rank, world_size=world_size)
    sample_transform, batch_transform = _transforms(cfg, train_split)
    train_set = _dataset(train_split, cfg, num_classes=num_classes, shuffle=cfg.shuffle, batch_size=batch_size,
                         block_rows=block_rows)
    augmented_train_set, train_batches = train_set, train_sampler
    if sample_transform is not None:
        augmented_train_set = SampleTransformDataset(train_set, sample_transform, seed)
        train_batches = EpochBatches(train_sampler)
    val_set = _dataset(val_split, cfg, num_classes=num_classes, shuffle="none", batch_size=val_batch_size,
                       block_rows=block_rows)
    train_prefetch = prefetch_batches(cfg, shuffle=cfg.shuffle, batch_size=batch_size, block_rows=block_rows)
    eval_prefetch = prefetch_batches(cfg, shuffle="none", batch_size=val_batch_size, block_rows=block_rows)
    return Loaders(
        train=_loader(augmented_train_set, train_batches, cfg, device=device, seed=seed, rank=rank,
                      prefetch_factor=train_prefetch),
        val=_loader(val_set, val_sampler, cfg, device=device, seed=seed, rank=rank, prefetch_factor=eval_prefetch),
        train_sampler=train_sampler,
        train_size=train_split.length,
        val_size=val_split.length,
        train_eval=_loader(train_set, train_eval_sampler, cfg, device=device, seed=seed, rank=rank,
                           prefetch_factor=eval_prefetch),
        sample_shape=train_split.image_shape,
        batch_transform=batch_transform,
    )
