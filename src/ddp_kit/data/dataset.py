"""Batched HDF5 datasets: one call returns a whole batch `(fields, row_ids)`.

`H5Dataset` reads the fields of a split from the HDF5 file, except those it holds in shared memory: the
small ones (labels, weights: a few bytes per row, loaded once by the main process and shared with the
DataLoader workers) and, with data.in_memory, all of them. Row ids come back as int64, in the order asked.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import Mapping, Optional

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from ddp_kit.data.errors import DataError
from ddp_kit.data.fields import token_fields
from ddp_kit.data.hdf5 import FieldInfo, SplitInfo, open_h5

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]  # (fields by name, row ids)
LOAD_SLICE_BYTES = 64 << 20  # whole-field loads and scans read this much at a time
HELD_ROW_BYTES = 16  # fields this small per row (a label, a weight) are held in RAM, not read per batch


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


def batch_buffers(n: int, specs: Mapping[str, tuple[tuple[int, ...], object]]) -> Batch:
    """Empty fields {name: n x row shape tensor} for `specs` {name: (row shape, dtype)} and n int64 row ids,
    all views of ONE storage.

    A DataLoader worker ships every storage of a batch through its own shared-memory segment and file
    descriptor; for small rows that costs more than the read itself, so a batch travels as one storage.
    """
    align = 16  # every field starts at a multiple of any dtype's size
    layout, offset = {}, 0
    for name, (row_shape, dtype) in specs.items():
        dtype = torch_dtype(dtype)
        layout[name] = (offset, (n, *row_shape), dtype)
        offset += -(-n * int(np.prod(row_shape)) * dtype.itemsize // align) * align
    storage = torch.UntypedStorage(offset + 8 * n)
    fields = {name: torch.empty(0, dtype=dtype).set_(storage, start // dtype.itemsize, shape)
              for name, (start, shape, dtype) in layout.items()}
    return fields, torch.empty(0, dtype=torch.int64).set_(storage, offset // 8, (n,))


def _row_ids(rows, length: int, split: SplitInfo) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= length):
        raise IndexError(f"{split.path}: row ids must be in [0, {length}) for the split '{split.group or '/'}', "
                         f"got {rows.min()}..{rows.max()}")
    return rows


def load_field(split: SplitInfo, name: str) -> torch.Tensor:
    """All rows of one field, as stored, in one shared-memory tensor: DataLoader workers (fork, spawn or
    forkserver) map this memory instead of receiving a copy."""
    info = split.field(name)
    values = torch.empty((split.length, *info.row_shape), dtype=torch_dtype(info.dtype)).share_memory_()
    target = values.numpy()
    step = max(1, LOAD_SLICE_BYTES // max(1, info.row_bytes))
    with open_h5(split.path) as f:
        source = split.dataset(f, name)
        for start in range(0, split.length, step):
            stop = min(start + step, split.length)
            target[start:stop] = info.read(source, start, stop)
    return values


def check_classes(split: SplitInfo, name: str, num_classes: int, held: Optional[torch.Tensor] = None) -> None:
    """Refuse a field whose values are not class indices in [0, num_classes), naming the first bad row; reads
    `held` (the field in RAM) if given, else the file in slices."""
    info = split.field(name)
    where = f"{split.path}: '{info.path}' ({info.setting})"
    if info.dtype[1] not in "iu":
        raise DataError(f"{where} has dtype {np.dtype(info.dtype)}; class indices must be integers")
    slices = [held.numpy()] if held is not None else None
    with contextlib.ExitStack() as files:
        if slices is None:
            source = split.dataset(files.enter_context(open_h5(split.path)), name)
            step = max(1, LOAD_SLICE_BYTES // max(1, info.row_bytes))
            slices = (info.read(source, start, min(start + step, split.length))
                      for start in range(0, split.length, step))
        first = 0
        for values in slices:
            outside = ((values < 0) | (values >= num_classes)).reshape(len(values), -1)
            bad = np.flatnonzero(outside.any(axis=1))
            if len(bad):
                value = values[bad[0]].reshape(-1)[outside[bad[0]]][0]
                raise DataError(f"{where}: row {first + int(bad[0])} is {value}, outside the {num_classes} classes "
                                f"of field {name!r} (for built-in classification, model.num_classes is {num_classes}); "
                                "class indices must be in [0, num_classes): fix the number of classes or the data")
            first += len(values)


class H5Dataset(Dataset):
    """One split of an HDF5 file, read a batch per call: `(fields, row ids)`, the fields in the order asked.

    Fields in `held` (tensors in shared memory: the small ones, or every field with data.in_memory) are
    gathered from RAM; the others are read from the file as contiguous runs of rows. Images come back as
    N x C x H x W views in the stored dtype (an NHWC file yields a channels-last view, no copy), a token
    stream as the fields input and target, everything else as stored.

    The file is opened on first use in each process that reads (a DataLoader worker, or the main process
    with num_workers=0), never in __init__, never pickled, and reopened when the process id changes, so the
    object is safe to copy into fork, spawn and forkserver workers.

    With `block_rows` and `cache_blocks` set (chunk shuffle), reads go through a per-process cache of whole
    blocks: a batch is scattered over the few blocks of the sampler's current window, and each block is
    read (and decompressed) once per worker rather than once per run of rows. Otherwise each contiguous run
    of the batch is read directly.
    """

    def __init__(self, split: SplitInfo, held: Mapping[str, torch.Tensor], *, block_rows: int = 0,
                 cache_blocks: int = 0, chunks_per_read: int = 1):
        for name, values in held.items():
            if len(values) != split.length:
                raise ValueError(f"{split.path}: {len(values)} rows of field {name!r} given for {split.length}")
        self.split = split
        self.held = dict(held)
        self.read_fields = [info for info in split.fields if info.name not in self.held]
        self.block_rows = block_rows
        self.cache_blocks = cache_blocks if block_rows else 0
        self.cache_settings = split.cache_settings(chunks_per_read)
        self._reset_handle()

    def _reset_handle(self) -> None:
        self._file: Optional[h5py.File] = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._pid: Optional[int] = None
        self._blocks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_file=None, _datasets={}, _pid=None, _blocks=OrderedDict())  # handles stay per process
        return state

    def __len__(self) -> int:
        return self.split.length

    def close(self) -> None:
        """Close this process's handle (it is reopened on the next read)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._reset_handle()

    def _dataset(self, name: str) -> h5py.Dataset:
        if self._pid != os.getpid():
            # A handle inherited through fork belongs to the parent's HDF5 state: drop it, never use it.
            self._reset_handle()
            try:
                self._file = open_h5(self.split.path, **self.cache_settings)
            except OSError as exc:
                raise DataError(f"{self.split.path}: cannot be opened for reading the split "
                                f"'{self.split.group or '/'}' ({exc}); was it moved, replaced or truncated after "
                                "validation?") from exc
            self._datasets = {info.name: self.split.dataset(self._file, info.name) for info in self.read_fields}
            self._pid = os.getpid()
        return self._datasets[name]

    def _block(self, info: FieldInfo, block: int) -> np.ndarray:
        cached = self._blocks.get((info.name, block))
        if cached is not None:
            self._blocks.move_to_end((info.name, block))
            return cached
        start = block * self.block_rows
        data = info.read(self._dataset(info.name), start, min(start + self.block_rows, self.split.length))
        self._blocks[info.name, block] = data
        if len(self._blocks) > self.cache_blocks * len(self.read_fields):
            self._blocks.popitem(last=False)
        return data

    def _read_sorted(self, info: FieldInfo, rows: np.ndarray, out: np.ndarray) -> None:
        """Read ascending unique `rows` of field `info` into `out`."""
        if self.cache_blocks:
            blocks = rows // self.block_rows
            bounds = np.flatnonzero(np.diff(blocks)) + 1
            for first, last in zip(np.r_[0, bounds].tolist(), np.r_[bounds, len(rows)].tolist()):
                block = int(blocks[first])
                np.take(self._block(info, block), rows[first:last] - block * self.block_rows, axis=0,
                        out=out[first:last])
        else:
            dataset, position = self._dataset(info.name), 0
            for start, stop in contiguous_runs(rows):
                out[position:position + stop - start] = info.read(dataset, start, stop)
                position += stop - start

    def __getitem__(self, rows) -> Batch:
        """Rows `rows` (any order, repeats allowed) as (fields, row ids), in that order."""
        rows = _row_ids(rows, self.split.length, self.split)
        fields, ids = batch_buffers(len(rows), {info.name: (info.row_shape, info.dtype) for info in self.split.fields})
        ids.numpy()[:] = rows
        # numpy gathers on this thread; torch's index_select would use the intra-op thread pool, which
        # stalls when the cores are busy with the training step.
        for name, values in self.held.items():
            np.take(values.numpy(), rows, axis=0, out=fields[name].numpy())
        if self.read_fields:
            unique, inverse = np.unique(rows, return_inverse=True)
            for info in self.read_fields:
                if np.array_equal(unique, rows):  # the samplers' batches: read straight into the batch
                    self._read_sorted(info, rows, fields[info.name].numpy())
                else:
                    ascending = np.empty((len(unique), *info.row_shape), dtype=info.dtype)
                    self._read_sorted(info, unique, ascending)
                    fields[info.name].numpy()[:] = ascending[inverse]
        return batch_fields(self.split, fields), ids


def batch_fields(split: SplitInfo, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A split's fields as read (stored rows) as the loaders yield them: images N x C x H x W, a token stream
    as input and target."""
    if split.tokens:
        return token_fields(stored["tokens"])
    return {info.name: to_nchw(stored[info.name], info.layout) if info.layout else stored[info.name]
            for info in split.fields}


def held_fields(split: SplitInfo, in_memory: bool) -> dict[str, torch.Tensor]:
    """The fields to hold in shared memory: all with `in_memory`, else the ones of at most HELD_ROW_BYTES per
    row (labels, weights: loaded once, instead of a read per batch)."""
    return {info.name: load_field(split, info.name) for info in split.fields
            if in_memory or (info.row_bytes <= HELD_ROW_BYTES and not info.window)}
