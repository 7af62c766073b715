"""Train with a forward hook on the model that records the dtype of its training outputs, and write them to
<run_dir>/output_dtypes.json. Usage: output_dtypes.py CONFIG [overrides...]"""

import json
import sys

import ddp_kit.models
import ddp_kit.train
from ddp_kit.config import load_config

seen = set()
build_model = ddp_kit.models.build_model


def build_and_watch(*args, **kwargs):
    model = build_model(*args, **kwargs)
    model.register_forward_hook(lambda module, inputs, output: seen.add(str(output.dtype)) if module.training else None)
    return model


ddp_kit.models.build_model = build_and_watch
cfg = load_config(sys.argv[1], sys.argv[2:])
ddp_kit.train.train(cfg)
(cfg.run_dir / "output_dtypes.json").write_text(json.dumps(sorted(seen)))
