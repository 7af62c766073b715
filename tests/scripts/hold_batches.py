"""Iterate a 2-worker training loader (worker_sharing_strategy: file_system) over FILE.h5, keep the first 6
batches alive, print "holding" and then sleep until killed. Usage: hold_batches.py FILE.h5"""

import sys
import time

import torch

from ddp_kit.config import DataConfig
from ddp_kit.data import build_dataloaders

cfg = DataConfig(path=sys.argv[1], num_workers=2, multiprocessing_context="fork", worker_sharing_strategy="file_system")
loaders = build_dataloaders(cfg, batch_size=8, val_batch_size=8, rank=0, world_size=1, seed=0,
                            device=torch.device("cpu"), class_counts={"label": 10}, image_channels=3)
held = [batch for batch, _ in zip(loaders.train, range(6))]
print("holding", flush=True)
time.sleep(600)
