"""Converters from common sources to the HDF5 layout of `writer.py`.

Every converter stores rows in a seeded random order: chunk shuffling mixes rows only within a window of
blocks, so a file sorted by class (as an image folder is) would give batches of only a few classes.
All of them write atomically: an interrupted conversion leaves no output file behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ddp_kit.data.errors import DataError
from ddp_kit.data.writer import SplitWriter, atomic_h5, write_field_arrays, write_split


def write_digits(out: str | os.PathLike, *, size: int = 32, val_fraction: float = 0.2, seed: int = 0,
                 compression: Optional[str] = None) -> None:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes) as `size` x `size` uint8 single-channel
    images, bilinearly upsampled from the 0..16 values scaled to 0..255, split stratified and seeded into
    groups train/ and val/ (`val_fraction` of each class in val/)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise DataError(f"{out}: building the digits demo data needs scikit-learn (pip install scikit-learn)") \
            from exc
    digits = load_digits()
    scaled = torch.from_numpy(digits.images).float().unsqueeze(1) * (255 / 16)
    upsampled = F.interpolate(scaled, size=(size, size), mode="bilinear", align_corners=False)
    images = upsampled.round().clamp(0, 255).to(torch.uint8).numpy()
    labels = digits.target.astype(np.int64)
    train, val = train_test_split(np.arange(len(labels)), test_size=val_fraction, stratify=labels,
                                  random_state=seed)
    names = [str(name) for name in digits.target_names]
    attrs = {"source": "sklearn.datasets.load_digits, upsampled bilinearly from 8x8"}
    with atomic_h5(out) as f:
        for group, rows in (("train", train), ("val", val)):
            write_split(f, images[rows], labels[rows], group=group, compression=compression, class_names=names,
                        attrs=attrs)


def convert_imagefolder(root: str | os.PathLike, out: str | os.PathLike, *, size: int = 224,
                        group: str = "train", append_group: bool = False, batch_size: int = 64,
                        num_workers: int = 2, seed: int = 0, chunk_rows: Optional[int] = None,
                        compression: Optional[str] = None, progress: bool = True) -> None:
    """A torchvision ImageFolder tree (ROOT/<class>/<image>) as 3 x `size` x `size` uint8 images (shorter
    side resized to `size`, then center-cropped), streamed in batches: memory use does not grow with the
    dataset, so trees larger than RAM convert."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    transform = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    try:
        folder = ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"{root}: not an image folder tree ROOT/<class>/<image> ({exc})") from exc
    order = np.random.default_rng(seed).permutation(len(folder)).tolist()
    batches = DataLoader(Subset(folder, order), batch_size=batch_size, num_workers=num_workers)
    with atomic_h5(out, append=append_group, needed_bytes=len(folder) * 3 * size * size) as f:
        writer = SplitWriter(f, group, length=len(folder), row_shape=(3, size, size), dtype=np.uint8,
                             chunk_rows=chunk_rows, compression=compression)
        with tqdm(total=len(folder), unit="img", desc=f"{Path(root).name} -> {out}", disable=not progress) as bar:
            for images, labels in batches:
                writer.write(images.numpy(), labels.numpy())
                bar.update(len(images))
        writer.finish(class_names=folder.classes, attrs={"source": str(root)})


def guess_layout(images: np.ndarray) -> str:
    """NHWC when the last axis looks like channels (1, 3 or 4) and the second does not, else NCHW."""
    channel_sizes = (1, 3, 4)
    if images.ndim == 4 and images.shape[3] in channel_sizes and images.shape[1] not in channel_sizes:
        return "NHWC"
    return "NCHW"


def convert_npz(src: str | os.PathLike, out: str | os.PathLike, *,
                splits: Optional[Mapping[str, tuple[str, str]]] = None, layout: str = "auto",
                shuffle_seed: Optional[int] = 0, chunk_rows: Optional[int] = None,
                compression: Optional[str] = None) -> None:
    """Arrays from a NumPy .npz archive: `splits` maps each output group to its (images key, labels key),
    by default {"train": ("images", "labels")}. layout: NCHW, NHWC or auto (`guess_layout`); labels of
    shape N x 1 are flattened. Rows are stored in a random order seeded by `shuffle_seed` (None keeps the
    archive's order)."""
    splits = splits or {"train": ("images", "labels")}
    try:
        archive = np.load(src, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{src}: cannot be read as a NumPy .npz archive ({exc})") from exc
    with archive, atomic_h5(out) as f:
        for group, keys in splits.items():
            for key in keys:
                if key not in archive.files:
                    raise DataError(f"{src}: no array '{key}' for split '{group}'; the archive has: "
                                    f"{', '.join(archive.files)}")
            images, labels = archive[keys[0]], archive[keys[1]]
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if len(images) != len(labels):
                raise DataError(f"{src}: '{keys[0]}' has {len(images)} rows but '{keys[1]}' has {len(labels)}; "
                                "every image needs exactly one label")
            if shuffle_seed is not None:
                order = np.random.default_rng(shuffle_seed).permutation(len(images))
                images, labels = images[order], labels[order]
            write_split(f, images, labels, group=group, layout=guess_layout(images) if layout == "auto" else layout,
                        chunk_rows=chunk_rows, compression=compression, attrs={"source": f"{src}:{keys[0]}"})


def convert_npz_fields(src: str | os.PathLike, out: str | os.PathLike, *, fields: Optional[Mapping[str, str]] = None,
                       group: str = "train", append_group: bool = False, shuffle_seed: Optional[int] = 0,
                       chunk_rows: Optional[int] = None, compression: Optional[str] = None) -> None:
    """Any named arrays of a NumPy .npz archive as the fields of one split: `fields` maps each dataset name
    to write to its archive key (None: every array under its own name); read them back with data.fields.
    Rows are stored in one random order for all arrays, seeded by `shuffle_seed` (None keeps the archive's)."""
    try:
        archive = np.load(src, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{src}: cannot be read as a NumPy .npz archive ({exc})") from exc
    with archive:
        fields = dict(fields) if fields is not None else {key: key for key in archive.files}
        missing = [key for key in fields.values() if key not in archive.files]
        if missing:
            raise DataError(f"{src}: no array {', '.join(map(repr, missing))}; the archive has: "
                            f"{', '.join(archive.files)}")
        arrays = {name: archive[key] for name, key in fields.items()}
    lengths = {name: len(array) if array.ndim else 0 for name, array in arrays.items()}
    if shuffle_seed is not None and len(set(lengths.values())) == 1:
        order = np.random.default_rng(shuffle_seed).permutation(next(iter(lengths.values())))
        arrays = {name: array[order] for name, array in arrays.items()}
    with atomic_h5(out, append=append_group, needed_bytes=sum(a.nbytes for a in arrays.values())) as f:
        write_field_arrays(f, arrays, group=group, chunk_rows=chunk_rows, compression=compression,
                           attrs={"source": str(src)})
