"""Data pipeline: validated HDF5 files (any named fields, or a token stream) or a user's map-style datasets,
DDP-aware batch samplers, batched readers, torchvision transforms per image in the workers, device-side
augmentation.

The training loop needs only:
    prepare_data(cfg)          every process, before the process group: create the demo file, validate
    build_dataloaders(cfg,...) this rank's Loaders (DataLoaders yielding batches (fields: dict, row_ids))
    start_workers(*loaders)    fork the loaders' persistent workers before the process starts other threads
    train_batches_per_epoch(cfg, ...) how many training batches each rank gets per epoch, without loaders
    prepare_batch(batch, device, cfg, train=..., batch_transform=loaders.batch_transform,
                  augment_seed=draw_seed(seed, epoch, micro, rank))   -> (fields on the device, row ids)
Converters, inspection and `register_cli` back the `ddp-kit data ...` commands. See docs/data.md.
"""

from ddp_kit.data.cli import register_cli
from ddp_kit.data.convert import convert_imagefolder, convert_npz, convert_npz_fields, write_digits
from ddp_kit.data.dataset import H5Dataset
from ddp_kit.data.device import prepare_batch, prepare_images
from ddp_kit.data.errors import DataError
from ddp_kit.data.hdf5 import FieldInfo, SplitInfo, describe_split
from ddp_kit.data.inspection import inspect_h5
from ddp_kit.data.loader import Loaders, build_dataloaders, start_workers, train_batches_per_epoch
from ddp_kit.data.prepare import create_once, prepare_data
from ddp_kit.data.sampler import ShardBatchSampler, TrainBatchSampler
from ddp_kit.data.seeding import draw_seed, seeded
from ddp_kit.data.user import UserDataset
from ddp_kit.data.writer import write_fields, write_h5, write_tokens

__all__ = [
    "DataError",
    "FieldInfo",
    "H5Dataset",
    "Loaders",
    "ShardBatchSampler",
    "SplitInfo",
    "TrainBatchSampler",
    "UserDataset",
    "build_dataloaders",
    "convert_imagefolder",
    "create_once",
    "convert_npz",
    "convert_npz_fields",
    "describe_split",
    "draw_seed",
    "inspect_h5",
    "prepare_batch",
    "prepare_images",
    "prepare_data",
    "register_cli",
    "seeded",
    "start_workers",
    "train_batches_per_epoch",
    "write_digits",
    "write_fields",
    "write_h5",
    "write_tokens",
]
