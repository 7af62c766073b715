"""Writing and converting: write_h5, the npz / image-folder / digits converters, inspection and the CLI."""

import argparse
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from PIL import Image

from data_helpers import data_config, loaders, make_arrays
from ddp_kit.data import (DataError, convert_imagefolder, convert_npz, describe_split, inspect_h5, register_cli,
                          write_h5)

pytestmark = pytest.mark.timeout(60)


def stored(path, group):
    with h5py.File(path, "r") as f:
        return f[group]["images"][()], f[group]["labels"][()], dict(f[group]["labels"].attrs)


def test_write_h5_chunks_attributes_and_append(tmp_path):
    images, labels = make_arrays(3000, (3, 16, 16))  # 768 bytes per row
    write_h5(tmp_path / "d.h5", images, labels, group="train", compression="gzip", class_names=list("abcdefghij"),
             attrs={"source": "test"})
    write_h5(tmp_path / "d.h5", images[:10, 0], labels[:10], group="val", append_group=True)  # N x H x W
    with h5py.File(tmp_path / "d.h5", "r") as f:
        train = f["train/images"]
        assert train.chunks == (1365, 3, 16, 16), "whole rows, about 1 MiB per chunk"
        assert train.compression == "gzip" and train.attrs["layout"] == "NCHW"
        assert f["train"].attrs["source"] == "test"
        attrs = f["train/labels"].attrs
        assert (attrs["num_classes"], attrs["label_min"], attrs["label_max"]) == (10, labels.min(), labels.max())
        assert list(attrs["class_names"].astype(str)) == list("abcdefghij")
        assert f["val/images"].shape == (10, 1, 16, 16)
        np.testing.assert_array_equal(train[()], images)
    with pytest.raises(DataError, match="'/val/images' already exists"):
        write_h5(tmp_path / "d.h5", images, labels, group="val", append_group=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5"], "no temporary files left behind"


def test_write_h5_refuses_bad_input_without_touching_the_file(tmp_path):
    images, labels = make_arrays(5)
    write_h5(tmp_path / "d.h5", images, labels)
    before = (tmp_path / "d.h5").read_bytes()
    for bad_images, bad_labels, match in [(images, labels[:4], "one integer per image"),
                                          (images.astype(np.int32), labels, "dtype int32"),
                                          (images, labels - 5, "labels must be class indices"),
                                          (images[:, 0, 0], labels, "shape")]:
        with pytest.raises(DataError, match=match):
            write_h5(tmp_path / "d.h5", bad_images, bad_labels)
    assert (tmp_path / "d.h5").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5"]


def test_npz_converter_shuffles_rows_keeps_pairs_and_guesses_layout(tmp_path):
    x_train, y_train = make_arrays(50, (6, 6, 3))
    x_test, y_test = make_arrays(20, (6, 6, 3), seed=1)
    np.savez(tmp_path / "a.npz", x_train=x_train, y_train=y_train[:, None], x_test=x_test, y_test=y_test)
    convert_npz(tmp_path / "a.npz", tmp_path / "d.h5",
                splits={"train": ("x_train", "y_train"), "val": ("x_test", "y_test")})
    images, labels, _ = stored(tmp_path / "d.h5", "train")
    rows = images[:, 0, 0, 0].astype(int)  # make_arrays writes the row id into the first pixel
    assert sorted(rows) == list(range(50)) and rows.tolist() != list(range(50)), "stored in a shuffled order"
    np.testing.assert_array_equal(images, x_train[rows])
    np.testing.assert_array_equal(labels, y_train[rows])
    assert describe_split(tmp_path / "d.h5", group="val").field("image").layout == "NHWC"
    convert_npz(tmp_path / "a.npz", tmp_path / "d.h5", splits={"train": ("x_test", "y_test")}, shuffle_seed=None)
    np.testing.assert_array_equal(stored(tmp_path / "d.h5", "train")[0], x_test)


def test_conversion_killed_mid_write_leaves_no_file_at_the_destination(tmp_path):
    # gzip at its highest level: the write takes seconds, long enough to be caught with data on disk.
    images = np.random.default_rng(0).integers(0, 256, size=(6000, 3, 32, 32), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=images, labels=np.zeros(6000, np.int64))
    command = [sys.executable, "-c", "import sys; from ddp_kit.data import convert_npz; "
               "convert_npz(sys.argv[1], sys.argv[2], compression='gzip')", str(tmp_path / "a.npz"),
               str(tmp_path / "d.h5")]
    process = subprocess.Popen(command, start_new_session=True)
    try:
        deadline = time.monotonic() + 50
        while not any(p.name.startswith(".d.h5.") and p.stat().st_size > 1 << 20 for p in tmp_path.iterdir()):
            assert process.poll() is None and time.monotonic() < deadline, "the conversion ended before the kill"
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
    assert not (tmp_path / "d.h5").exists(), "only the hidden temporary file may be left, never d.h5"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".d.h5.") and p.name.endswith(".tmp")]
    convert_npz(tmp_path / "a.npz", tmp_path / "d.h5", shuffle_seed=None)  # a rerun writes the whole file
    np.testing.assert_array_equal(stored(tmp_path / "d.h5", "train")[0], images)


