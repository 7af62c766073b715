"""Batched datasets: one call returns a whole batch `(images, labels, row_ids)`.

`H5ImageDataset` reads from the HDF5 file; `InMemoryImageDataset` serves the same rows from tensors in
shared memory. Both return images as N x C x H x W tensors in the stored dtype (uint8 or float; an NHWC file
yields a channels-last view, no copy), labels as int64 and the row ids as int64, in the order requested.
Labels are held in RAM by both (a few bytes per row, loaded once by the main process and shared with the
DataLoader workers), so only the images are read from the file.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Optional

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from ddp_kit.data.errors import DataError
from ddp_kit.data.hdf5 import SplitInfo, open_h5

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
LOAD_SLICE_BYTES = 64 << 20  # whole-split loads read this much at a time


def contiguous_runs(sorted_rows: np.ndarray) -> list[tuple[int, int]]:
    """[(start, stop), ...] covering ascending unique row ids with the fewest half-open ranges."""
    if len(sorted_rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    starts = sorted_rows[np.r_[0, breaks]]
    stops = sorted_rows[np.r_[breaks - 1, len(sorted_rows) - 1]] + 1
    return list(zip(starts.tolist(), stops.tolist()))


def to_nchw(images: torch.Tensor, layout: str) -> torch.Tensor:
    """View stored rows as N x C x H x W without copying (NHWC becomes a channels-last tensor)."""
    if layout == "NHWC":
        return images.permute(0, 3, 1, 2)
    if layout == "NHW":
        return images.unsqueeze(1)
    return images


def torch_dtype(dtype) -> torch.dtype:
    """The torch dtype of a numpy dtype (or dtype string); a torch dtype is returned as is."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def batch_buffers(n: int, row_shape: tuple[int, ...], dtype) -> Batch:
    """Empty (images, labels, row ids) tensors for n rows, all views of ONE storage.

    A DataLoader worker ships every storage of a batch through its own shared-memory segment and file
    descriptor; for small images that costs more than the read itself, so a batch travels as one storage.
    """
    dtype = torch_dtype(dtype)
    image_bytes = n * int(np.prod(row_shape)) * dtype.itemsize
    offset = -(-image_bytes // 8)  # in int64 elements: the labels and ids must be 8-byte aligned
    storage = torch.UntypedStorage(8 * offset + 16 * n)
    images = torch.empty(0, dtype=dtype).set_(storage, 0, (n, *row_shape))
    ids = torch.empty(0, dtype=torch.int64).set_(storage, offset, (2, n))
    return images, ids[0], ids[1]


def _row_ids(rows, length: int, split: SplitInfo) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= length):
        raise IndexError(f"{split.path}: row ids must be in [0, {length}) for '{split.images_path}', got "
                         f"{rows.min()}..{rows.max()}")
    return rows


def load_labels(split: SplitInfo, num_classes: Optional[int]) -> torch.Tensor:
    """All labels of the split as an int64 tensor in shared memory, checked to lie in [0, num_classes) when
    `num_classes` is given (the built-in classification setup)."""
    with open_h5(split.path) as f:
        labels = split.dataset(f, "labels")[()]
    low, high = int(labels.min()), int(labels.max())
    if num_classes is not None and (low < 0 or high >= num_classes):
        bad = int(np.flatnonzero((labels < 0) | (labels >= num_classes))[0])
        raise DataError(f"{split.path}: '{split.labels_path}' holds labels {low}..{high} (row {bad} is "
                        f"{int(labels[bad])}) but model.num_classes is {num_classes}; labels must be class "
                        "indices in [0, num_classes): fix model.num_classes or the labels")
    return torch.from_numpy(labels.astype(np.int64)).share_memory_()


