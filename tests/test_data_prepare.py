"""prepare_data: the demo file is built once under concurrency, atomically, and is a faithful digits set."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from data_helpers import data_config
from ddp_kit.data import describe_split, prepare_data
from ddp_kit.data.hdf5 import open_h5

pytestmark = pytest.mark.timeout(120)

RACER = textwrap.dedent("""
    import os, sys, time
    import ddp_kit.data.prepare as prepare
    from ddp_kit.config import DataConfig

    path, log, go = sys.argv[1:4]
    build = prepare.BUILDERS["digits"]

    def counted_build(out):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(0.5)  # keep the build in progress while the other processes arrive
        build(out)

    prepare.BUILDERS["digits"] = counted_build
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    prepare.prepare_data(DataConfig(path=path, create_if_missing="digits"))
""")


def test_three_processes_racing_build_the_file_once(tmp_path):
    path, log, go = tmp_path / "data" / "digits.h5", tmp_path / "builds.log", tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(path), str(log), str(go)]) for _ in range(3)]
    go.touch()
    assert [racer.wait(timeout=90) for racer in racers] == [0, 0, 0]
    assert len(log.read_text().split()) == 1, "exactly one process built the file"
    assert sorted(p.name for p in path.parent.iterdir()) == ["digits.h5", "digits.h5.lock"], "no temp files left"
    assert describe_split(path, group="train").length + describe_split(path, group="val").length == 1797


def test_existing_file_is_only_validated(tmp_path):
    cfg = data_config(tmp_path / "digits.h5", create_if_missing="digits")
    prepare_data(cfg)
    before = (tmp_path / "digits.h5").stat().st_mtime_ns
    prepare_data(cfg)
    assert (tmp_path / "digits.h5").stat().st_mtime_ns == before


def test_digits_are_faithful_stratified_and_labelled(tmp_path):
    from sklearn.datasets import load_digits

    prepare_data(data_config(tmp_path / "digits.h5", create_if_missing="digits"))
    with open_h5(tmp_path / "digits.h5") as f:
        (x_train, y_train), (x_val, y_val) = [(f[g]["images"][()], f[g]["labels"][()]) for g in ("train", "val")]
        assert list(f["train/labels"].attrs["class_names"].astype(str)) == [str(d) for d in range(10)]
        assert f["train/labels"].attrs["num_classes"] == 10
    assert x_train.shape == (1437, 1, 32, 32) and x_val.shape == (360, 1, 32, 32)
    assert x_train.dtype == np.uint8 and x_train.max() == 255 and x_train.min() == 0
    assert np.bincount(y_val).min() >= 35, "every class is in the validation split (stratified)"
    # Upsampling keeps the digits: 4x4 average pooling gives back the 8x8 originals (scaled) closely.
    originals = {o.tobytes(): o for o in load_digits().images * (255 / 16)}
    pooled = x_val[:, 0].reshape(360, 8, 4, 8, 4).astype(float).mean(axis=(2, 4))
    nearest = [min(originals.values(), key=lambda o: np.abs(o - p).mean()) for p in pooled[:20]]
    assert np.mean([np.abs(o - p).mean() for o, p in zip(nearest, pooled[:20])]) < 20
    # Classes stay separable: a 1-nearest-neighbour classifier is as accurate as on the 8x8 originals.
    train, val = x_train.reshape(1437, -1).astype(np.float32), x_val.reshape(360, -1).astype(np.float32)
    distances = (val**2).sum(1)[:, None] + (train**2).sum(1)[None] - 2 * val @ train.T
    assert np.mean(y_train[distances.argmin(1)] == y_val) >= 0.95
