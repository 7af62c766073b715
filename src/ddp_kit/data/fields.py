"""Which fields a batch has and which of them are images, from DataConfig.

A batch is `(fields, rows)`: a dict of tensors with one row per sample, and the 1-D int64 row ids the ledger
and resume use. HDF5 splits name their fields in data.fields (default {image: images, label: labels}); a token
stream (data.tokens) yields windows as the fields `input` and `target`; a user's datasets yield their own.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ddp_kit.config import DataConfig

DEFAULT_FIELDS = {"image": "images", "label": "labels"}
TOKEN_FIELDS = ("input", "target")  # a window w of context_length + 1 tokens: w[:-1] and w[1:]


def field_keys(cfg: DataConfig) -> dict[str, str]:
    """{field name: HDF5 dataset key in the split's group} of an HDF5 split (not a token stream)."""
    return dict(cfg.fields) if cfg.fields is not None else dict(DEFAULT_FIELDS)


def image_fields(cfg: DataConfig, names: Iterable[str]) -> list[str]:
    """The fields among `names` that are images: data.image_fields, or the one named "image" if unset."""
    names = list(names)
    if cfg.image_fields is not None:
        return [name for name in cfg.image_fields if name in names]
    return ["image"] if "image" in names else []


def token_fields(windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch of N x (L + 1) token windows as the fields input and target (N x L views, no copy)."""
    return {TOKEN_FIELDS[0]: windows[:, :-1], TOKEN_FIELDS[1]: windows[:, 1:]}
