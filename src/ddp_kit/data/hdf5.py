"""Opening HDF5 files for reading and validating one split (images + labels) from metadata alone.

`describe_split` checks everything that can be checked without reading pixel data (the file opens, keys
exist, lengths agree, shapes and dtypes are usable, nothing points outside the file unless allowed) and
returns a picklable `SplitInfo`. DataLoader workers receive that description, never an open handle.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from ddp_kit.config import DataConfig
from ddp_kit.data.errors import DataError

LAYOUTS = ("NCHW", "NHWC")
CHUNK_TARGET_BYTES = 1 << 20  # ~1 MiB chunks: large enough for fast contiguous reads, small enough to shuffle


def rows_for_bytes(row_bytes: int, target: int = CHUNK_TARGET_BYTES) -> int:
    """Rows of `row_bytes` each that make about `target` bytes (at least one)."""
    return max(1, round(target / max(1, row_bytes)))


def _prime_at_least(n: int) -> int:
    candidate = max(2, n)
    while any(candidate % d == 0 for d in range(2, math.isqrt(candidate) + 1)):
        candidate += 1
    return candidate


def open_h5(path: str | os.PathLike, *, cache_bytes: int = 0, cache_chunks: int = 1) -> h5py.File:
    """Open read-only without HDF5 file locks (NFS/Lustre, files open in another program) with a raw-data
    chunk cache of `cache_bytes` holding `cache_chunks` chunks; 0 bytes means reads bypass the cache."""
    # HDF5 wants a prime number of hash slots, ideally ~100x the chunks the cache holds.
    slots = _prime_at_least(max(521, 100 * cache_chunks))
    return h5py.File(path, "r", locking=False, rdcc_nbytes=cache_bytes, rdcc_nslots=slots)


def open_existing(path: str | os.PathLike, key: str) -> h5py.File:
    """`open_h5`, turning a missing, truncated or non-HDF5 file into a DataError that names `key`, the
    object the caller was about to read."""
    if not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "does not exist"
        raise DataError(f"{path}: data file {what} (needed for '{key}'); convert your data with "
                        "`ddp-kit data ...` or fix data.path / data.val_path")
    try:
        return open_h5(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot be opened as HDF5 while looking for '{key}' ({exc}); the file is "
                        "truncated (an interrupted copy or conversion) or not HDF5 at all: copy or convert "
                        "it again") from exc


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class SplitInfo:
    """Everything a reader needs to know about one split, validated; cheap to pickle."""

    path: str
    group: str  # "" for the file root
    images_key: str
    labels_key: str
    length: int
    row_shape: tuple[int, ...]  # shape of one stored image: (C, H, W), (H, W, C) or (H, W)
    layout: str  # NCHW, NHWC, or NHW for single-channel images stored without a channel axis
    dtype: str  # numpy dtype of the images as read (native byte order)
    chunk_rows: int  # rows per HDF5 chunk along axis 0; 0 when the images are not chunked
    compressed: bool  # the images pass through HDF5 filters (gzip, lzf, ...): reading a chunk decodes it whole
    class_names: Optional[tuple[str, ...]] = None

    def key_path(self, key: str) -> str:
        return "/" + "/".join(p for p in (*self.group.split("/"), key) if p)

    @property
    def images_path(self) -> str:
        return self.key_path(self.images_key)

    @property
    def labels_path(self) -> str:
        return self.key_path(self.labels_key)

    @property
    def channels(self) -> int:
        return self.image_shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image as the readers return it."""
        s = self.row_shape
        if self.layout == "NCHW":
            return s
        return (s[2], s[0], s[1]) if self.layout == "NHWC" else (1, *s)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape)) * np.dtype(self.dtype).itemsize

    @property
    def default_block_rows(self) -> int:
        """Rows per shuffled block when data.block_size is 0: one chunk, or ~1 MiB for unchunked data."""
        return self.chunk_rows or rows_for_bytes(self.row_bytes)

    def cache_settings(self, chunks_per_read: int) -> dict:
        """`open_h5` keyword arguments for a reader whose consecutive reads touch `chunks_per_read` chunks."""
        if not self.compressed or not self.chunk_rows:
            # Uncompressed data is fastest read straight into the caller's buffer: a cache only adds a copy.
            return {"cache_bytes": 0, "cache_chunks": 1}
        chunk_bytes = self.chunk_rows * self.row_bytes
        # One extra chunk so a read that ends mid-chunk does not decode that chunk again on the next read.
        return {"cache_bytes": (chunks_per_read + 1) * chunk_bytes, "cache_chunks": chunks_per_read + 1}


def _check_not_external(f: h5py.File, obj, node_path: str, path: str) -> None:
    """Refuse data that lives in another file: external storage and virtual datasets (the caller refuses
    external links while walking the path); the file-identity check also catches soft links into them."""
    where = f"{path}: '{node_path}'"
    hint = "copy the data into this file, or set data.allow_external_storage: true if you trust its sources"
    if isinstance(obj, h5py.Dataset):
        if obj.external:
            files = sorted({name for name, _, _ in obj.external})
            raise DataError(f"{where} uses external storage (raw data in {', '.join(map(str, files))}); {hint}")
        if obj.is_virtual:
            files = sorted({source.file_name for source in obj.virtual_sources()})
            raise DataError(f"{where} is a virtual dataset (data mapped from {', '.join(files)}); {hint}")
    if os.path.realpath(obj.file.filename) != os.path.realpath(f.filename):
        raise DataError(f"{where} resolves into another file ({obj.file.filename}) through a link; {hint}")


