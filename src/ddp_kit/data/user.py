"""A user's map-style datasets (`ddp_kit.train(cfg, datasets=(train, val))`) as batched datasets.

Each item `dataset[i]` is a dict {field name: tensor, NumPy array or number}, the same fields, row shapes and
dtypes for every i, in both datasets. Image fields (data.image_fields, default the field named "image") are
C x H x W, uint8 (0..255) or float (0..1); they become float, augmented and normalized on the device, like an
HDF5 file's. The row id of an item is its index i: the ledger records it, and the training order (the same
distributed, resumable batch samplers as for HDF5) is an order of indices, so a mid-epoch resume continues
exactly. `UserDataset` fetches a batch's items one by one (in a DataLoader worker) into one shared buffer.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ddp_kit.config import DataConfig
from ddp_kit.data.dataset import Batch, batch_buffers
from ddp_kit.data.errors import DataError
from ddp_kit.data.fields import image_fields


def _tensor(value: Any, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{where} is a {type(value).__name__}, which cannot become a tensor; return tensors, NumPy "
                        "arrays or numbers") from exc


class UserDataset(Dataset):
    """`dataset` (a user's map-style dataset) read a batch per call: `(fields, row ids)`, like H5Dataset."""

    def __init__(self, dataset: Dataset, name: str, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                 class_counts: Mapping[str, int]):
        self.dataset = dataset
        self.name = name
        self.specs = dict(specs)
        self.class_counts = dict(class_counts)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def field_shapes(self) -> dict[str, tuple[int, ...]]:
        return {field: shape for field, (shape, _) in self.specs.items()}

    def item(self, row: int) -> dict[str, torch.Tensor]:
        """Item `row` as tensors, checked against the fields of item 0."""
        item = self.dataset[row]
        if not isinstance(item, Mapping):
            raise DataError(f"{self.name}[{row}] is a {type(item).__name__}; items must be dicts of fields, e.g. "
                            "{'image': tensor, 'label': 3}")
        if set(item) != set(self.specs):
            raise DataError(f"{self.name}[{row}] has the fields {sorted(item)}, item 0 of the training dataset has "
                            f"{sorted(self.specs)}; every item needs the same fields")
        values = {}
        for field, (shape, dtype) in self.specs.items():
            value = _tensor(item[field], f"{self.name}[{row}][{field!r}]")
            if tuple(value.shape) != shape or value.dtype != dtype:
                raise DataError(f"{self.name}[{row}][{field!r}] has shape {tuple(value.shape)} and dtype {value.dtype}; "
                                f"item 0 of the training dataset has {shape}, {dtype}: every item needs the same")
            values[field] = value
        return values

    def __getitem__(self, rows) -> Batch:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        fields, ids = batch_buffers(len(rows), self.specs)
        ids.numpy()[:] = rows
        for position, row in enumerate(rows.tolist()):
            for field, value in self.item(row).items():
                fields[field][position] = value
        for field, num_classes in self.class_counts.items():
            values = fields[field]
            outside = (values < 0) | (values >= num_classes)
            if outside.any():
                bad = int(outside.reshape(len(rows), -1).any(dim=1).nonzero()[0])
                raise DataError(f"{self.name}[{int(rows[bad])}][{field!r}] holds {values[bad][outside[bad]][0].item()}, "
                                f"outside the {num_classes} classes of field {field!r} (for built-in classification, "
                                "model.num_classes); class indices must be in [0, num_classes)")
        return fields, ids


def user_datasets(datasets: Any, cfg: DataConfig, *, class_counts: Optional[Mapping[str, int]],
                  image_channels: Optional[int]) -> tuple[UserDataset, UserDataset]:
    """The user's (train, val) datasets as batched `UserDataset`s, their fields described by item 0 of the
    training dataset and checked against item 0 of the validation dataset; DataError for anything unusable."""
    if not (isinstance(datasets, (tuple, list)) and len(datasets) == 2):
        raise DataError(f"datasets= must be a pair (train, val) of map-style datasets, got {type(datasets).__name__}")
    named = []
    for role, dataset in zip(("train", "val"), datasets):
        name = f"the {role} dataset ({type(dataset).__name__})"
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise DataError(f"{name} is not a map-style dataset: it needs __len__ and __getitem__ (an iterable "
                            "dataset cannot be sharded and resumed exactly)")
        if len(dataset) == 0:
            raise DataError(f"{name} is empty; it needs at least one item")
        named.append(name)
    first = datasets[0][0]
    if not isinstance(first, Mapping) or not first:
        raise DataError(f"{named[0]}[0] is a {type(first).__name__}; items must be non-empty dicts of fields, e.g. "
                        "{'image': tensor, 'label': 3}")
    specs = {}
    for field, value in first.items():
        value = _tensor(value, f"{named[0]}[0][{field!r}]")
        specs[str(field)] = (tuple(value.shape), value.dtype)
    for field in image_fields(cfg, specs):
        shape, dtype = specs[field]
        if len(shape) != 3 or not (dtype == torch.uint8 or dtype.is_floating_point):
            raise DataError(f"{named[0]}[0][{field!r}] has shape {shape} and dtype {dtype}; an image field "
                            "(data.image_fields) must be C x H x W, uint8 (0..255) or float (0..1)")
        if image_channels is not None and shape[0] != image_channels:
            raise DataError(f"{named[0]}[0][{field!r}] has {shape[0]} channel(s) (shape {shape}) but "
                            f"model.in_channels is {image_channels}; fix model.in_channels or the dataset")
    for field in class_counts or {}:
        if field not in specs:
            raise DataError(f"{named[0]} has no field {field!r} to hold class indices; its fields are {sorted(specs)}")
        if specs[field][1].is_floating_point or specs[field][1] == torch.bool:
            raise DataError(f"{named[0]}[0][{field!r}] is {specs[field][1]}; class indices must be integers")
    train, val = (UserDataset(dataset, name, specs, class_counts or {}) for dataset, name in zip(datasets, named))
    val.item(0)  # the validation items must have the training items' fields
    return train, val
