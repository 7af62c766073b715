"""Semantic segmentation with a small U-Net on synthetic shapes: noisy 32 x 32 RGB images with a disc and a
square of random colours, sizes and places; the mask labels each pixel background (0), disc (1) or square (2).
Per-pixel cross-entropy, pixel accuracy and mean IoU from a confusion matrix summed over the ranks.

    torchrun --standalone --nproc_per_node=2 examples/segmentation.py       # segmentation.yaml next to this file
"""

import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

import ddp_kit
from ddp_kit.objectives import Segmentation


def write_shapes(path: Path, rows: int = 1200, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    images = rng.integers(0, 60, (rows, 3, size, size)).astype(np.uint8)
    masks = np.zeros((rows, size, size), np.int64)
    for image, mask in zip(images, masks):
        cy, cx, r = *rng.integers(6, size - 6, 2), rng.integers(3, 7)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
        y0, x0, side = *rng.integers(0, size - 8, 2), rng.integers(4, 9)
        mask[y0:y0 + side, x0:x0 + side] = 2
        for label in (1, 2):
            image[:, mask == label] = rng.integers(100, 256, (3, 1))
    split = rows * 5 // 6
    for group, part in (("train", slice(0, split)), ("val", slice(split, rows))):
        ddp_kit.data.write_fields(path, {"image": images[part], "mask": masks[part]}, group=group,
                                  append_group=group == "val")


def conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    def __init__(self, in_channels: int = 3, classes: int = 3, width: int = 16):
        super().__init__()
        self.down1, self.down2 = conv(in_channels, width), conv(width, 2 * width)
        self.bottom = conv(2 * width, 4 * width)
        self.up2, self.merge2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2), conv(4 * width, 2 * width)
        self.up1, self.merge1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2), conv(2 * width, width)
        self.out = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        d1 = self.down1(x)
        d2 = self.down2(nn.functional.max_pool2d(d1, 2))
        b = self.bottom(nn.functional.max_pool2d(d2, 2))
        u2 = self.merge2(torch.cat([self.up2(b), d2], 1))
        u1 = self.merge1(torch.cat([self.up1(u2), d1], 1))
        return self.out(u1)  # N x classes x H x W logits


if __name__ == "__main__":
    cfg = ddp_kit.load_config(Path(__file__).with_suffix(".yaml"), sys.argv[1:])
    ddp_kit.data.create_once(cfg.data.path, write_shapes)
    result = ddp_kit.train(cfg, model=lambda: UNet(), objective=Segmentation(num_classes=3))
    if os.environ.get("RANK", "0") == "0":  # every process returns the same figures
        print(f"validation mean IoU {result['val_miou']:.3f}, pixel accuracy {result['val_pixel_acc']:.3f}")
