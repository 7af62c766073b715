"""ddp_kit: distributed data-parallel training for your own model, objective and data.

    import ddp_kit
    cfg = ddp_kit.load_config("configs/unet.yaml", sys.argv[1:])   # strict YAML + section.key=value overrides
    ddp_kit.train(cfg, model=lambda: UNet(), objective=ddp_kit.objectives.Segmentation(num_classes=5))

Run that script alone, under `torchrun --nproc_per_node=N`, or as SLURM tasks (slurm/). docs/api.md has the
whole interface; objectives.py documents how to write an objective.
"""

from importlib.metadata import version

__version__ = version("ddp_kit")

from . import data, objectives  # noqa: E402  (after __version__: the modules below read it)
from .config import Config, ConfigError, load_config  # noqa: E402
from .objectives import objective_from_functions  # noqa: E402
from .train import evaluate_checkpoint, train  # noqa: E402
from .weights import export_weights, load_weights  # noqa: E402

__all__ = ["Config", "ConfigError", "data", "evaluate_checkpoint", "export_weights", "load_config", "load_weights",
           "objective_from_functions", "objectives", "train"]
