"""Entry script: `torchrun --nproc_per_node=N launch/train.py --config configs/X.yaml [section.key=value ...]`
(or `python launch/train.py ...` for a single process). All logic lives in ddp_kit."""

import sys

from ddp_kit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
