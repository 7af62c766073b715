"""Training-loop overhead: ddp_kit's loop vs a hand-written PyTorch loop vs PyTorch Lightning vs Accelerate.

One run, side by side, on the CPU: the same HDF5 data (written with ddp_kit.data.write_h5), the same model
(ddp_kit.models.build_model: `mlp` as the tiny model where per-step overhead shows, `small_cnn` as the small
CNN; and the character GPT of examples/char_gpt.py on its token stream, against a hand-written nanoGPT-style
loop, both with AdamW), the same optimizer (SGD, momentum 0.9, no Nesterov, no weight decay, constant lr; AdamW
without weight decay for the GPT), the same batch size,
the same number of epochs and steps, the same torch thread count. Loops:

  hand        the hand-written reference: the split's arrays in RAM as tensors, TensorDataset + DataLoader
              (shuffle, same batch size), normalization on the fly as ddp_kit's prepare_images, forward/backward/
              SGD step; DistributedSampler + DDP (no_sync while accumulating) under torchrun
  hand-index  the leanest possible loop, no DataLoader at all: images[randperm slice] (a floor, not a baseline)
  ddp_kit     the real ddp_kit.train.train(cfg) with data.in_memory=true (ddp_kit-mem) or reading the HDF5
              file (ddp_kit-h5); under torchrun, `python -m ddp_kit.cli train`
  lightning   a LightningModule around the same model, Trainer(accelerator="cpu", devices=1) with logger,
              checkpointing, progress bar, model summary and validation switched off (its lightest setup)
  accelerate  Accelerator(cpu=True) preparing the same model, optimizer and DataLoader as `hand`

Every loop also sums its losses on the device each step (ddp_kit does; so the others do too). ddp_kit runs
with its defaults otherwise: its log line, TensorBoard scalars and gradient norm every 20 steps, its per-step
non-finite/stop check, its LR scheduler; validation is minimized (256 rows, only after the last epoch) and
checkpoints too (checkpoint.every_epochs=0: only the final one, after the timed epochs).

Variants (vs the same loop's `base`, and each vs `hand` in the same variant): amp (bf16 autocast), accum
(train.accum_steps=4, the tiny model), compile (torch.compile, inductor, the tiny model), threads (one
process, twice the torch threads), 2proc and 4proc (torchrun, 2 or 4 processes of --threads each, DDP over
gloo; 4 on 2 cores oversubscribes them, which is what 4 processes on 2 cores cost).
`base` runs every process with --threads (default 1) torch threads, so on a 2-core machine `threads` and
`2proc` both use the whole machine, one with intra-op threads, the other with data parallelism.

Timing: samples/s over the epochs after the first (the warm-up epoch, which also holds torch.compile's
compilation, is excluded), every loop measured the same way: from the start of the epoch (before the
DataLoader iterator is created) to the end of its last optimizer step; ddp_kit's figures are the
`samples_per_s` and `epoch_time_s` it writes to metrics.jsonl, which measure exactly that (Lightning's from
on_train_epoch_start to on_train_epoch_end). With 2 processes the figures are global (both ranks' samples).
Every configuration runs in a fresh process (thread pools and allocator state never carry over; compiled
kernels are cached per configuration only, which shortens the excluded first epoch and nothing else), all
configurations run once per repeat, round-robin (every other repeat in reverse order), so drifts in machine
speed spread over all of them. The table shows the median of the repeats, their range, and the ratio to
`hand` three ways: of the medians; paired (the median over repeats of run / `hand`'s run of the same repeat,
which cancels slow drifts of the machine's speed); and of the best runs (other work on a shared or virtual
machine only ever slows a run down, so the best runs are the closest to each loop's own speed). Where the
three disagree, the machine was too noisy for that row: raise --repeats.

    python benchmarks/overhead.py                        # everything, ~10 min on 2 CPU cores
    python benchmarks/overhead.py --only tiny --repeats 1
    python benchmarks/overhead.py --loops hand ddp_kit-mem lightning --variants base amp
    python benchmarks/overhead.py --wait-load 0.5 --json results.json   # start on a quiet machine, keep raw data

Needs the `bench` extra (pip install -e ".[bench]") for Lightning and Accelerate; loops whose package is
missing are skipped. ddp_kit itself never imports either. The figures in docs/overhead.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

RESULT_TAG = "OVERHEAD_RESULT "
# ddp_kit's log line for the one discarded forward/backward that settles DDP's buckets (exact resume at 3+ ranks)
SETTLE_LINE = re.compile(r"gradient buckets settled by one discarded forward/backward in ([0-9.]+) s")
LOOPS = ("hand", "hand-index", "ddp_kit-mem", "ddp_kit-h5", "lightning", "accelerate")
VARIANTS = ("base", "amp", "accum", "compile", "threads", "2proc", "4proc")
MODELS = {"tiny": "mlp", "cnn": "small_cnn", "gpt": "char_gpt:GPT"}  # gpt: examples/char_gpt.py
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
GPT_CONTEXT, GPT_LR = 64, 1e-3  # the example's windows; AdamW for the GPT (nanoGPT's choice), SGD otherwise
LR, MOMENTUM = 0.05, 0.9
MEAN, STD = 0.5, 0.5  # ddp_kit's default data.mean / data.std, applied the same way by every loop


@dataclass
class Case:
    """One configuration: which loop trains which model how. Runs in a fresh process (or torchrun)."""

    model: str  # tiny | cnn
    loop: str  # one of LOOPS
    variant: str = "base"  # one of VARIANTS
    amp: bool = False  # bf16 autocast
    accum: int = 1  # micro-batches per optimizer step
    compile: bool = False
    nproc: int = 1
    threads: int = 1  # torch intra-op threads per process
    batch_size: int = 64
    epochs: int = 6
    workers: int = 0  # DataLoader workers (every loop the same)
    data: str = ""  # HDF5 file
    workdir: str = ""  # scratch directory of this run (ddp_kit's run dir)
    overrides: list = field(default_factory=list)  # extra ddp_kit config overrides (ddp_kit loops only)

    @property
    def label(self) -> str:
        return f"{self.model}/{self.variant}/{self.loop}"


# ---------------------------------------------------------------------------------------------------------
# Data: the same HDF5 file for every loop.


def write_data(path: Path, model: str, train_rows: int, val_rows: int = 256, seed: int = 0) -> None:
    """For the GPT: the character example's token stream (the standard library's source). Otherwise learnable synthetic 1x32x32 uint8 images: 10 similar smooth class templates plus noise, 20% of the labels
    random, so the loss stays well above 0 and shows that every loop trains the same way."""
    import numpy as np

    from ddp_kit.data import write_h5

    if model == "gpt":
        _examples().write_text_tokens(path)
        return
    rng = np.random.default_rng(seed)
    shared = rng.uniform(0, 255, size=(1, 1, 8, 8))
    coarse = 0.8 * shared + 0.2 * rng.uniform(0, 255, size=(10, 1, 8, 8))
    templates = coarse.repeat(4, axis=2).repeat(4, axis=3)  # 10 x 1 x 32 x 32
    for group, rows in (("train", train_rows), ("val", val_rows)):
        classes = rng.integers(0, 10, size=rows)
        images = templates[classes] + rng.normal(0, 60, size=(rows, 1, 32, 32))
        images = np.clip(images, 0, 255).astype(np.uint8)
        labels = np.where(rng.random(rows) < 0.2, rng.integers(0, 10, size=rows), classes)
        write_h5(path, images, labels, group=group, append_group=group != "train")


def _examples():
    sys.path.insert(0, str(EXAMPLES))
    import char_gpt

    return char_gpt


def load_arrays(path: str):
    """The training split as CPU tensors in RAM: images (uint8, N x 1 x 32 x 32) and labels (int64), or for the
    GPT its windows (N x context + 1 tokens, non-overlapping, as ddp_kit's data.tokens cuts them)."""
    import h5py
    import torch

    with h5py.File(path, "r", locking=False) as f:
        if "tokens" in f["train"]:
            tokens = torch.from_numpy(f["train/tokens"][()].astype("int64"))
            windows = len(tokens) // (GPT_CONTEXT + 1)
            return (tokens[:windows * (GPT_CONTEXT + 1)].view(windows, GPT_CONTEXT + 1),)
        return torch.from_numpy(f["train/images"][()]), torch.from_numpy(f["train/labels"][()].astype("int64"))


def hand_loss(model, batch):
    """The loss of one batch as the hand-written loops compute it: next-token cross-entropy for the GPT,
    cross-entropy of the normalized images otherwise."""
    import torch.nn.functional as F

    if len(batch) == 1:
        (windows,) = batch
        return F.cross_entropy(model(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten())
    x, y = batch
    return F.cross_entropy(model(normalize(x)), y)


# ---------------------------------------------------------------------------------------------------------
# Worker side: one case, in this process (or this torchrun rank).


def normalize(images):
    """What ddp_kit's prepare_images does to a uint8 batch with mean/std 0.5 (no augmentation): float, /255, norm."""
    import torch

    x = images.to(torch.float32).div_(255)
    return (x - _const(MEAN)) / _const(STD)


_CONSTS: dict = {}


def _const(value: float):
    import torch

    if value not in _CONSTS:
        _CONSTS[value] = torch.tensor([value], dtype=torch.float32).view(1, -1, 1, 1)
    return _CONSTS[value]


def build(case: Case):
    """The model (seeded, so every loop starts from the same weights) and its SGD optimizer."""
    import torch

    from ddp_kit.config import ModelConfig
    from ddp_kit.models import build_model

    torch.manual_seed(0)
    if case.model == "gpt":
        model = _examples().GPT(GPT_CONTEXT)
        return model, torch.optim.AdamW(model.parameters(), lr=GPT_LR, weight_decay=0.0)
    model = build_model(ModelConfig(name=MODELS[case.model]), example_input_shape=(1, 32, 32))
    return model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def run_hand(case: Case) -> dict:
    """The hand-written loop: TensorDataset + DataLoader, DDP with no_sync under torchrun."""
    import contextlib

    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    dataset = TensorDataset(*load_arrays(case.data))
    sampler = DistributedSampler(dataset, shuffle=True, seed=0) if world > 1 else None
    loader = DataLoader(dataset, batch_size=case.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=case.workers, persistent_workers=case.workers > 0)
    model, optimizer = build(case)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if case.compile:
        train_model = torch.compile(train_model)
    epochs = []
    for epoch in range(case.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        start = time.perf_counter()
        epoch_loss, samples, n = torch.zeros(()), 0, len(loader)
        for i, batch in enumerate(loader):
            step_now = (i + 1) % case.accum == 0 or i + 1 == n
            sync = contextlib.nullcontext() if world == 1 or step_now else train_model.no_sync()
            with sync:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.amp):
                    loss = hand_loss(train_model, batch)
                (loss / case.accum if case.accum > 1 else loss).backward()
            if step_now:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            epoch_loss += loss.detach()
            samples += len(batch[0])
        if world > 1:
            dist.all_reduce(epoch_loss)
        mean_loss = epoch_loss.item() / n / world
        epochs.append((samples * world, time.perf_counter() - start, mean_loss))
    if world > 1:
        dist.destroy_process_group()
    return {"epochs": epochs} if int(os.environ.get("RANK", "0")) == 0 else {}


def run_hand_index(case: Case) -> dict:
    """The leanest loop: no DataLoader, batches are slices of a random permutation indexing the tensors."""
    import torch
    import torch.nn.functional as F

    images, labels = load_arrays(case.data)
    model, optimizer = build(case)
    train_model = torch.compile(model) if case.compile else model
    epochs, n_rows = [], len(labels)
    generator = torch.Generator().manual_seed(0)
    for _ in range(case.epochs):
        start = time.perf_counter()
        perm = torch.randperm(n_rows, generator=generator)
        epoch_loss, samples = torch.zeros(()), 0
        starts = range(0, n_rows, case.batch_size)
        for i, first in enumerate(starts):
            idx = perm[first:first + case.batch_size]
            x, y = images[idx], labels[idx]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.amp):
                loss = F.cross_entropy(train_model(normalize(x)), y)
            (loss / case.accum if case.accum > 1 else loss).backward()
            if (i + 1) % case.accum == 0 or i + 1 == len(starts):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            epoch_loss += loss.detach()
            samples += len(y)
        epochs.append((samples, time.perf_counter() - start, epoch_loss.item() / len(starts)))
    return {"epochs": epochs}


def ddp_kit_overrides(case: Case) -> list[str]:
    return [
        f"run.output_dir={case.workdir}", "run.name=run", f"data.path={case.data}",
        f"data.in_memory={'true' if case.loop == 'ddp_kit-mem' else 'false'}", f"data.num_workers={case.workers}",
        "distributed.device=cpu", f"model.name={MODELS[case.model]}",
        "optim.name=sgd", f"optim.lr={LR}", f"optim.momentum={MOMENTUM}", "optim.nesterov=false",
        "optim.weight_decay=0", "schedule.name=constant",
        f"train.epochs={case.epochs}", f"train.batch_size={case.batch_size}", f"train.accum_steps={case.accum}",
        "train.val_batch_size=256", "train.val_every_epochs=1000", "train.resume=never",
        f"amp.enabled={'true' if case.amp else 'false'}", "amp.dtype=bf16",
        f"compile.enabled={'true' if case.compile else 'false'}",
        "checkpoint.every_epochs=0", "checkpoint.best_metric=null",
    ] + (GPT_OVERRIDES if case.model == "gpt" else []) + list(case.overrides)


# the character GPT as examples/char_gpt.py trains it (the model by import path: run_case puts examples/ on the path)
GPT_OVERRIDES = ["data.tokens=tokens", f"data.context_length={GPT_CONTEXT}", "model.name=char_gpt:GPT",
                 f"model.kwargs={{context: {GPT_CONTEXT}}}", "model.inputs=[input]", "objective.name=language_model",
                 "optim.name=adamw", f"optim.lr={GPT_LR}", "optim.weight_decay=0"]


def run_ddp_kit(case: Case) -> dict:
    """The real thing: ddp_kit.train.train(cfg); the timings are read back from metrics.jsonl."""
    from ddp_kit.config import load_config
    from ddp_kit.train import train

    train(load_config(None, ddp_kit_overrides(case)))
    return {"epochs": read_ddp_kit_metrics(case)}


def read_ddp_kit_metrics(case: Case) -> list:
    lines = (Path(case.workdir) / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [(r["samples_per_s"] * r["epoch_time_s"], r["epoch_time_s"], r["train_loss"]) for r in records]


def run_lightning(case: Case) -> dict:
    import logging
    import warnings

    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    images, labels = load_arrays(case.data)
    loader = DataLoader(TensorDataset(images, labels), batch_size=case.batch_size, shuffle=True,
                        num_workers=case.workers, persistent_workers=case.workers > 0)
    model, optimizer = build(case)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = torch.compile(model) if case.compile else model
            self.epoch_loss = torch.zeros(())

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.model(normalize(x)), y)
            self.epoch_loss += loss.detach()
            return loss

        def configure_optimizers(self):
            return optimizer

    class Timer(L.Callback):
        def __init__(self):
            self.epochs, self.start, self.samples = [], 0.0, 0

        def on_train_epoch_start(self, trainer, module):
            module.epoch_loss = torch.zeros(())
            self.samples, self.start = 0, time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.samples += len(batch[1])

        def on_train_epoch_end(self, trainer, module):
            self.epochs.append((self.samples, time.perf_counter() - self.start,
                                module.epoch_loss.item() / len(loader)))

    timer = Timer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=case.epochs, callbacks=[timer],
                        precision="bf16-mixed" if case.amp else "32-true", accumulate_grad_batches=case.accum,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(Module(), train_dataloaders=loader)
    return {"epochs": timer.epochs}


def run_accelerate(case: Case) -> dict:
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, TensorDataset

    images, labels = load_arrays(case.data)
    loader = DataLoader(TensorDataset(images, labels), batch_size=case.batch_size, shuffle=True,
                        num_workers=case.workers, persistent_workers=case.workers > 0)
    model, optimizer = build(case)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if case.amp else "no",
                              gradient_accumulation_steps=case.accum)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if case.compile:
        model = torch.compile(model)
    epochs = []
    for _ in range(case.epochs):
        start = time.perf_counter()
        epoch_loss, samples, n = torch.zeros(()), 0, 0
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(normalize(x)), y)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            epoch_loss += loss.detach()
            samples += len(y)
            n += 1
        epochs.append((samples, time.perf_counter() - start, epoch_loss.item() / n))
    return {"epochs": epochs}


