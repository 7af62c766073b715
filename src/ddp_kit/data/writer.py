"""Writing splits to HDF5: the writers behind every converter and test file, atomic by construction.

`write_fields` writes any named arrays (one row per sample each) as a split's fields, chunked in whole rows.
`write_h5` / `SplitWriter` write the image-classification layout: per split (a group, or the file root) an `images` dataset chunked in whole rows of ~1 MiB
(what the chunk sampler reads as one block), optionally compressed, with a `layout` attribute; and a
contiguous `labels` dataset with `num_classes`, `label_min`, `label_max` and optional `class_names`
attributes, so readers can validate labels without scanning them.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import h5py
import numpy as np

from ddp_kit.data.errors import DataError
from ddp_kit.data.hdf5 import LAYOUTS, resolve_path, rows_for_bytes
from ddp_kit.files import atomic_path, require_free_space

COMPRESSIONS = (None, "gzip", "lzf")
# Streaming writers fill compressed chunks over several calls; a chunk evicted half-written would be
# compressed, then decompressed and recompressed on the next write. 64 MiB keeps partial chunks cached.
WRITE_CACHE_BYTES = 64 << 20
WRITE_OUTSIDE_HINT = "splits are written into this file only: remove the link or write the split to another group"


class SplitWriter:
    """Creates one split's `images` and `labels` datasets in an open file and fills them in order, batch by
    batch, so a converter never holds more than a batch in memory; `finish` records the attributes."""

    def __init__(self, f: h5py.File, group: str, *, length: int, row_shape: Sequence[int], dtype,
                 layout: str = "NCHW", label_dtype=np.int64, chunk_rows: Optional[int] = None,
                 compression: Optional[str] = None):
        dtype = np.dtype(dtype)
        if dtype != np.uint8 and dtype.kind != "f":
            raise DataError(f"{f.filename}: images of dtype {dtype} cannot be written; use uint8 or float")
        if layout not in LAYOUTS:
            raise DataError(f"{f.filename}: layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        if compression not in COMPRESSIONS:
            raise DataError(f"{f.filename}: compression {compression!r} is not one of none, gzip, lzf")
        if length < 1:
            raise DataError(f"{f.filename}: split '{group or '/'}' would be empty; it needs at least one image")
        node = _split_group(f, group)
        for key in ("images", "labels"):
            if key in node:
                raise DataError(f"{f.filename}: '{node.name.rstrip('/')}/{key}' already exists; write the split "
                                "to another group or a new file")
        row_bytes = int(np.prod(row_shape)) * dtype.itemsize
        rows = min(length, chunk_rows or rows_for_bytes(row_bytes))
        self.images = node.create_dataset("images", shape=(length, *row_shape), dtype=dtype,
                                          chunks=(rows, *row_shape), compression=compression)
        self.images.attrs["layout"] = layout
        # Labels stay contiguous and uncompressed: readers load them whole (a few bytes per row).
        self.labels = node.create_dataset("labels", shape=(length,), dtype=label_dtype)
        self.node = node
        self.written = 0
        self.label_min: Optional[int] = None
        self.label_max: Optional[int] = None

    def write(self, images: np.ndarray, labels: np.ndarray) -> None:
        """Append a batch of rows after the ones already written."""
        if len(images) != len(labels):
            raise DataError(f"{self.images.file.filename}: a batch has {len(images)} images but "
                            f"{len(labels)} labels")
        stop = self.written + len(images)
        if stop > len(self.images):
            raise DataError(f"{self.images.file.filename}: more rows written than the {len(self.images)} "
                            f"declared for '{self.images.name}'")
        if len(labels):
            lo, hi = int(np.min(labels)), int(np.max(labels))
            self.label_min = lo if self.label_min is None else min(self.label_min, lo)
            self.label_max = hi if self.label_max is None else max(self.label_max, hi)
        self.images[self.written:stop] = images
        self.labels[self.written:stop] = labels
        self.written = stop

    def finish(self, class_names: Optional[Sequence[str]] = None,
               attrs: Optional[Mapping[str, object]] = None) -> None:
        """Check that every declared row was written and record label range, class names and `attrs`."""
        where = f"{self.images.file.filename}: '{self.labels.name}'"
        if self.written != len(self.images):
            raise DataError(f"{where}: only {self.written} of {len(self.images)} rows were written")
        if self.label_min < 0:
            raise DataError(f"{where}: labels must be class indices >= 0, found {self.label_min}")
        num_classes = self.label_max + 1
        if class_names is not None:
            if len(class_names) <= self.label_max:
                raise DataError(f"{where}: label {self.label_max} has no name among {len(class_names)} "
                                "class_names")
            num_classes = len(class_names)
            self.labels.attrs["class_names"] = np.array([str(n) for n in class_names], dtype=h5py.string_dtype())
        self.labels.attrs["num_classes"] = num_classes
        self.labels.attrs["label_min"] = self.label_min
        self.labels.attrs["label_max"] = self.label_max
        for key, value in (attrs or {}).items():
            self.node.attrs[key] = value


@contextmanager
def atomic_h5(path: str | os.PathLike, *, append: bool = False, needed_bytes: Optional[int] = None
              ) -> Iterator[h5py.File]:
    """An HDF5 file to write splits into, which replaces `path` only when the block completes; a full disk
    is a WriteError naming `path` (with `needed_bytes`, if known) and leaves nothing behind.

    With `append` the existing file is copied first (its groups are kept); for a large file that copy is
    the price of atomicity, so one file per split (data.val_path) is cheaper to build incrementally.

    Free space is checked before writing, as far as `needed_bytes` says: HDF5 cannot close a file whose write
    failed for lack of space, and the process then crashes at exit (segmentation fault) after the error.
    """
    if needed_bytes:
        copied = Path(path).stat().st_size if append and Path(path).is_file() else 0
        require_free_space(path, needed_bytes + copied)
    with atomic_path(path, needed_bytes) as tmp:
        if append and Path(path).is_file():
            shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a" if append else "w", rdcc_nbytes=WRITE_CACHE_BYTES) as f:
            yield f


def write_split(f: h5py.File, images: np.ndarray, labels: np.ndarray, *, group: str = "",
                layout: str = "NCHW", chunk_rows: Optional[int] = None, compression: Optional[str] = None,
                class_names: Optional[Sequence[str]] = None, attrs: Optional[Mapping[str, object]] = None) -> None:
    """Write in-memory arrays as one split of an open file (see `write_h5` for the arguments)."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim == 3:
        images = images[:, None] if layout == "NCHW" else images[..., None]
    if images.ndim != 4:
        raise DataError(f"{f.filename}: images for '{group or '/'}' have shape {images.shape}; expected "
                        "N x C x H x W, N x H x W x C or N x H x W")
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images):
        raise DataError(f"{f.filename}: labels for '{group or '/'}' need one integer per image; got shape "
                        f"{labels.shape} and dtype {labels.dtype} for {len(images)} images")
    writer = SplitWriter(f, group, length=len(images), row_shape=images.shape[1:], dtype=images.dtype,
                         layout=layout, label_dtype=labels.dtype, chunk_rows=chunk_rows, compression=compression)
    writer.write(images, labels)
    writer.finish(class_names, attrs)


