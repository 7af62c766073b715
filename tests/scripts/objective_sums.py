"""Validation metrics of the four built-in objectives over a fixed dataset of ROWS rows, each rank over its
contiguous shard (uneven: 23 rows are 11/12 or 7/8/8) in batches of BATCH (uneven batch counts), the sums
all-reduced. Rank 0 saves {objective: {"sums": ..., "metrics": ...}}. Usage: objective_sums.py OUT.pt"""

import sys

import torch

from ddp_kit import distributed
from ddp_kit.config import DistributedConfig
from ddp_kit.objectives import (Classification, LanguageModel, Regression, Segmentation, add_sums,
                                all_reduce_sums)

ROWS, BATCH = 23, 4


def dataset() -> dict:
    """{objective name: (objective, model outputs, batch)} for all ROWS rows, float64, with ignored labels."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (ROWS,), generator=g)
    labels[::5] = -100
    mask = torch.randint(0, 4, (ROWS, 5, 6), generator=g, dtype=torch.uint8)
    mask[:, 0, :2] = 255
    tokens = torch.randint(0, 11, (ROWS, 9), generator=g)
    tokens[:, -2:][torch.rand(ROWS, 2, generator=g) < 0.5] = -100
    return {
        "classification": (Classification(top_k=(1, 3)), torch.randn(ROWS, 7, generator=g, dtype=torch.float64),
                           {"label": labels}),
        "regression": (Regression(weight="w"), torch.randn(ROWS, 3, generator=g, dtype=torch.float64),
                       {"target": torch.randn(ROWS, 3, generator=g, dtype=torch.float64),
                        "w": torch.rand(ROWS, generator=g, dtype=torch.float64)}),
        "segmentation": (Segmentation(num_classes=4), torch.randn(ROWS, 4, 5, 6, generator=g, dtype=torch.float64),
                         {"mask": mask}),
        "language_model": (LanguageModel(), torch.randn(ROWS, 9, 11, generator=g, dtype=torch.float64),
                           {"target": tokens}),
    }


def shard_totals(objective, outputs: torch.Tensor, batch: dict, rank: int, world_size: int) -> dict:
    """evaluate() sums over rank `rank`'s contiguous shard of the ROWS rows, in batches of BATCH."""
    start, stop = rank * ROWS // world_size, (rank + 1) * ROWS // world_size
    totals = None
    for i in range(start, stop, BATCH):
        rows = slice(i, min(i + BATCH, stop))
        totals = add_sums(totals, objective.evaluate(outputs[rows], {k: v[rows] for k, v in batch.items()}))
    return totals


if __name__ == "__main__":
    with distributed.process_group(DistributedConfig(device="cpu")) as rt:
        results = {}
        for name, (objective, outputs, batch) in dataset().items():
            totals = all_reduce_sums(shard_totals(objective, outputs, batch, rt.rank, rt.world_size), rt)
            results[name] = {"sums": totals, "metrics": objective.summarize(totals)}
        if rt.is_main:
            torch.save(results, sys.argv[1])
