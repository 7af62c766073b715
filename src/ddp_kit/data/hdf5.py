"""Opening HDF5 files for reading and validating one split (its named fields, or a token stream) from metadata.

`describe_split` checks everything that can be checked without reading pixel data (the file opens, keys
exist, lengths agree, shapes and dtypes are usable, nothing points outside the file unless allowed) and
returns a picklable `SplitInfo`. DataLoader workers receive that description, never an open handle.
`resolve_path` is the one lookup of a path in a user's file: unless data.allow_external_storage is set it
follows soft links itself and refuses anything leading into another file before HDF5 could open that file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import h5py
import numpy as np

from ddp_kit.config import DataConfig
from ddp_kit.data.errors import DataError
from ddp_kit.data.fields import DEFAULT_FIELDS, TOKEN_FIELDS, field_keys, image_fields

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
class FieldInfo:
    """One field of a split: an HDF5 dataset with one row per sample (or, for a token stream, one window)."""

    name: str  # the field's name in the batch
    key: str  # the dataset as configured, relative to the split's group
    setting: str  # the config key that names it, for error messages
    # Where the readers find it: unless the split allows external data, the dataset's own name in the file with
    # every soft link resolved, so a reader follows no link; otherwise the configured path.
    path: str
    row_shape: tuple[int, ...]  # one row as read: stored shape, () for integer rows of 1 x ... x 1, (L + 1,) windows
    dtype: str  # numpy dtype as read (native byte order)
    chunk_rows: int  # rows per HDF5 chunk along axis 0 (windows per chunk for tokens); 0 when not chunked
    compressed: bool  # passes through HDF5 filters (gzip, lzf, ...): reading a chunk decodes it whole
    layout: Optional[str] = None  # image fields: NCHW, NHWC, or NHW (one channel, no channel axis); else None
    window: int = 0  # token stream: tokens per row, the rows being consecutive windows of a 1-D dataset

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape)) * np.dtype(self.dtype).itemsize

    @property
    def shape(self) -> tuple[int, ...]:
        """One row as the loaders yield it: images as (C, H, W)."""
        s = self.row_shape
        if self.layout is None or self.layout == "NCHW":
            return s
        return (s[2], s[0], s[1]) if self.layout == "NHWC" else (1, *s)

    @property
    def channels(self) -> int:
        return self.shape[0]

    def read(self, dataset: h5py.Dataset, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of this field from its open `dataset`."""
        if self.window:
            return dataset[start * self.window:stop * self.window].reshape(stop - start, self.window)
        return dataset[start:stop].reshape(stop - start, *self.row_shape)


@dataclass(frozen=True)
class SplitInfo:
    """Everything a reader needs to know about one split, validated; cheap to pickle."""

    path: str
    group: str
    allow_external: bool
    length: int  # rows (samples) of every field
    fields: tuple[FieldInfo, ...]

    def field(self, name: str) -> FieldInfo:
        for info in self.fields:
            if info.name == name:
                return info
        raise KeyError(f"{self.path}: the split has no field {name!r}; its fields are {self.names}")

    @property
    def names(self) -> list[str]:
        return [info.name for info in self.fields]

    @property
    def images(self) -> list[FieldInfo]:
        return [info for info in self.fields if info.layout is not None]

    @property
    def tokens(self) -> bool:
        return any(info.window for info in self.fields)

    @property
    def field_shapes(self) -> dict[str, tuple[int, ...]]:
        """One row of every field as the loaders yield it (images C, H, W; a token stream's input and target)."""
        if self.tokens:
            return {name: (self.fields[0].window - 1,) for name in TOKEN_FIELDS}
        return {info.name: info.shape for info in self.fields}

    def dataset(self, f: h5py.File, name: str) -> h5py.Dataset:
        """Field `name`'s dataset in `f`, this split's file opened by a reader, looked up as describe_split
        did: a file rewritten since then to point elsewhere is refused, not followed."""
        info = self.field(name)
        steps = [(part, info.setting) for part in info.path.split("/") if part]
        return _dataset_at(f, steps, self.allow_external)[0]

    @property
    def default_block_rows(self) -> int:
        """Rows per shuffled block when data.block_size is 0: one chunk of the field with the largest rows (the
        reads that cost most), or ~1 MiB of rows when no field is chunked."""
        chunked = [info for info in self.fields if info.chunk_rows]
        if chunked:
            return max(chunked, key=lambda info: info.row_bytes).chunk_rows
        return rows_for_bytes(sum(info.row_bytes for info in self.fields))

    def cache_settings(self, chunks_per_read: int) -> dict:
        """`open_h5` keyword arguments for a reader whose consecutive reads touch `chunks_per_read` chunks of
        each field (HDF5 gives every dataset its own cache of this size)."""
        compressed = [info for info in self.fields if info.compressed and info.chunk_rows]
        if not compressed:
            # Uncompressed data is fastest read straight into the caller's buffer: a cache only adds a copy.
            return {"cache_bytes": 0, "cache_chunks": 1}
        chunk_bytes = max(info.chunk_rows * info.row_bytes for info in compressed)
        # One extra chunk so a read that ends mid-chunk does not decode that chunk again on the next read.
        return {"cache_bytes": (chunks_per_read + 1) * chunk_bytes, "cache_chunks": chunks_per_read + 1}


