"""A user's own train.py: ddp_kit.train with a model factory and an objective object, no YAML model section.
Usage: user_train.py CONFIG [overrides...]; writes <run_dir>/result.json (train's return) on rank 0."""

import json
import os
import sys

import ddp_kit
from user_code import TwoHeads, margin

cfg = ddp_kit.load_config(sys.argv[1], sys.argv[2:])
result = ddp_kit.train(cfg, model=lambda: TwoHeads(pixels=64, classes=4), objective=margin)
if os.environ.get("RANK", "0") == "0":
    (cfg.run_dir / "result.json").write_text(json.dumps(result))
