"""Recompute BatchNorm statistics of a seeded SmallCNN over a fixed uint8 dataset of ROWS rows, each rank over
its contiguous shard (uneven with 3 ranks: 33/33/34 rows), once per batch size, and save {batch size: running
statistics} (rank 0). Usage: bn_stats.py OUT.pt BATCH [BATCH ...]"""

import sys

import numpy as np
import torch

from ddp_kit import distributed
from ddp_kit.config import Config, DistributedConfig, ModelConfig
from ddp_kit.models import build_model
from ddp_kit.averaging import recompute_bn_statistics

ROWS = 100


def images() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=(ROWS, 1, 8, 8), dtype=np.uint8))


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(in_channels=1, num_classes=4))


if __name__ == "__main__":
    out, batches = sys.argv[1], [int(b) for b in sys.argv[2:]]
    cfg = Config(distributed=DistributedConfig(device="cpu"))
    data = images()
    results = {}
    with distributed.process_group(cfg.distributed) as rt:
        start, stop = rt.rank * ROWS // rt.world_size, (rt.rank + 1) * ROWS // rt.world_size
        for batch in batches:
            shard = [((data[i:min(i + batch, stop)].float() / 255 - 0.5) / 0.5,) for i in range(start, stop, batch)]
            net = model()
            recompute_bn_statistics(net, lambda: shard, rt)
            results[batch] = {k: v for k, v in net.state_dict().items() if "running" in k}
        if rt.is_main:
            torch.save(results, out)