def _split_group(f: h5py.File, group: str) -> h5py.Group:
    steps = [(part, "the split's group") for part in group.split("/") if part]
    node, _ = resolve_path(f, steps, allow_external=False, external_hint=WRITE_OUTSIDE_HINT, create_groups=True)
    if not isinstance(node, h5py.Group):
        raise DataError(f"{f.filename}: '{node.name}' is a dataset, not a group; write the split to another group")
    return node


def write_field_arrays(f: h5py.File, arrays: Mapping[str, np.ndarray], *, group: str = "",
                       chunk_rows: Optional[int] = None, compression: Optional[str] = None,
                       layouts: Optional[Mapping[str, str]] = None, attrs: Optional[Mapping[str, object]] = None) -> None:
    """Write in-memory arrays as the fields of one split of an open file (see `write_fields`)."""
    where = f"{f.filename}: split '{group or '/'}'"
    arrays = {str(key): np.asarray(value) for key, value in arrays.items()}
    if not arrays:
        raise DataError(f"{where}: no arrays to write")
    if compression not in COMPRESSIONS:
        raise DataError(f"{f.filename}: compression {compression!r} is not one of none, gzip, lzf")
    for key, array in arrays.items():
        if array.ndim == 0 or array.dtype.kind not in "biuf":
            raise DataError(f"{where}: '{key}' has shape {array.shape} and dtype {array.dtype}; a field needs one row "
                            "per sample (at least 1-D) of numbers")
    lengths = {key: len(array) for key, array in arrays.items()}
    if len(set(lengths.values())) > 1 or 0 in lengths.values():
        raise DataError(f"{where}: every field needs the same number of rows (at least one), got "
                        f"{', '.join(f'{key}: {n}' for key, n in lengths.items())}")
    for key, layout in (layouts or {}).items():
        if key not in arrays or layout not in LAYOUTS:
            raise DataError(f"{where}: layouts[{key!r}] = {layout!r}: needs one of the arrays and one of "
                            f"{', '.join(LAYOUTS)}")
    node = _split_group(f, group)
    for key in arrays:
        if key in node:
            raise DataError(f"{f.filename}: '{node.name.rstrip('/')}/{key}' already exists; write the split to another "
                            "group or a new file")
    # One chunk length for every field, from the largest rows: the chunk sampler's block is that field's chunk.
    length = next(iter(lengths.values()))
    widest = max(int(np.prod(array.shape[1:])) * array.dtype.itemsize for array in arrays.values())
    rows = min(length, chunk_rows or rows_for_bytes(widest))
    for key, array in arrays.items():
        dataset = node.create_dataset(key, data=array, chunks=(rows, *array.shape[1:]), compression=compression)
        if key in (layouts or {}):
            dataset.attrs["layout"] = layouts[key]
    for key, value in (attrs or {}).items():
        node.attrs[key] = value


