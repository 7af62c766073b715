"""Random draws as a function of what they are drawn for, not of which process draws them or when.

A sample's augmentation is drawn from generators seeded by (run seed, epoch, row id), a training batch's
device-side augmentation by (run seed, epoch, batch position, rank). So draws differ from epoch to epoch,
are identical after a resume at any point, and do not depend on the number of loader workers, on whether
workers persist across epochs, or on what else consumed random numbers before (dropout, another transform).
torchvision's transforms draw from torch's global generator, so `seeded` points it (and Python's and
NumPy's) at such a seed for the duration of one draw.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import struct
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import get_worker_info


def draw_seed(*words: int) -> int:
    """A 63-bit seed mixing all `words` by hashing ((1, 23) and (12, 3) never collide, as a sum would)."""
    packed = struct.pack(f"<{len(words)}Q", *(w % 2**64 for w in words))
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> 1


def _seed_generators(seed: int, cuda_devices: Sequence[int], torch_only: bool) -> None:
    # Not torch.manual_seed: it would reseed every visible GPU's generator, not only the ones asked for.
    torch.random.default_generator.manual_seed(seed)
    for index in cuda_devices:
        with torch.cuda.device(index):
            torch.cuda.manual_seed(seed)
    if not torch_only:
        random.seed(seed)
        np.random.seed(seed % 2**32)


@contextlib.contextmanager
def seeded(seed: int, devices: Sequence[torch.device] = (), *, torch_only: bool = False) -> Iterator[None]:
    """Inside the block, torch's CPU generator (and that of each CUDA device in `devices`), Python's `random`
    and NumPy's global generator (not with `torch_only`, enough for torchvision's transforms) start from
    `seed`; afterwards each continues as if the block had not run. In a DataLoader worker, whose generators
    serve nothing but such draws, they are only seeded (restoring NumPy's state alone costs ~50 us, more than
    most per-image transforms)."""
    cuda = [d.index if d.index is not None else torch.cuda.current_device() for d in devices if d.type == "cuda"]
    if get_worker_info() is not None and not cuda:
        _seed_generators(seed, cuda, torch_only)
        yield
        return
    python_state, numpy_state = (None, None) if torch_only else (random.getstate(), np.random.get_state())
    try:
        with torch.random.fork_rng(devices=cuda):
            _seed_generators(seed, cuda, torch_only)
            yield
    finally:
        if not torch_only:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
