"""A user's own train.py: ddp_kit.train with a model factory and an objective object, no YAML model section.
Usage: user_train.py CONFIG [overrides...]; writes <run_dir>/result.json (train's return, how many DDP
wrappers outlived it without a garbage collection, and the most descriptors of the data file the trainer held
during a training forward, when its loader workers have forked) on rank 0."""

import gc
import json
import os
import sys

import torch

import ddp_kit
from user_code import TwoHeads, margin

cfg = ddp_kit.load_config(sys.argv[1], sys.argv[2:])
data_file = os.path.realpath(cfg.data.path)
handles = []


def descriptors_of_the_data_file() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == data_file
        except OSError:  # the directory's own descriptor, closed by now
            continue
    return count


class Watched(TwoHeads):
    def forward(self, *inputs):
        if self.training:
            handles.append(descriptors_of_the_data_file())
        return super().forward(*inputs)


gc.disable()  # what outlives train() in a reference cycle stays until a collection: here, until exit
result = ddp_kit.train(cfg, model=lambda: Watched(pixels=64, classes=4), objective=margin)
result["ddp_alive"] = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
result["data_file_descriptors"] = max(handles)
if os.environ.get("RANK", "0") == "0":
    (cfg.run_dir / "result.json").write_text(json.dumps(result))
