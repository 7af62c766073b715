"""Train under torchrun with a DDP communication hook that counts gradient all-reduces, and write per-rank
counts (bucket all-reduces, the buckets of each synchronized backward, training forwards) to <run_dir>/allreduce_rank<R>.json. Usage: count_allreduce.py CONFIG [overrides...]"""

import importlib
import json
import os
import sys

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ddp_kit.config import load_config

# the module, not ddp_kit.train the function that the package exports under the same name
train_module = importlib.import_module("ddp_kit.train")

counts = {"allreduces": 0, "forwards": 0, "buckets_per_reduction": []}
pending = [0]


class CountingDDP(DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_comm_hook(None, self._counting_allreduce)
        self.module.register_forward_hook(self._count_training_forward)

    @staticmethod
    def _count_training_forward(module, inputs, output):
        counts["forwards"] += int(module.training)  # evaluation forwards are not micro-steps

    @staticmethod
    def _counting_allreduce(state, bucket):
        counts["allreduces"] += 1
        pending[0] += 1
        if bucket.is_last():  # one per backward that synchronizes
            counts["buckets_per_reduction"].append(pending[0])
            pending[0] = 0
        work = dist.all_reduce(bucket.buffer().div_(dist.get_world_size()), async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])


train_module.DDP = CountingDDP
cfg = load_config(sys.argv[1], sys.argv[2:])
result = train_module.train(cfg)
(cfg.run_dir / f"allreduce_rank{os.environ.get('RANK', '0')}.json").write_text(
    json.dumps({**counts, "steps": result["step"]}))