def write_fields(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], *, group: str = "",
                 chunk_rows: Optional[int] = None, compression: Optional[str] = None,
                 layouts: Optional[Mapping[str, str]] = None, attrs: Optional[Mapping[str, object]] = None,
                 append_group: bool = False) -> None:
    """Write any named arrays as one split of `path` atomically: `arrays` {dataset key: array}, each with one
    row per sample along axis 0 (the same count for all), any numeric dtype and row shape; read them with
    data.fields {field name: dataset key}. A 1-D token stream is written the same way ({"tokens": ids}) and read
    with data.tokens. group: the split's group, "" for the file root. chunk_rows: rows per HDF5 chunk for every
    array (default ~1 MiB of the largest rows). compression: None, "gzip" or "lzf". layouts: {key: NCHW | NHWC}
    for 4-D image arrays (stored as the `layout` attribute). attrs: attributes of the split's group.
    append_group: keep the file's other groups instead of replacing the file.
    """
    needed = sum(np.asarray(array).nbytes for array in arrays.values())
    with atomic_h5(path, append=append_group, needed_bytes=needed) as f:
        write_field_arrays(f, arrays, group=group, chunk_rows=chunk_rows, compression=compression, layouts=layouts,
                           attrs=attrs)


def write_tokens(path: str | os.PathLike, tokens: np.ndarray, *, group: str = "", key: str = "tokens",
                 chunk_rows: Optional[int] = None, compression: Optional[str] = None,
                 append_group: bool = False) -> None:
    """Write a 1-D integer token stream as the dataset `key` of the split `group` (read with data.tokens: key
    and data.context_length); chunked in ~1 MiB of tokens unless `chunk_rows` (tokens per chunk) is given."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise DataError(f"{path}: tokens for '{group or '/'}' must be a 1-D integer array of token ids, got shape "
                        f"{tokens.shape} and dtype {tokens.dtype}")
    write_fields(path, {key: tokens}, group=group, chunk_rows=chunk_rows, compression=compression,
                 append_group=append_group)


def write_h5(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray, *, group: str = "",
             layout: str = "NCHW", chunk_rows: Optional[int] = None, compression: Optional[str] = None,
             class_names: Optional[Sequence[str]] = None, attrs: Optional[Mapping[str, object]] = None,
             append_group: bool = False) -> None:
    """Write one split to `path` atomically (temporary file + rename).

    images: N x C x H x W (`layout` NCHW) or N x H x W x C (NHWC), or N x H x W for one channel; uint8 or
    float. labels: N integer class indices. group: the split's group, "" for the file root. chunk_rows:
    rows per HDF5 chunk (default ~1 MiB of images). compression: None, "gzip" or "lzf". class_names: names
    of the classes, stored with `num_classes`. attrs: extra attributes of the split's group.
    append_group: keep the file's other groups instead of replacing the file.
    """
    with atomic_h5(path, append=append_group, needed_bytes=np.asarray(images).nbytes) as f:
        write_split(f, images, labels, group=group, layout=layout, chunk_rows=chunk_rows,
                    compression=compression, class_names=class_names, attrs=attrs)
