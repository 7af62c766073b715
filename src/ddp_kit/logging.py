"""What a run tells the world: console lines or a progress bar, TensorBoard scalars, metrics.jsonl.

Only rank 0 writes; on other ranks every method is a no-op, so the training loop never branches on the rank
to log."""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from .files import write_errors


class RunLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled = enabled
        self.run_dir = run_dir
        self._writer = None
        self._bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a crashed attempt wrote after the checkpoint this run resumes from.
        self._writer = SummaryWriter(log_dir=str(run_dir), purge_step=start_step if start_step > 0 else None)
        self._metrics = (run_dir / "metrics.jsonl").open("a")
        if sys.stdout.isatty():
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """TensorBoard scalars, e.g. {"train/loss": 0.3}."""
        if not self.enabled:
            return
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)

    def step(self, step: int, epoch: int, values: dict[str, float]) -> None:
        """A periodic training update: scalars, plus the progress bar (terminal) or a plain line (logs)."""
        if not self.enabled:
            return
        self.scalars(step, {f"train/{k}": v for k, v in values.items()})
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({"epoch": epoch, **{k: f"{v:.4g}" for k, v in values.items()}}, refresh=True)
        else:
            print(f"epoch {epoch} step {step} " + " ".join(f"{k} {v:.4g}" for k, v in values.items()), flush=True)

    def epoch(self, record: dict) -> None:
        """One line of metrics.jsonl per epoch, the val/* scalars, and a summary line."""
        if not self.enabled:
            return
        with write_errors(self.run_dir / "metrics.jsonl"):
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()
        step = record["step"]
        for key, value in record.items():
            if key.startswith(("val_", "swa_val_")) and value is not None:
                prefix, _, name = key.partition("val_")
                self._writer.add_scalar(f"{prefix}val/{name}", value, step)
        self._writer.flush()
        shown = {k: v for k, v in record.items() if v is not None and k not in ("epoch", "step", "time")}
        self.info(f"epoch {record['epoch']} done (step {step}): " + " ".join(
            f"{k} {v:.4f}" if isinstance(v, float) and not math.isnan(v) else f"{k} {v}" for k, v in shown.items()))

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._writer.close()
        self._metrics.close()


class Throughput:
    """Units per second (samples, and whatever else the objective counts, e.g. tokens) between two log points.
    On CUDA the caller synchronizes before reading, so the interval covers finished kernels, not launches."""

    def __init__(self):
        self._start = time.perf_counter()
        self._counts: Counter = Counter()

    def add(self, counts: dict[str, int], *, ranks: int = 1) -> None:
        """One rank's batch counts; `ranks` processes each did as much."""
        for unit, n in counts.items():
            self._counts[unit] += n * ranks

    def rates_and_reset(self) -> dict[str, float]:
        """{"<unit>_per_s": rate} since the last call."""
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        rates = {f"{unit}_per_s": n / elapsed for unit, n in self._counts.items()}
        self._start, self._counts = now, Counter()
        return rates
