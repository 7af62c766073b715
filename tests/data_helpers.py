"""Small HDF5 files with known contents for the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ddp_kit.config import DataConfig
from ddp_kit.data import DataError, Loaders, build_dataloaders, prepare_data, write_h5


def make_arrays(n: int, shape=(3, 4, 5), num_classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images whose first pixel encodes the row (so a wrong row is easy to spot) and random labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    images.reshape(n, -1)[:, 0] = np.arange(n) % 256
    return images, rng.integers(0, num_classes, size=n).astype(np.int64)


def make_file(path: Path, n: int = 100, *, groups=("train", "val"), shape=(3, 4, 5), chunk_rows: int = 7,
              compression=None, layout: str = "NCHW") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A file with one split per group (each of n rows, different contents); returns the arrays written."""
    arrays = {}
    for i, group in enumerate(groups):
        images, labels = make_arrays(n, shape, seed=i)
        write_h5(path, images, labels, group=group, layout=layout, chunk_rows=chunk_rows, compression=compression,
                 append_group=i > 0)
        arrays[group] = (images, labels)
    return arrays


def data_config(path: Path, **overrides) -> DataConfig:
    """Config for tests: no workers unless asked, so most tests stay in one process."""
    return DataConfig(path=str(path), **{"num_workers": 0, **overrides})


def loaders(cfg: DataConfig, *, rank: int = 0, world_size: int = 1, batch_size: int = 8, val_batch_size: int = 16,
            seed: int = 0, num_classes: int | None = 10, in_channels: int | None = 3, stats_rows: int | None = None,
            class_counts: dict | None = None, **kwargs) -> Loaders:
    """build_dataloaders on the CPU, by default for the 3-channel, 10-class files above (class_counts
    {"label": num_classes} unless given); `kwargs` go to build_dataloaders (e.g. datasets=)."""
    if class_counts is None and num_classes is not None:
        class_counts = {"label": num_classes}
    return build_dataloaders(cfg, batch_size=batch_size, val_batch_size=val_batch_size, rank=rank,
                             world_size=world_size, seed=seed, device=torch.device("cpu"), class_counts=class_counts,
                             image_channels=in_channels, stats_rows=stats_rows, **kwargs)


def triples(batches):
    """(images, labels, row ids) of each (fields, row ids) batch of the classification files above."""
    for fields, rows in batches:
        yield fields["image"], fields["label"], rows


def refused(cfg: DataConfig, *fragments: str, only_when_loading: bool = False, **loader_kwargs) -> str:
    """Both entry points refuse `cfg` with a DataError whose message contains every fragment (file, key,
    remedy): `prepare_data`, which every process runs before training, and `build_dataloaders` (`loaders`,
    with `loader_kwargs`). With `only_when_loading`, a refusal that needs the model's settings: prepare_data
    must accept the data and build_dataloaders refuse it. Returns build_dataloaders' message."""
    if only_when_loading:
        prepare_data(cfg)
    else:
        with pytest.raises(DataError) as error:
            prepare_data(cfg)
        _contains(error.value, fragments)
    with pytest.raises(DataError) as error:
        loaders(cfg, **loader_kwargs)
    _contains(error.value, fragments)
    return str(error.value)


def _contains(error: Exception, fragments: tuple[str, ...]) -> None:
    for fragment in fragments:
        assert fragment in str(error), f"{fragment!r} not in: {error}"
