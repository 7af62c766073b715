"""Cost of the SWA model's exact BatchNorm recompute (ddp_kit.averaging.recompute_bn_statistics) on ResNet-50,
side by side with torch.optim.swa_utils.update_bn and with one plain eval forward over the same data, in
one process on this machine; and how far update_bn's statistics are from the exact ones.

The exact recompute makes one pass over the data per BatchNorm (53 on ResNet-50), each pass stopping at its
BatchNorm, so it costs roughly half a forward per BatchNorm per sample. update_bn makes one training-mode
pass, but normalizes every BatchNorm after the first with the statistics of each batch, not the ones
inference uses. `swa.bn_rows` bounds the rows the recompute reads.

    python benchmarks/bn_recompute.py                      # ResNet-50, 128 images of 3 x 64 x 64, batch 32
    python benchmarks/bn_recompute.py --model resnet18 --rows 256 --size 32
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from ddp_kit import distributed
from ddp_kit.config import Config, DistributedConfig, ModelConfig
from ddp_kit.models import build_model
from ddp_kit.averaging import recompute_bn_statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    cfg = Config(distributed=DistributedConfig(device="cpu"),
                 model=ModelConfig(name=args.model, in_channels=3, num_classes=10))
    images = torch.randint(0, 256, (args.rows, 3, args.size, args.size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    batches = [(images[i:i + args.batch_size], torch.zeros(0), torch.zeros(0))
               for i in range(0, args.rows, args.batch_size)]
    torch.manual_seed(0)
    model = build_model(cfg.model)
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    with distributed.process_group(cfg.distributed) as rt:
        model.eval()
        with torch.no_grad():
            model((batches[0][0].float() / 255 - 0.5) / 0.5)  # warm-up: allocator and kernel selection
            start = time.perf_counter()
            for x, _, _ in batches:
                model((x.float() / 255 - 0.5) / 0.5)
        forward_s = time.perf_counter() - start

        model.load_state_dict(initial)
        start = time.perf_counter()
        update_bn([((x.float() / 255 - 0.5) / 0.5,) for x, _, _ in batches], model)
        update_bn_s = time.perf_counter() - start
        approximate = {k: v.clone() for k, v in model.state_dict().items() if "running_var" in k}

        model.load_state_dict(initial)
        start = time.perf_counter()
        recompute_bn_statistics(model, lambda: [((x.float() / 255 - 0.5) / 0.5,) for x, _, _ in batches], rt)
        exact_s = time.perf_counter() - start
        exact = {k: v for k, v in model.state_dict().items() if "running_var" in k}

    worst = max(((approximate[k] - exact[k]).abs() / exact[k].abs().clamp_min(1e-12)).max().item() for k in exact)
    print(f"{args.model}, {norms} BatchNorms, {args.rows} images of 3 x {args.size} x {args.size}, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"{'pass':<34}{'seconds':>9}{'x forward':>11}")
    for name, seconds in (("one eval forward", forward_s), ("torch.optim.swa_utils.update_bn", update_bn_s),
                          ("ddp_kit exact recompute", exact_s)):
        print(f"{name:<34}{seconds:>9.2f}{seconds / forward_s:>11.1f}")
    print(f"update_bn's running_var vs the exact one: up to {worst:.1%} relative")


if __name__ == "__main__":
    main()
