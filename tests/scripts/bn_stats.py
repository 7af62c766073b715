"""Recompute BatchNorm statistics of a seeded SmallCNN over a fixed uint8 dataset, each rank over its
contiguous shard, and save the running stats (rank 0). Usage: bn_stats.py OUT.pt [rows]
(rows: use only the first `rows` of the 64, e.g. 32 = what rank 0 of two holds)."""

import sys

import numpy as np
import torch

from ddp_kit import distributed
from ddp_kit.config import Config, DistributedConfig, ModelConfig
from ddp_kit.models import build_model
from ddp_kit.train import recompute_bn_statistics

out, rows, batch = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 64, 16
images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=(64, 1, 8, 8), dtype=np.uint8))[:rows]
cfg = Config(distributed=DistributedConfig(device="cpu"), model=ModelConfig(in_channels=1, num_classes=4))
with distributed.process_group(cfg.distributed) as rt:
    start, stop = rt.rank * rows // rt.world_size, (rt.rank + 1) * rows // rt.world_size
    shard = [(images[i:min(i + batch, stop)], torch.zeros(0), torch.zeros(0)) for i in range(start, stop, batch)]
    torch.manual_seed(0)
    model = build_model(cfg.model)
    recompute_bn_statistics(model, shard, rt, cfg)
    if rt.is_main:
        torch.save({k: v for k, v in model.state_dict().items() if "running" in k}, out)
