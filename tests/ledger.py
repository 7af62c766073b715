"""Reading the per-rank sample ledger (train.record_sample_ids): which rows each micro-batch trained on."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import h5py

from ddp_kit.config import load_config


def ledger_lines(run_dir: Path, rank: int) -> list[dict]:
    path = run_dir / "samples" / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def ledger(run_dir: Path, world: int = 2) -> tuple[dict, Counter]:
    """{(rank, epoch, step, micro): indices} keeping the last occurrence, and how often each key was written."""
    last, counts = {}, Counter()
    for rank in range(world):
        for rec in ledger_lines(run_dir, rank):
            key = (rank, rec["epoch"], rec["step"], rec["micro"])
            last[key] = rec["indices"]
            counts[key] += 1
    return last, counts


def rows_seen(entries: dict, epoch: int) -> Counter:
    """How often each row was trained on in `epoch`, over all ranks, from `ledger(...)[0]`."""
    return Counter(i for (_, e, _, _), indices in entries.items() if e == epoch for i in indices)


def train_rows(run_dir: Path) -> int:
    """Rows in the training split the run in `run_dir` was configured with."""
    cfg = load_config(run_dir / "config.yaml")
    first_field = next(iter((cfg.data.fields or {"image": "images"}).values()))  # null: the default fields
    with h5py.File(cfg.data.path, "r") as f:
        return len(f[cfg.data.train_group][first_field])