RUNNERS = {"hand": run_hand, "hand-index": run_hand_index, "ddp_kit-mem": run_ddp_kit, "ddp_kit-h5": run_ddp_kit,
           "lightning": run_lightning, "accelerate": run_accelerate}


def worker(spec: str) -> None:
    import torch

    case = Case(**json.loads(spec))
    torch.set_num_threads(case.threads)
    result = RUNNERS[case.loop](case)
    if result:
        print(RESULT_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------
# Driver side: the matrix of cases, fresh processes, the table.


@dataclass
class Measurement:
    case: Case
    rates: list = field(default_factory=list)  # steady-state samples/s, one per repeat
    by_repeat: dict = field(default_factory=dict)  # repeat -> steady-state samples/s (for paired ratios)
    losses: list = field(default_factory=list)  # last epoch's mean training loss, one per repeat
    warmups: list = field(default_factory=list)  # seconds of the first (untimed) epoch, one per repeat
    settle_shares: list = field(default_factory=list)  # ddp_kit under DDP: bucket settling / (it + all epochs)
    settle_steps: list = field(default_factory=list)  # the same settling in steady optimizer steps of that run
    errors: list = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None


def build_cases(args) -> list[Case]:
    """The matrix. Variants run for `hand` (their reference) and ddp_kit; with --framework-variants also for
    Lightning and Accelerate (amp, accum)."""
    cases = []
    for model in args.only:
        common = dict(model=model, threads=args.threads, batch_size=args.batch_size,
                      epochs={"tiny": args.epochs_tiny, "cnn": args.epochs_cnn, "gpt": args.epochs_gpt}[model],
                      workers=args.workers,
                      overrides=list(args.ddp_kit_set))

        def add(loop, variant, **kw):
            if loop in args.loops and variant in args.variants:
                cases.append(Case(loop=loop, variant=variant, **{**common, **kw}))

        if model == "gpt":  # ddp_kit against the hand-written nanoGPT-style loop only
            for loop in ("hand", "ddp_kit-mem", "ddp_kit-h5"):
                add(loop, "base")
            for loop in ("hand", "ddp_kit-mem"):
                add(loop, "amp", amp=True)
                add(loop, "2proc", nproc=2)
            continue
        for loop in LOOPS:
            if loop == "hand-index" and model != "tiny":
                continue
            add(loop, "base")
        pair = ("hand", "ddp_kit-mem")
        for loop in pair + (("lightning", "accelerate") if args.framework_variants else ()):
            add(loop, "amp", amp=True)
            if model == "tiny":
                add(loop, "accum", accum=4)
        if model == "tiny":
            for loop in pair:
                add(loop, "compile", compile=True, epochs=args.epochs_compile)
        # The whole machine: one process with a thread per core, or one process per core (torchrun).
        for loop in pair:
            add(loop, "threads", threads=args.threads * 2)
            add(loop, "2proc", nproc=2)
            add(loop, "4proc", nproc=4)
    return cases


def command(case: Case, python: str) -> list[str]:
    if case.nproc == 1:
        return [python, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(case))]
    launch = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={case.nproc}"]
    if case.loop.startswith("ddp_kit"):
        config = Path(case.workdir) / "config.yaml"
        from ddp_kit.config import load_config, save_config

        save_config(load_config(None, ddp_kit_overrides(case)), config)
        return launch + ["-m", "ddp_kit.cli", "train", "--config", str(config)]
    return launch + [str(Path(__file__).resolve()), "--worker", json.dumps(asdict(case))]


