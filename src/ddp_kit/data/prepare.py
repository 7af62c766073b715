"""`prepare_data`: make sure the configured data exists and is usable, once per machine, before training."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Callable

from ddp_kit.config import DataConfig
from ddp_kit.data.convert import write_digits
from ddp_kit.data.hdf5 import config_splits

BUILDERS: dict[str, Callable[[Path], None]] = {"digits": write_digits}  # data.create_if_missing choices


def create_once(path: str | os.PathLike, build: Callable[[Path], None]) -> None:
    """Run `build(path)` in exactly one of the processes racing here, unless `path` exists; the others wait
    for it. For your own data: every rank calls it before ddp_kit.train, one of them writes the file.

    The lock is an flock on a sibling `<name>.lock` file, left in place: deleting it would let a late
    process lock a fresh inode while another still holds the old one. `build` writes atomically (temporary
    file + rename), so a process that does not take the lock still never sees a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            build(path)


def prepare_data(cfg: DataConfig) -> None:
    """Create the demo file if configured and missing, then validate the train and validation splits.

    Called by every process before any process group exists; raises DataError naming file and key. With
    data.path null (the datasets come from Python) there is nothing to prepare.
    """
    if cfg.path is None:
        return
    path = Path(cfg.path)
    if cfg.create_if_missing is not None and not path.exists():
        create_once(path, BUILDERS[cfg.create_if_missing])
    config_splits(cfg)