def load_images(split: SplitInfo) -> torch.Tensor:
    """All images of the split, as stored, in one shared-memory tensor: DataLoader workers (fork, spawn or
    forkserver) map this memory instead of receiving a copy."""
    images = torch.empty((split.length, *split.row_shape), dtype=torch_dtype(split.dtype)).share_memory_()
    target = images.numpy()
    step = max(1, LOAD_SLICE_BYTES // split.row_bytes)
    with open_h5(split.path) as f:
        source = split.dataset(f, "images")
        for start in range(0, split.length, step):
            rows = np.s_[start:min(start + step, split.length)]
            source.read_direct(target, rows, rows)
    return images


class H5ImageDataset(Dataset):
    """One split of an HDF5 file, read a batch per call as contiguous runs of rows.

    The file is opened on first use in each process that reads (a DataLoader worker, or the main process
    with num_workers=0), never in __init__, never pickled, and reopened when the process id changes, so the
    object is safe to copy into fork, spawn and forkserver workers.

    With `block_rows` and `cache_blocks` set (chunk shuffle), reads go through a per-process cache of whole
    blocks: a batch is scattered over the few blocks of the sampler's current window, and each block is
    read (and decompressed) once per worker rather than once per run of rows. Otherwise each contiguous run
    of the batch is read directly.
    """

    def __init__(self, split: SplitInfo, labels: torch.Tensor, *, block_rows: int = 0, cache_blocks: int = 0,
                 chunks_per_read: int = 1):
        if len(labels) != split.length:
            raise ValueError(f"{split.path}: {len(labels)} labels given for {split.length} images")
        self.split = split
        self.labels = labels
        self.block_rows = block_rows
        self.cache_blocks = cache_blocks if block_rows else 0
        self.cache_settings = split.cache_settings(chunks_per_read)
        self._reset_handle()

    def _reset_handle(self) -> None:
        self._file: Optional[h5py.File] = None
        self._images: Optional[h5py.Dataset] = None
        self._pid: Optional[int] = None
        self._blocks: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_file=None, _images=None, _pid=None, _blocks=OrderedDict())  # handles stay per process
        return state

    def __len__(self) -> int:
        return self.split.length

    def close(self) -> None:
        """Close this process's handle (it is reopened on the next read)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._reset_handle()

    def _dataset(self) -> h5py.Dataset:
        if self._pid != os.getpid():
            # A handle inherited through fork belongs to the parent's HDF5 state: drop it, never use it.
            self._reset_handle()
            try:
                self._file = open_h5(self.split.path, **self.cache_settings)
            except OSError as exc:
                raise DataError(f"{self.split.path}: cannot be opened for reading '{self.split.images_path}' "
                                f"({exc}); was it moved, replaced or truncated after validation?") from exc
            self._images = self.split.dataset(self._file, "images")
            self._pid = os.getpid()
        return self._images

    def _block(self, block: int) -> np.ndarray:
        cached = self._blocks.get(block)
        if cached is not None:
            self._blocks.move_to_end(block)
            return cached
        start = block * self.block_rows
        data = self._dataset()[start:min(start + self.block_rows, self.split.length)]
        self._blocks[block] = data
        if len(self._blocks) > self.cache_blocks:
            self._blocks.popitem(last=False)
        return data

    def _read_sorted(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Read ascending unique `rows` into `out`."""
        if self.cache_blocks:
            blocks = rows // self.block_rows
            bounds = np.flatnonzero(np.diff(blocks)) + 1
            for first, last in zip(np.r_[0, bounds].tolist(), np.r_[bounds, len(rows)].tolist()):
                block = int(blocks[first])
                np.take(self._block(block), rows[first:last] - block * self.block_rows, axis=0, out=out[first:last])
        else:
            images, position = self._dataset(), 0
            for start, stop in contiguous_runs(rows):
                out[position:position + stop - start] = images[start:stop]
                position += stop - start

    def __getitem__(self, rows) -> Batch:
        """Rows `rows` (any order, repeats allowed) as (images, labels, row ids), in that order."""
        rows = _row_ids(rows, self.split.length, self.split)
        images, labels, ids = batch_buffers(len(rows), self.split.row_shape, self.split.dtype)
        ids.numpy()[:] = rows
        np.take(self.labels.numpy(), rows, out=labels.numpy())
        unique, inverse = np.unique(rows, return_inverse=True)
        if np.array_equal(unique, rows):  # the samplers' batches: read straight into the batch
            self._read_sorted(rows, images.numpy())
        else:
            ascending = np.empty((len(unique), *self.split.row_shape), dtype=self.split.dtype)
            self._read_sorted(unique, ascending)
            images.numpy()[:] = ascending[inverse]
        return to_nchw(images, self.split.layout), labels, ids


class InMemoryImageDataset(Dataset):
    """The same batches as `H5ImageDataset`, from images loaded once with `load_images` (shared memory)."""

    def __init__(self, split: SplitInfo, images: torch.Tensor, labels: torch.Tensor):
        if len(images) != len(labels):
            raise ValueError(f"{split.path}: {len(labels)} labels given for {len(images)} images")
        self.split = split
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, rows) -> Batch:
        rows = _row_ids(rows, len(self.images), self.split)
        images, labels, ids = batch_buffers(len(rows), self.split.row_shape, self.split.dtype)
        ids.numpy()[:] = rows
        # numpy gathers on this thread; torch's index_select would use the intra-op thread pool, which
        # stalls when the cores are busy with the training step.
        np.take(self.images.numpy(), rows, axis=0, out=images.numpy())
        np.take(self.labels.numpy(), rows, out=labels.numpy())
        return to_nchw(images, self.split.layout), labels, ids