def run_case(case: Case, python: str, timeout: float, inductor_cache: Path) -> tuple[dict | None, str]:
    Path(case.workdir).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(case.threads), PYTHONWARNINGS="ignore",
               TORCHINDUCTOR_CACHE_DIR=str(inductor_cache),
               PYTHONPATH=os.pathsep.join(filter(None, [str(EXAMPLES), os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run(command(case, python), env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    if proc.returncode != 0:
        return None, f"exit {proc.returncode}: " + (proc.stderr or proc.stdout)[-2000:]
    if case.loop.startswith("ddp_kit"):
        settled = SETTLE_LINE.search(proc.stdout)
        return {"epochs": read_ddp_kit_metrics(case), "settle_s": float(settled.group(1)) if settled else None}, ""
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):]), ""
    return None, "no result line in the output: " + proc.stdout[-2000:]


def steady_rate(epochs: list) -> float:
    """Samples/s over every epoch but the first (warm-up, compilation)."""
    timed = epochs[1:]
    return sum(e[0] for e in timed) / sum(e[1] for e in timed)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def print_table(measurements: list[Measurement], out=sys.stdout) -> None:
    """Markdown table. Ratios compare with `hand` in the same model / variant / process count three ways: the
    ratio of the medians, the median of the per-repeat ratios (paired), and the ratio of the best runs."""
    by_key = {(m.case.model, m.case.variant, m.case.loop): m for m in measurements}

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "-"

    def paired(m, ref):
        """Median over repeats of this run / the reference's run of the same repeat (run minutes apart at most,
        so both saw about the same machine)."""
        both = [m.by_repeat[r] / ref.by_repeat[r] for r in m.by_repeat if r in ref.by_repeat]
        return f"{statistics.median(both):.2f}x" if both else "-"

    print("| model | variant | loop | procs x threads | samples/s median | min - max | vs hand: medians | paired "
          "| best | vs own base | first epoch s | last-epoch loss |", file=out)
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", file=out)
    order = {model: i for i, model in enumerate(MODELS)}
    rows = sorted(measurements, key=lambda m: (order[m.case.model], VARIANTS.index(m.case.variant),
                                               LOOPS.index(m.case.loop)))
    for m in rows:
        c = m.case
        if m.median is None:
            print(f"| {c.model} | {c.variant} | {c.loop} | {c.nproc} x {c.threads} | failed | | | | | | | |", file=out)
            continue
        hand = by_key.get((c.model, c.variant, "hand"))
        base = by_key.get((c.model, "base", c.loop)) if c.variant != "base" else None
        print(f"| {c.model} | {c.variant} | {c.loop} | {c.nproc} x {c.threads} | {m.median:,.0f} | "
              f"{min(m.rates):,.0f} - {max(m.rates):,.0f} | "
              f"{ratio(m.median, hand.median if hand else None)} | {paired(m, hand) if hand else '-'} | "
              f"{ratio(max(m.rates), max(hand.rates) if hand and hand.rates else None)} | "
              f"{ratio(m.median, base.median if base else None)} | {statistics.median(m.warmups):.1f} | "
              f"{statistics.median(m.losses):.3f} |", file=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=tuple(MODELS), default=list(MODELS),
                        help="models: tiny (mlp), cnn (small_cnn), gpt (examples/char_gpt.py, AdamW)")
    parser.add_argument("--loops", nargs="+", choices=LOOPS, default=list(LOOPS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="base; amp (bf16 autocast); accum (accum_steps=4, tiny model); compile (tiny model); "
                             "threads (1 process, 2x the threads); 2proc, 4proc (torchrun, 2 or 4 processes)")
    parser.add_argument("--framework-variants", action="store_true",
                        help="also run Lightning and Accelerate with amp and accum (default: base only)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every configuration; the median counts")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (the `threads` variant doubles it)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers, every loop")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tiny-rows", type=int, default=8192, help="training images for the tiny model")
    parser.add_argument("--cnn-rows", type=int, default=512, help="training images for the small CNN")
    parser.add_argument("--epochs-tiny", type=int, default=6)
    parser.add_argument("--epochs-cnn", type=int, default=3)
    parser.add_argument("--epochs-compile", type=int, default=4)
    parser.add_argument("--epochs-gpt", type=int, default=3)
    parser.add_argument("--ddp-kit-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for the ddp_kit loops, e.g. train.log_every_steps=100")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per configuration run")
    parser.add_argument("--dir", help="scratch directory (default: a temporary one, removed afterwards)")
    parser.add_argument("--json", help="write every raw measurement to this file")
    parser.add_argument("--wait-load", type=float, metavar="L",
                        help="first wait (up to 30 min) until the 1-minute load average is below L")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return

    import importlib.util

    import torch

    for loop, package in (("lightning", "lightning"), ("accelerate", "accelerate")):
        if loop in args.loops and importlib.util.find_spec(package) is None:
            print(f"note: {package} is not installed (pip install -e '.[bench]'); skipping the {loop} loop")
            args.loops.remove(loop)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        data = {}
        for model in args.only:
            data[model] = Path(tmp) / f"{model}.h5"
            write_data(data[model], model, args.tiny_rows if model == "tiny" else args.cnn_rows)
        cases = build_cases(args)
        if args.wait_load is not None:
            deadline = time.monotonic() + 1800
            while os.getloadavg()[0] >= args.wait_load and time.monotonic() < deadline:
                print(f"waiting for the load average to fall below {args.wait_load} (now {loadavg()})", flush=True)
                time.sleep(30)
        measurements = [Measurement(replace(c, data=str(data[c.model]))) for c in cases]
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {len(cases)} configurations x {args.repeats} "
              f"repeats; load average {loadavg()}", flush=True)
        started = time.perf_counter()
        for repeat in range(args.repeats):
            # Every other repeat runs the list backwards, so no configuration always follows the same one.
            indexed = list(enumerate(measurements))
            for i, m in (indexed if repeat % 2 == 0 else indexed[::-1]):
                case = replace(m.case, workdir=str(Path(tmp) / f"r{repeat}-{i}"))
                t0 = time.perf_counter()
                # Compiled kernels are cached per configuration (its repeats share them, no other configuration
                # does): only the excluded first epoch gets faster, the steady state is the same.
                result, error = run_case(case, sys.executable, args.timeout, Path(tmp) / f"inductor-{i}")
                wall = time.perf_counter() - t0
                if result is None:
                    m.errors.append(error)
                    print(f"[{repeat + 1}/{args.repeats}] {m.case.label}: FAILED ({error.strip()[-600:]})", flush=True)
                    continue
                rate = steady_rate(result["epochs"])
                m.rates.append(rate)
                m.by_repeat[repeat] = rate
                m.losses.append(result["epochs"][-1][2])
                m.warmups.append(result["epochs"][0][1])
                settle = result.get("settle_s")
                if settle is not None:
                    m.settle_shares.append(settle / (settle + sum(e[1] for e in result["epochs"])))
                    m.settle_steps.append(settle * rate / (m.case.batch_size * m.case.nproc * m.case.accum))
                print(f"[{repeat + 1}/{args.repeats}] {m.case.label:28} n={m.case.nproc} {rate:10,.0f} samples/s "
                      f"(run {wall:5.1f} s, load {loadavg()})", flush=True)
        elapsed = time.perf_counter() - started

    print(f"\nsteady-state samples/s (epochs after the first), batch {args.batch_size} per process, median of "
          f"{args.repeats}; torch {torch.__version__}, {os.cpu_count()} CPUs; total {elapsed / 60:.1f} min, "
          f"load average at the end {loadavg()}\n")
    print_table(measurements)
    settling = [m for m in measurements if m.settle_shares]
    if settling:
        print("\nddp_kit's one discarded forward/backward before the first step (DDP buckets settled, so that resume "
              "is exact at 3+ processes), as a share of the run's training time (it + every epoch), and in steady "
              "optimizer steps (it holds the process's one-time warm-up, which the first step pays without it; "
              "a run of N steps pays it once):\n")
        for m in settling:
            print(f"- {m.case.label} ({m.case.nproc} processes): median {statistics.median(m.settle_shares):.3%} "
                  f"(max {max(m.settle_shares):.3%}) of this run, {statistics.median(m.settle_steps):.1f} steps")
    if args.json:
        raw = [{**asdict(m.case), "rates": m.rates, "by_repeat": m.by_repeat, "losses": m.losses,
                "warmups": m.warmups, "errors": m.errors} for m in measurements]
        Path(args.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
