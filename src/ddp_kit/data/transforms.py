"""torchvision `transforms.v2` from the config: per sample in the loader workers, per batch on the device.

    data:
      sample_transforms:            # each training image, its own random parameters, in the stored dtype
        - RandomResizedCrop: {size: 32, scale: [0.6, 1.0], antialias: true}
        - RandomHorizontalFlip: {}
      batch_transforms:             # the whole float batch on the device, one draw of parameters per batch
        - ColorJitter: {brightness: 0.2}

Each entry is one transform, `{ClassName: {arguments}}`, a class of `torchvision.transforms.v2`. Both
lists are built and tried on real training images by `build_dataloaders`, so a wrong name, argument or
output shape fails before training starts, naming the config key.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ddp_kit.config import did_you_mean
from ddp_kit.data.dataset import Batch, batch_buffers
from ddp_kit.data.errors import DataError
from ddp_kit.data.seeding import draw_seed, seeded

Transform = Callable[[torch.Tensor], torch.Tensor]


class EpochBatches:
    """A training batch sampler whose batches are passed on as (epoch, rows), so that a dataset in a
    persistent worker, which never sees `set_epoch`, knows which epoch each batch belongs to."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, rows) for rows in self.sampler)


def build_transform(specs: list[dict], key: str) -> Optional[Transform]:
    """A `v2.Compose` of the config entries under `key` (e.g. "data.sample_transforms"); None if empty."""
    if not specs:
        return None
    from torchvision.transforms import v2

    available = {name: obj for name, obj in vars(v2).items()
                 if isinstance(obj, type) and issubclass(obj, v2.Transform) and not name.startswith("_")}
    steps = []
    for position, spec in enumerate(specs):
        where = f"{key}[{position}]"
        if len(spec) != 1:
            raise DataError(f"{where}: expected one transform written as {{ClassName: {{arguments}}}}, e.g. "
                            f"{{RandomHorizontalFlip: {{p: 0.5}}}}; got {spec!r}")
        (name, arguments), = spec.items()
        if name not in available:
            raise DataError(f"{where}: {name!r} is not a torchvision.transforms.v2 transform; "
                            f"{did_you_mean(str(name), list(available))}see "
                            "https://pytorch.org/vision/stable/transforms.html")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise DataError(f"{where}: the arguments of {name} must be a mapping of keyword arguments, got "
                            f"{arguments!r}")
        try:
            steps.append(available[name](**arguments))
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: {name}(**{arguments!r}) failed: {exc}") from exc
    return v2.Compose(steps)


def check_transform(transform: Transform, images: torch.Tensor, *, key: str, source: str) -> torch.Tensor:
    """Run `transform` on `images` (one C x H x W image, or an N x C x H x W batch) and return the result,
    which must be a tensor of the same shape: the model and the validation images keep the stored size."""
    try:
        result = transform(images)
    except Exception as exc:  # any failure inside torchvision is a configuration error here
        raise DataError(f"{key}: failed on {source} (shape {tuple(images.shape)}, {images.dtype}): "
                        f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(result, torch.Tensor) or result.shape != images.shape:
        got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
        raise DataError(f"{key}: turns {source} of shape {tuple(images.shape)} into {got}; the transforms must "
                        "return tensors of the stored size (validation images are not transformed): use e.g. "
                        "RandomResizedCrop with size = the stored height and width, and no PIL conversions")
    return result


class SampleTransformDataset(Dataset):
    """Another batched dataset's batches with `transform` applied to each row of the image field `image` on
    its own, in the process that reads (a DataLoader worker). Indexed by (epoch, rows) (`EpochBatches`): each
    image draws its random parameters from generators seeded by (seed, epoch, row id), the same in any worker
    and after a resume. The other fields pass through unchanged."""

    def __init__(self, dataset: Dataset, transform: Transform, seed: int, image: str):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.image = image

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: tuple[int, np.ndarray]) -> Batch:
        epoch, rows = index
        fields, ids = self.dataset[rows]
        transformed = []
        for image, row in zip(fields[self.image], ids.tolist()):
            with seeded(draw_seed(self.seed, epoch, row), torch_only=True):
                transformed.append(self.transform(image))
        first = transformed[0]
        specs = {name: (tuple(t.shape[1:]), t.dtype) for name, t in fields.items()}
        specs[self.image] = (tuple(first.shape), first.dtype)
        out, out_ids = batch_buffers(len(transformed), specs)
        try:
            torch.stack(transformed, out=out[self.image])
        except RuntimeError as exc:
            shapes = sorted({(tuple(t.shape), str(t.dtype)) for t in transformed})
            raise DataError(f"data.sample_transforms returned images of different shapes or dtypes in one batch "
                            f"({shapes}); every image must come out at the stored size") from exc
        for name, values in fields.items():
            if name != self.image:
                out[name].copy_(values)
        out_ids.copy_(ids)
        return out, out_ids