EXTERNAL_HINT = "copy the data into this file, or set data.allow_external_storage: true if you trust the linked file"
# Soft links followed in one lookup: HDF5's own default (H5Pset_nlinks), so a path that resolves when HDF5
# follows the links (data.allow_external_storage: true) resolves here too.
MAX_SOFT_LINKS = 16


def _join(group_path: str, name: str) -> str:
    return group_path.rstrip("/") + "/" + name


def _check_in_file(node, where: str, file: str) -> None:
    """Refuse a dataset whose data lives in another file (external storage, virtual dataset). Only the
    creation property list is read: asking a virtual dataset for its shape can open its source files."""
    if not isinstance(node, h5py.Dataset):
        return
    hint = "copy the data into this file, or set data.allow_external_storage: true if you trust its sources"
    if node.external:
        files = sorted({name for name, _, _ in node.external})
        raise DataError(f"{file}: {where} uses external storage (raw data in {', '.join(map(str, files))}); {hint}")
    if node.is_virtual:
        files = sorted({source.file_name for source in node.virtual_sources()})
        raise DataError(f"{file}: {where} is a virtual dataset (data mapped from {', '.join(files)}); {hint}")


class _Lookup:
    """One path looked up link by link from the root of `f`.

    Unless `allow_external`, nothing is dereferenced that HDF5 could follow out of the file: soft links are
    resolved here (absolute targets from the root, relative ones from the link's group), and an external
    link, external storage or a virtual dataset met at any step is refused before anything opens it, so
    the other file is never opened (a dead mount or a FIFO would block that open forever). With
    `allow_external` HDF5 follows the links itself. `create_groups` creates missing groups (writers).
    """

    def __init__(self, f: h5py.File, *, allow_external: bool, external_hint: str, create_groups: bool):
        self.f = f
        self.allow_external = allow_external
        self.external_hint = external_hint
        self.create_groups = create_groups
        # The soft links whose targets are being resolved, outermost first: (name as its level spells it,
        # its own path in the file).
        self.following: list[tuple[str, str]] = []
        self.hops = 0

    def where(self, spelled: str, real: str) -> str:
        """The chain of names that led to `real`, e.g. '/train/labels' -> '/alias' -> '/shared/labels'."""
        names = [name for name, _ in self.following] + [spelled] + ([real] if real != spelled else [])
        return " -> ".join(f"'{name}'" for name in names)

    def walk(self, node, node_path: str, node_setting: str, steps: list[tuple[str, str]]):
        """(object, its path) after `steps` [(link name, config setting to fix it)] from `node`; the path
        is the object's own name in this file unless HDF5 followed the links."""
        file, spelled = self.f.filename, node_path
        for part, setting in steps:
            if part == ".":  # HDF5 reads "." in a path as the current group
                continue
            here, spelled = _join(node_path, part), _join(spelled, part)
            if not isinstance(node, h5py.Group):  # the previous step named a dataset where a group belongs
                raise DataError(f"{file}: '{node_path}' is a dataset, not a group, so {self.where(spelled, here)} "
                                f"cannot exist; check {node_setting}")
            link = node.get(part, getlink=True)
            if link is None and self.create_groups:
                node, node_path, node_setting = node.create_group(part), here, setting
                continue
            if link is None:
                names = ", ".join(sorted(node.keys())) or "nothing"
                raise DataError(f"{file}: {self.where(spelled, here)} does not exist ({setting}); '{node_path}' "
                                f"contains: {names}")
            if isinstance(link, h5py.SoftLink) and not self.allow_external:
                node, node_path = self.follow(node, node_path, (spelled, here), link.path, setting)
            elif isinstance(link, h5py.ExternalLink) and not self.allow_external:
                raise DataError(f"{file}: {self.where(spelled, here)} is an external link to "
                                f"{link.filename}:{link.path}; {self.external_hint}")
            else:
                try:
                    node = node[part]
                except (KeyError, OSError, RuntimeError) as exc:  # RuntimeError: more links than HDF5 follows
                    raise DataError(f"{file}: {self.where(spelled, here)} is a broken link ({exc}); fix or "
                                    "remove the link") from exc
                node_path = here
            node_setting = setting
            if not self.allow_external:
                _check_in_file(node, self.where(spelled, node_path), file)
        return node, node_path

    def follow(self, group: h5py.Group, group_path: str, link: tuple[str, str], target: str, setting: str):
        """Resolve the soft link `link` (spelled, real path) in `group` to `target`."""
        if link[1] in (real for _, real in self.following):
            raise DataError(f"{self.f.filename}: soft link cycle {self.where(*link)}; fix the links ({setting})")
        if self.hops == MAX_SOFT_LINKS:
            raise DataError(f"{self.f.filename}: {self.where(*link)}: more than {MAX_SOFT_LINKS} soft links to "
                            f"follow; link to the data directly ({setting})")
        self.hops += 1
        self.following.append(link)
        start = (self.f, "/") if target.startswith("/") else (group, group_path)
        resolved = self.walk(*start, setting, [(part, setting) for part in target.split("/") if part])
        self.following.pop()
        return resolved


