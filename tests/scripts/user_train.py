"""A user's own train.py: ddp_kit.train with a model factory and an objective object, no YAML model section.
Usage: user_train.py CONFIG [overrides...]; writes <run_dir>/result.json (train's return, and how many DDP
wrappers outlived it without a garbage collection) on rank 0."""

import gc
import json
import os
import sys

import torch

import ddp_kit
from user_code import TwoHeads, margin

cfg = ddp_kit.load_config(sys.argv[1], sys.argv[2:])
gc.disable()  # what outlives train() in a reference cycle stays until a collection: here, until exit
result = ddp_kit.train(cfg, model=lambda: TwoHeads(pixels=64, classes=4), objective=margin)
result["ddp_alive"] = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
if os.environ.get("RANK", "0") == "0":
    (cfg.run_dir / "result.json").write_text(json.dumps(result))
