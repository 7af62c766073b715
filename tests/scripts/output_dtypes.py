"""Train with a forward hook on the model that records the dtype of its training outputs, and write them to
<run_dir>/output_dtypes.json. Usage: output_dtypes.py CONFIG [overrides...]"""

import json
import sys

import ddp_kit
from ddp_kit.models import build_model

seen = set()


def watched_model(cfg):
    model = build_model(cfg.model)
    model.register_forward_hook(lambda module, inputs, output: seen.add(str(output.dtype)) if module.training else None)
    return model


cfg = ddp_kit.load_config(sys.argv[1], sys.argv[2:])
ddp_kit.train(cfg, model=lambda: watched_model(cfg))
(cfg.run_dir / "output_dtypes.json").write_text(json.dumps(sorted(seen)))