def resolve_path(f: h5py.File, steps: list[tuple[str, str]], *, allow_external: bool,
                 external_hint: str = EXTERNAL_HINT, create_groups: bool = False):
    """(object, path) for the path `steps` = [(name, config setting), ...] from the root of `f`, naming the
    first missing, broken or (unless `allow_external`) external step, the link chain and the setting to
    fix. Unless `allow_external` the path returned is the object's own name in this file (no links)."""
    lookup = _Lookup(f, allow_external=allow_external, external_hint=external_hint, create_groups=create_groups)
    return lookup.walk(f, "/", "", steps)


def _dataset_at(f: h5py.File, steps: list[tuple[str, str]], allow_external: bool) -> tuple[h5py.Dataset, str]:
    node, node_path = resolve_path(f, steps, allow_external=allow_external)
    if not isinstance(node, h5py.Dataset):
        raise DataError(f"{f.filename}: '{node_path}' is a group, not a dataset; check {steps[-1][1]}")
    return node, node_path


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


def _chunking(node: h5py.Dataset) -> tuple[int, bool]:
    return (int(node.chunks[0]) if node.chunks else 0), node.id.get_create_plist().get_nfilters() > 0


def _field(node: h5py.Dataset, where: str, *, name: str, key: str, setting: str, image: bool,
           layout: str) -> FieldInfo:
    """Describe one field's dataset `node` (at `where` in the file), refusing what cannot be a batch field."""
    path = node.file.filename
    if node.ndim == 0:
        raise DataError(f"{path}: '{node.name}' ({setting}) is a scalar; a field needs one row per sample")
    if node.dtype.kind not in "biuf":
        raise DataError(f"{path}: '{node.name}' ({setting}) has dtype {node.dtype}, which cannot become a tensor; "
                        "store numbers (bool, integer or float)")
    row_shape = tuple(int(s) for s in node.shape[1:])
    field_layout = None
    if image:
        if node.ndim not in (3, 4):
            raise DataError(f"{path}: '{node.name}' has shape {node.shape}; expected images as N x C x H x W, "
                            f"N x H x W x C or N x H x W ({setting} is an image field, data.image_fields)")
        if node.dtype != np.uint8 and node.dtype.kind != "f":
            raise DataError(f"{path}: '{node.name}' has dtype {node.dtype}; expected uint8 (0..255) or float "
                            "(already scaled to 0..1) for an image field; convert the images")
        field_layout = _declared_layout(node, layout, path)
    elif node.dtype.kind in "biu" and all(s == 1 for s in row_shape):
        row_shape = ()  # e.g. PatchCamelyon's labels, N x 1 x 1 x 1: one value per sample
    chunk_rows, compressed = _chunking(node)
    return FieldInfo(name=name, key=key, setting=setting, path=where, row_shape=row_shape,
                     dtype=node.dtype.newbyteorder("=").str,  # readers convert big-endian files to native order
                     chunk_rows=chunk_rows, compressed=compressed, layout=field_layout)