def test_failed_conversion_leaves_no_file(tmp_path):
    x, y = make_arrays(10)
    np.savez(tmp_path / "a.npz", images=x, labels=y)
    with pytest.raises(DataError, match=r"a.npz: no array 'val_images' for split 'val'.*images, labels"):
        convert_npz(tmp_path / "a.npz", tmp_path / "d.h5",
                    splits={"train": ("images", "labels"), "val": ("val_images", "labels")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"], "train was written, but never renamed"


def make_image_folder(root):
    """Two classes of solid-colour images of various sizes and modes; colour = (class, index, 7)."""
    for label, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i, (size, mode) in enumerate([((40, 30), "RGB"), ((20, 50), "RGB"), ((33, 33), "RGBA")]):
            Image.new(mode, size, (label * 100, i * 50, 7, 255)[: len(mode)]).save(root / name / f"{i}.png")


def test_imagefolder_converter(tmp_path):
    make_image_folder(tmp_path / "tree")
    convert_imagefolder(tmp_path / "tree", tmp_path / "d.h5", size=16, batch_size=4, num_workers=0,
                        progress=False)
    images, labels, attrs = stored(tmp_path / "d.h5", "train")
    assert images.shape == (6, 3, 16, 16) and images.dtype == np.uint8
    assert list(attrs["class_names"].astype(str)) == ["cat", "dog"] and np.bincount(labels).tolist() == [3, 3]
    for image, label in zip(images, labels):
        assert (image == image[:, :1, :1]).all(), "resize + center crop of a solid image stays solid"
        assert image[0, 0, 0] == label * 100 and image[2, 0, 0] == 7
    assert sorted(images[:, 1, 0, 0].tolist()) == [0, 0, 50, 50, 100, 100]


def test_imagefolder_refuses_a_non_tree(tmp_path):
    with pytest.raises(DataError, match="not an image folder tree"):
        convert_imagefolder(tmp_path, tmp_path / "d.h5", progress=False)


def test_inspect_reports_structure_storage_and_histogram(tmp_path):
    images, labels = make_arrays(40)
    write_h5(tmp_path / "d.h5", images, labels, group="train", compression="gzip", class_names=[f"c{i}" for i in
                                                                                                 range(10)])
    with h5py.File(tmp_path / "d.h5", "a") as f:
        f["elsewhere"] = h5py.ExternalLink("other.h5", "/x")
    report = inspect_h5(tmp_path / "d.h5")
    counts = np.bincount(labels, minlength=10)
    for fragment in ["train/", "images: shape (40, 3, 4, 5), uint8, chunks (40, 3, 4, 5), gzip(4)",
                     "@layout = NCHW", "labels: shape (40,), int64, contiguous", "@num_classes = 10",
                     f"0 (c0): {counts[0]}", f"9 (c9): {counts[9]}", "label histogram (40 labels",
                     "elsewhere -> external link to other.h5:/x (not followed)"]:
        assert fragment in report, f"{fragment!r} not in:\n{report}"


def run_cli(*argv):
    parser = argparse.ArgumentParser(prog="ddp-kit")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_commands(tmp_path, capsys):
    assert run_cli("data", "digits", str(tmp_path / "digits.h5"), "--compression", "lzf") == 0
    assert describe_split(tmp_path / "digits.h5", group="val").field("image").compressed
    x, y = make_arrays(12, (5, 5))
    np.savez(tmp_path / "a.npz", x=x, y=y, vx=x[:4], vy=y[:4])
    assert run_cli("data", "npz", str(tmp_path / "a.npz"), str(tmp_path / "n.h5"), "--images-key", "x",
                   "--labels-key", "y", "--val-images-key", "vx", "--val-labels-key", "vy", "--no-shuffle") == 0
    np.testing.assert_array_equal(stored(tmp_path / "n.h5", "val")[0][:, 0], x[:4])
    make_image_folder(tmp_path / "tree")
    assert run_cli("data", "imagefolder", str(tmp_path / "tree"), str(tmp_path / "n.h5"), "--size", "8",
                   "--group", "extra", "--append", "--workers", "0") == 0
    assert describe_split(tmp_path / "n.h5", group="extra").field("image").row_shape == (3, 8, 8)
    capsys.readouterr()
    assert run_cli("data", "inspect", str(tmp_path / "n.h5")) == 0
    out = capsys.readouterr().out
    assert "extra/" in out and "train/" in out and "val/" in out
    with pytest.raises(SystemExit):
        run_cli("data")


def test_npz_fields_cli_writes_any_named_arrays_in_one_shuffled_order(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    x[:, 0] = np.arange(30)
    y, w = x[:, 1:3] * 2, np.arange(30, dtype=np.int16)
    np.savez(tmp_path / "r.npz", X=x, Y=y, w=w, vX=x[:9], vY=y[:9], vw=w[:9])
    assert run_cli("data", "npz", str(tmp_path / "r.npz"), str(tmp_path / "r.h5"), "--field", "features=X",
                   "--field", "target=Y", "--field", "w", "--chunk-rows", "8") == 0
    assert run_cli("data", "npz", str(tmp_path / "r.npz"), str(tmp_path / "r.h5"), "--group", "val", "--append",
                   "--field", "features=vX", "--field", "target=vY", "--field", "w=vw", "--no-shuffle") == 0
    with h5py.File(tmp_path / "r.h5") as f:
        features, target, weight = (f["train"][key][()] for key in ("features", "target", "w"))
        assert f["train/features"].chunks == (8, 4) and weight.dtype == np.int16
    rows = features[:, 0].astype(int)
    assert sorted(rows) == list(range(30)) and rows.tolist() != list(range(30)), "shuffled"
    np.testing.assert_array_equal(target, y[rows])
    np.testing.assert_array_equal(weight, w[rows]), "every array in the same order"
    cfg = data_config(tmp_path / "r.h5", fields={"features": "features", "target": "target", "weight": "w"})
    assert loaders(cfg, num_classes=None, in_channels=None).field_shapes == {"features": (4,), "target": (2,),
                                                                             "weight": ()}
    np.savez(tmp_path / "t.npz", X=x, Y=y)
    assert run_cli("data", "npz", str(tmp_path / "t.npz"), str(tmp_path / "all.h5"), "--all-arrays") == 0
    with h5py.File(tmp_path / "all.h5") as f:
        assert sorted(f["train"]) == ["X", "Y"]
        np.testing.assert_array_equal(f["train/Y"][()], y[f["train/X"][:, 0].astype(int)])
    with pytest.raises(DataError, match="no array 'Z'; the archive has: X, Y, w"):
        run_cli("data", "npz", str(tmp_path / "r.npz"), str(tmp_path / "z.h5"), "--field", "a=Z")
