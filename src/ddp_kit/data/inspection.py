"""A readable summary of an HDF5 file: every group and dataset with shape, dtype, chunks, compression,
attributes, links that leave the file, and a label histogram for each labels dataset."""

from __future__ import annotations

import os

import h5py
import numpy as np

from ddp_kit.data.hdf5 import open_existing

MAX_ATTR_CHARS = 80


def _attrs(node) -> list[str]:
    lines = []
    for key, value in node.attrs.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
            value = [v.decode() if isinstance(v, bytes) else str(v) for v in value]
        text = str(value)
        lines.append(f"@{key} = {text if len(text) <= MAX_ATTR_CHARS else text[:MAX_ATTR_CHARS] + '...'}")
    return lines


def _storage(ds: h5py.Dataset) -> str:
    if ds.is_virtual:
        sources = sorted({s.file_name for s in ds.virtual_sources()})
        return f"virtual dataset, data mapped from {', '.join(sources)} (not followed)"
    if ds.external:
        return f"external storage in {', '.join(sorted({str(name) for name, _, _ in ds.external}))} (not followed)"
    if ds.chunks is None:
        return "contiguous"
    compression = "uncompressed" if ds.compression is None else f"{ds.compression}({ds.compression_opts})"
    return f"chunks {ds.chunks}, {compression}"


def _histogram(labels: h5py.Dataset) -> list[str]:
    values = labels[()]
    if len(values) == 0 or values.min() < 0:
        return ["label histogram: not shown (empty, or negative labels)"]
    counts = np.bincount(values)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in labels.attrs.get("class_names", [])]
    cells = [f"{c}{f' ({names[c]})' if c < len(names) else ''}: {n}" for c, n in enumerate(counts.tolist())]
    return [f"label histogram ({len(values)} labels, {np.count_nonzero(counts)} classes present):",
            *("  " + "  ".join(cells[i:i + 8]) for i in range(0, len(cells), 8))]


def _describe(group: h5py.Group, labels_key: str, depth: int, lines: list[str]) -> None:
    pad = "  " * depth
    for name in sorted(group.keys()):
        link = group.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            lines.append(f"{pad}{name} -> external link to {link.filename}:{link.path} (not followed)")
            continue
        if isinstance(link, h5py.SoftLink):
            lines.append(f"{pad}{name} -> soft link to {link.path}")
            continue
        node = group[name]
        if isinstance(node, h5py.Group):
            lines.append(f"{pad}{name}/")
            lines.extend(f"{pad}  {line}" for line in _attrs(node))
            _describe(node, labels_key, depth + 1, lines)
            continue
        if node.is_virtual:  # its shape can depend on the source files, which would have to be opened
            lines.append(f"{pad}{name}: {node.dtype}, {_storage(node)}")
            lines.extend(f"{pad}  {line}" for line in _attrs(node))
            continue
        lines.append(f"{pad}{name}: shape {node.shape}, {node.dtype}, {_storage(node)}")
        lines.extend(f"{pad}  {line}" for line in _attrs(node))
        if name == labels_key and node.ndim == 1 and node.dtype.kind in "iu" and not node.external:
            lines.extend(f"{pad}  {line}" for line in _histogram(node))


def inspect_h5(path: str | os.PathLike, *, labels_key: str = "labels") -> str:
    """The summary as text. Links are reported, never followed; external storage and virtual datasets are
    described from this file's metadata, so no other file is opened."""
    with open_existing(path, "/") as f:
        lines = [f"{path}: {os.path.getsize(path) / 2**20:.1f} MiB"]
        lines.extend(f"  {line}" for line in _attrs(f))
        _describe(f, labels_key, 1, lines)
    return "\n".join(lines)