def _token_field(node: h5py.Dataset, where: str, key: str, context_length: int) -> tuple[FieldInfo, int]:
    path = node.file.filename
    if node.ndim != 1 or node.dtype.kind not in "iu":
        raise DataError(f"{path}: '{node.name}' (data.tokens) has shape {node.shape} and dtype {node.dtype}; "
                        "expected a 1-D integer array of token ids (write it with ddp_kit.data.write_tokens)")
    window = context_length + 1
    windows = node.shape[0] // window
    if windows == 0:
        raise DataError(f"{path}: '{node.name}' holds {node.shape[0]} tokens, fewer than one window of "
                        f"data.context_length + 1 = {window}; lower data.context_length or add tokens")
    chunk_tokens, compressed = _chunking(node)
    info = FieldInfo(name="tokens", key=key, setting="data.tokens", path=where, row_shape=(window,),
                     dtype=node.dtype.newbyteorder("=").str, chunk_rows=max(1, chunk_tokens // window) if
                     chunk_tokens else 0, compressed=compressed, window=window)
    return info, windows


def describe_split(path: str | os.PathLike, *, group: str = "", fields: Optional[Mapping[str, str]] = None,
                   image_fields: Optional[Sequence[str]] = None, tokens: Optional[str] = None,
                   context_length: int = 0, layout: str = "auto", allow_external: bool = False,
                   group_setting: str = "data.train_group") -> SplitInfo:
    """Validate one split from metadata only and describe it: `fields` {name: dataset key} (default
    {image: images, label: labels}) with `image_fields` the images (default: the field "image"), or the token
    stream `tokens` cut into windows of `context_length` + 1. Raises DataError naming file and key."""
    path = str(path)
    group_parts = [p for p in group.split("/") if p]
    keys = {"tokens": tokens} if tokens is not None else dict(fields if fields is not None else DEFAULT_FIELDS)
    images = set(image_fields if image_fields is not None else ["image"] if "image" in keys else [])
    with open_existing(path, "/" + "/".join([*group_parts, next(iter(keys.values()))])) as f:
        described, lengths = [], {}
        for name, key in keys.items():
            setting = "data.tokens" if tokens is not None else f"data.fields.{name}"
            steps = [(part, group_setting) for part in group_parts] + [(part, setting) for part in key.split("/")
                                                                       if part]
            node, where = _dataset_at(f, steps, allow_external)
            if tokens is not None:
                info, lengths[node.name] = _token_field(node, where, key, context_length)
            else:
                info = _field(node, where, name=name, key=key, setting=setting, image=name in images, layout=layout)
                lengths[node.name] = int(node.shape[0])
            described.append(info)
        if len(set(lengths.values())) > 1:
            listed = ", ".join(f"'{name}' has {n} rows" for name, n in lengths.items())
            raise DataError(f"{path}: the fields have different lengths: {listed}; every field needs one row per "
                            "sample (data.fields)")
        length = next(iter(lengths.values()))
        if length == 0:
            raise DataError(f"{path}: {', '.join(map(repr, lengths))} empty; the split needs at least one sample")
        return SplitInfo(path=path, group=group, allow_external=allow_external, length=length,
                         fields=tuple(described))


def config_splits(cfg: DataConfig) -> tuple[SplitInfo, SplitInfo]:
    """The validated train and validation splits that `cfg` points at."""
    if cfg.path is None:
        raise DataError("data.path is null and no datasets were given: set data.path to an HDF5 file, or pass "
                        "datasets=(train, val) to ddp_kit.train")
    common = dict(fields=None if cfg.tokens else field_keys(cfg), tokens=cfg.tokens,
                  context_length=cfg.context_length, layout=cfg.layout, allow_external=cfg.allow_external_storage)
    common["image_fields"] = None if cfg.tokens else image_fields(cfg, common["fields"])
    train = describe_split(cfg.path, group=cfg.train_group, group_setting="data.train_group", **common)
    val = describe_split(cfg.val_path or cfg.path, group=cfg.val_group, group_setting="data.val_group", **common)
    return train, val