def _resolve(f: h5py.File, parts: list[str], settings: list[str], path: str, allow_external: bool):
    """Walk `parts` from the root, naming the first missing, broken or (unless allowed) external link and
    the config setting (`settings[i]` for `parts[i]`) to fix."""
    node = f
    for depth, (part, setting) in enumerate(zip(parts, settings)):
        node_path = "/" + "/".join(parts[: depth + 1])
        if not isinstance(node, h5py.Group):  # the previous part named a dataset where a group belongs
            raise DataError(f"{path}: '{node.name}' is a dataset, not a group, so '{node_path}' cannot exist; "
                            f"check {settings[depth - 1]}")
        link = node.get(part, getlink=True)
        if link is None:
            names = ", ".join(sorted(node.keys())) or "nothing"
            raise DataError(f"{path}: '{node_path}' does not exist ({setting}); '{node.name}' contains: {names}")
        if isinstance(link, h5py.ExternalLink) and not allow_external:
            raise DataError(f"{path}: '{node_path}' is an external link to {link.filename}:{link.path}; "
                            "copy the data into this file, or set data.allow_external_storage: true "
                            "if you trust the linked file")
        try:
            node = node[part]
        except (KeyError, OSError) as exc:
            raise DataError(f"{path}: '{node_path}' is a broken link ({exc}); fix or remove the link") from exc
        if not allow_external:
            _check_not_external(f, node, node_path, path)
    return node


def _declared_layout(images: h5py.Dataset, configured: str, path: str) -> str:
    if images.ndim == 3:
        return "NHW"
    stored = images.attrs.get("layout")
    stored = _text(stored) if stored is not None else None
    if stored is not None and stored not in LAYOUTS:
        raise DataError(f"{path}: '{images.name}' has layout attribute {stored!r}; expected NCHW or NHWC")
    if configured != "auto" and stored is not None and stored != configured:
        raise DataError(f"{path}: '{images.name}' declares layout {stored} but data.layout is {configured}; "
                        "set data.layout: auto to use the file's layout")
    return configured if configured != "auto" else (stored or "NCHW")


def describe_split(path: str | os.PathLike, *, group: str = "", images_key: str = "images",
                   labels_key: str = "labels", layout: str = "auto", allow_external: bool = False,
                   group_setting: str = "data.train_group") -> SplitInfo:
    """Validate one split from metadata only and describe it. Raises DataError naming file and key."""
    path = str(path)
    group_parts = [p for p in group.split("/") if p]
    with open_existing(path, "/" + "/".join([*group_parts, images_key])) as f:
        nodes = {}
        for key, setting in ((images_key, "data.images_key"), (labels_key, "data.labels_key")):
            settings = [group_setting] * len(group_parts) + [setting]
            node = _resolve(f, [*group_parts, key], settings, path, allow_external)
            if not isinstance(node, h5py.Dataset):
                raise DataError(f"{path}: '{node.name}' is a group, not a dataset; check {setting}")
            nodes[key] = node
        images, labels = nodes[images_key], nodes[labels_key]

        if images.ndim not in (3, 4):
            raise DataError(f"{path}: '{images.name}' has shape {images.shape}; expected images as "
                            "N x C x H x W, N x H x W x C or N x H x W")
        if images.dtype != np.uint8 and images.dtype.kind != "f":
            raise DataError(f"{path}: '{images.name}' has dtype {images.dtype}; expected uint8 (0..255) or "
                            "float (already scaled to 0..1); convert the images")
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(f"{path}: '{labels.name}' has shape {labels.shape} and dtype {labels.dtype}; "
                            "expected a 1-D integer array of class indices")
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{path}: '{images.name}' has {images.shape[0]} rows but '{labels.name}' has "
                            f"{labels.shape[0]}; every image needs exactly one label")
        if images.shape[0] == 0:
            raise DataError(f"{path}: '{images.name}' is empty; the split needs at least one image")

        names = labels.attrs.get("class_names")
        return SplitInfo(
            path=path,
            group="/".join(group_parts),
            images_key=images_key,
            labels_key=labels_key,
            length=int(images.shape[0]),
            row_shape=tuple(int(s) for s in images.shape[1:]),
            layout=_declared_layout(images, layout, path),
            dtype=images.dtype.newbyteorder("=").str,  # readers convert big-endian files to native order
            chunk_rows=int(images.chunks[0]) if images.chunks else 0,
            compressed=images.id.get_create_plist().get_nfilters() > 0,
            class_names=tuple(_text(n) for n in names) if names is not None else None,
        )


def config_splits(cfg: DataConfig) -> tuple[SplitInfo, SplitInfo]:
    """The validated train and validation splits that `cfg` points at."""
    common = dict(images_key=cfg.images_key, labels_key=cfg.labels_key, layout=cfg.layout,
                  allow_external=cfg.allow_external_storage)
    train = describe_split(cfg.path, group=cfg.train_group, group_setting="data.train_group", **common)
    val = describe_split(cfg.val_path or cfg.path, group=cfg.val_group, group_setting="data.val_group", **common)
    return train, val
