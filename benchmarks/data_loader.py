"""HDF5 loading throughput and worker memory: naive per-sample reads vs ddp_kit's batched readers.

One run generates an uncompressed and a gzip file of --size-mb of CIFAR-like images in a temporary
directory and, for 0 and 2 DataLoader workers, measures samples/s of
  naive      a Dataset that opens the file lazily and reads ONE sample per __getitem__, DataLoader(batch_size)
  full       ddp_kit, shuffle: full  (per-sample random order, read as sorted runs, one call per batch)
  chunk      ddp_kit, shuffle: chunk (shuffled ~1 MiB blocks, rows shuffled within a window of blocks)
  in-memory  ddp_kit, in_memory: true with chunk order: the same pipeline with the images already in RAM,
             the bound for any file-based reader
and, with 2 workers, the largest USS (memory unique to the process) of each worker.

    python benchmarks/data_loader.py                      # ~150 MB files, a few minutes on 2 cores
    python benchmarks/data_loader.py --size-mb 1024 --methods chunk full --workers 2   # 1 GB memory check

Files are freshly written, so they are read from the page cache: this measures the reader's CPU cost, not
the disk. The numbers in docs/data.md come from this script.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

import h5py
import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, Dataset

from ddp_kit.config import DataConfig
from ddp_kit.data import H5Dataset, build_dataloaders, describe_split
from ddp_kit.data.writer import SplitWriter, atomic_h5

METHODS = ("naive", "full", "chunk", "in-memory")
GENERATE_ROWS = 4096  # rows generated and written per step, so a 1 GB file never sits in RAM twice


def synthetic_images(rng: np.random.Generator, n: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Smooth blobs plus noise: compresses about like natural images (not at all like pure noise)."""
    c, h, w = shape
    coarse = rng.integers(0, 256, size=(n, c, -(-h // 8), -(-w // 8)), dtype=np.uint8)
    smooth = coarse.repeat(8, axis=2).repeat(8, axis=3)[:, :, :h, :w]
    return smooth ^ rng.integers(0, 16, size=(n, c, h, w), dtype=np.uint8)


def write_file(path: Path, rows: int, shape: tuple[int, int, int], compression, chunk_rows=None) -> None:
    rng = np.random.default_rng(0)
    with atomic_h5(path) as f:
        for group, length in (("train", rows), ("val", 256)):
            writer = SplitWriter(f, group, length=length, row_shape=shape, dtype=np.uint8, compression=compression,
                                 chunk_rows=chunk_rows)
            for start in range(0, length, GENERATE_ROWS):
                count = min(GENERATE_ROWS, length - start)
                writer.write(synthetic_images(rng, count, shape), rng.integers(0, 10, count))
            writer.finish()


class NaiveDataset(Dataset):
    """The common pattern: lazy open, default HDF5 settings, one sample per __getitem__."""

    def __init__(self, path: Path):
        self.path = path
        self.images = self.labels = None
        with h5py.File(path, "r") as f:
            self.length = len(f["train/labels"])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if self.images is None:
            f = h5py.File(self.path, "r")
            self.images, self.labels = f["train/images"], f["train/labels"]
        return torch.from_numpy(self.images[i]), int(self.labels[i])


class WorkerMemory:
    """Samples the USS of this process's children (the DataLoader workers) in a background thread."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for child in psutil.Process().children(recursive=True):
                try:
                    uss = child.memory_full_info().uss
                except psutil.Error:  # a worker may exit between listing and reading
                    continue
                self.peak[child.pid] = max(self.peak.get(child.pid, 0), uss)

    def __enter__(self) -> "WorkerMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def make_loader(method: str, path: Path, workers: int, batch_size: int, **data_settings):
    """(DataLoader, set_epoch or None) for one method; `data_settings` (DataConfig fields) apply to ddp_kit's."""
    if method == "naive":
        loader = DataLoader(NaiveDataset(path), batch_size=batch_size, shuffle=True, num_workers=workers,
                            persistent_workers=workers > 0)
        return loader, None
    cfg = DataConfig(path=str(path), num_workers=workers, shuffle="full" if method == "full" else "chunk",
                     in_memory=method == "in-memory", **data_settings)
    built = build_dataloaders(cfg, batch_size=batch_size, val_batch_size=batch_size, rank=0, world_size=1, seed=0,
                              device=torch.device("cpu"), class_counts={"label": 10}, image_channels=3)
    return built.train, built.train_sampler.set_epoch


def samples_per_second(loader: DataLoader, set_epoch, seconds: float, windows: int) -> float:
    """Iterate epochs through `windows` timed windows of `seconds` each, after the first batch (worker
    start-up is not timed), and return the best window's rate: other jobs on the machine only ever slow a
    window down, so the best one is the closest to the loader's own speed."""
    rates, samples, start = [], 0, None
    for epoch in itertools.count():
        if set_epoch is not None:
            set_epoch(epoch)
        for fields, rows in loader:  # ddp_kit's batches; the naive loader's are (images, labels)
            now = time.perf_counter()
            if start is not None:
                samples += len(rows)
                if now - start < seconds:
                    continue
                rates.append(samples / (now - start))
                if len(rates) == windows:
                    return max(rates)
            samples, start = 0, time.perf_counter()
    raise AssertionError("unreachable: epochs repeat until the windows are done")


def block_reads_per_epoch(path: Path, workers: int, batch_size: int, *, order_for_workers: bool) -> int:
    """Blocks read in one chunk-shuffled epoch by `workers` DataLoader workers, replayed in this process: one
    copy of ddp_kit's dataset per worker (each with its own block cache, as a worker has), batches handed out
    round-robin as the DataLoader does, in the sampler's order for `workers` or in plain sampling order."""
    loader, set_epoch = make_loader("chunk", path, workers, batch_size)
    set_epoch(0, order_workers=None if order_for_workers else 0)
    replicas = [copy.copy(loader.dataset) for _ in range(workers)]  # copies start without handle or cache
    reads = 0
    read_block = H5Dataset._block

    def counted_block(dataset: H5Dataset, info, block: int):
        nonlocal reads
        reads += (info.name, block) not in dataset._blocks and info.name == "image"  # the images' blocks
        return read_block(dataset, info, block)

    with mock.patch.object(H5Dataset, "_block", counted_block):
        for position, rows in enumerate(loader.sampler):
            replicas[position % workers][rows]
    for replica in replicas:
        replica.close()
    return reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=150, help="size of the training images per file")
    parser.add_argument("--shape", type=int, nargs=3, default=(3, 32, 32), help="C H W of one image")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows per measurement; the best counts")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--compressions", nargs="+", choices=("none", "gzip", "lzf"), default=["none", "gzip"])
    parser.add_argument("--chunk-rows", type=int, help="rows per HDF5 chunk (default: the writer's, ~1 MiB)")
    parser.add_argument("--prefetch-factor", type=int, help="batches prefetched per worker (default: ddp_kit's)")
    parser.add_argument("--worker-sharing-strategy", choices=("file_system", "file_descriptor"),
                        default=DataConfig.worker_sharing_strategy, help="how ddp_kit's workers hand over batches")
    parser.add_argument("--dir", help="where to write the files (default: a temporary directory)")
    args = parser.parse_args()

    shape = tuple(args.shape)
    rows = int(args.size_mb * 2**20 // np.prod(shape))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = {}
        for compression in args.compressions:
            path = Path(tmp) / f"{compression}.h5"
            start = time.perf_counter()
            write_file(path, rows, shape, None if compression == "none" else compression, args.chunk_rows)
            print(f"wrote {path.name}: {rows} images {shape}, {path.stat().st_size / 2**20:.0f} MiB on disk "
                  f"in {time.perf_counter() - start:.0f} s", flush=True)
            for workers, method in itertools.product(args.workers, args.methods):
                loader, set_epoch = make_loader(method, path, workers, args.batch_size,
                                                prefetch_factor=args.prefetch_factor,
                                                worker_sharing_strategy=args.worker_sharing_strategy)
                with WorkerMemory() as memory:
                    rate = samples_per_second(loader, set_epoch, args.seconds, args.windows)
                del loader  # stops persistent workers before the next measurement
                uss = max(memory.peak.values(), default=0) / 2**20
                results[compression, workers, method] = rate, uss
                print(f"  {compression:4} workers={workers} {method:9} {rate:10.0f} samples/s"
                      + (f"  worker USS max {uss:.0f} MiB" if workers else ""), flush=True)
            if compression == args.compressions[0]:
                block_reads = {w: tuple(block_reads_per_epoch(path, w, args.batch_size, order_for_workers=o)
                                        for o in (True, False)) for w in (2, 4, 8)}
                block_rows = describe_split(path, group="train").default_block_rows  # chunk mode's block

    print(f"\nsamples/s, batch {args.batch_size}, {shape} uint8, {args.size_mb:.0f} MB per file "
          "(ratios: vs naive / vs in-memory)")
    for compression, workers in itertools.product(args.compressions, args.workers):
        naive = results.get((compression, workers, "naive"), (None,))[0]
        bound = results.get((compression, workers, "in-memory"), (None,))[0]
        cells = []
        for method in args.methods:
            rate, uss = results[compression, workers, method]
            ratios = "/".join(f"{rate / ref:.1f}x" if ref else "-" for ref in (naive, bound))
            cells.append(f"{method} {rate:.0f} ({ratios}{f', USS {uss:.0f} MiB' if workers else ''})")
        print(f"{compression:4} workers={workers}: " + " | ".join(cells))

    print(f"\nblock reads per epoch with W workers ({math.ceil(rows / block_rows)} blocks of {block_rows} rows): "
          "batches ordered for the workers (ddp_kit) vs handed out in sampling order")
    for workers, (ordered, plain) in block_reads.items():
        print(f"  W={workers}: {ordered} vs {plain}")


if __name__ == "__main__":
    main()
