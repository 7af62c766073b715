"""Bad data is refused before training with a DataError naming the file and the key."""

import h5py
import numpy as np
import pytest

from data_helpers import data_config, loaders, make_arrays, make_file, refused
from ddp_kit.data import prepare_data, write_h5

pytestmark = pytest.mark.timeout(60)


def test_missing_file(tmp_path):
    refused(data_config(tmp_path / "nope.h5"), str(tmp_path / "nope.h5"), "'/train/images'", "does not exist",
            "ddp-kit data")


def test_missing_validation_file(tmp_path):
    make_file(tmp_path / "d.h5", groups=("train",))
    cfg = data_config(tmp_path / "d.h5", val_path=str(tmp_path / "val.h5"))
    refused(cfg, str(tmp_path / "val.h5"), "does not exist", "/val/images")


def test_missing_group_and_keys(tmp_path):
    make_file(tmp_path / "d.h5", groups=("train", "valid"))
    path = str(tmp_path / "d.h5")
    message = refused(data_config(tmp_path / "d.h5"), path, "'/val'", "data.val_group")
    assert "train, valid" in message, "the message lists what the file has"
    refused(data_config(tmp_path / "d.h5", fields={"image": "x", "label": "labels"}), path, "'/train/x'",
            "data.fields.image")
    refused(data_config(tmp_path / "d.h5", fields={"image": "images", "label": "y"}), path, "'/train/y'",
            "data.fields.label")


def test_truncated_file(tmp_path):
    make_file(tmp_path / "d.h5")
    data = (tmp_path / "d.h5").read_bytes()
    (tmp_path / "d.h5").write_bytes(data[: len(data) // 2])
    refused(data_config(tmp_path / "d.h5"), str(tmp_path / "d.h5"), "truncated", "/train/images")


def test_non_hdf5_file(tmp_path):
    (tmp_path / "d.h5").write_text("images,labels\n1,2\n")
    refused(data_config(tmp_path / "d.h5"), str(tmp_path / "d.h5"), "not HDF5", "/train/images")


def test_mismatched_lengths(tmp_path):
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["train/images"] = np.zeros((10, 3, 4, 4), np.uint8)
        f["train/labels"] = np.zeros(9, np.int64)
    refused(data_config(tmp_path / "d.h5"), str(tmp_path / "d.h5"), "'/train/images' has 10 rows",
            "'/train/labels' has 9")


@pytest.mark.parametrize("images, labels, fragment", [
    (np.zeros((4, 3, 2, 2), np.int16), np.zeros(4, np.int64), "dtype int16"),
    (np.zeros((4, 12), np.uint8), np.zeros(4, np.int64), "shape (4, 12)"),
    (np.zeros((0, 3, 2, 2), np.uint8), np.zeros(0, np.int64), "empty"),
])
def test_unusable_shapes_and_dtypes(tmp_path, images, labels, fragment):
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["train/images"], f["train/labels"] = images, labels
    refused(data_config(tmp_path / "d.h5"), str(tmp_path / "d.h5"), "/train/", fragment)


def test_key_of_the_wrong_kind(tmp_path):
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["train"] = np.zeros(3)
        f.create_group("val/images")
    refused(data_config(tmp_path / "d.h5"), "'/train' is a dataset, not a group", "data.train_group")
    refused(data_config(tmp_path / "d.h5", train_group="val"), "'/val/images' is a group", "data.fields.image")


@pytest.mark.parametrize("bad", [10, -1])
def test_labels_outside_num_classes(tmp_path, bad):
    images, labels = make_arrays(20)
    labels[13] = bad
    with h5py.File(tmp_path / "d.h5", "w") as f:  # no label-range attributes: the labels themselves are checked
        f["train/images"], f["train/labels"] = images, labels
        f["val/images"], f["val/labels"] = images, np.zeros(20, np.int64)
    message = refused(data_config(tmp_path / "d.h5"), str(tmp_path / "d.h5"), "'/train/labels'",
                      "model.num_classes is 10", only_when_loading=True, num_classes=10)
    assert f"row 13 is {bad}" in message
    if bad == 10:
        assert loaders(data_config(tmp_path / "d.h5"), num_classes=11).train_size == 20


def test_wrong_channels(tmp_path):
    make_file(tmp_path / "d.h5")
    refused(data_config(tmp_path / "d.h5"), str(tmp_path / "d.h5"), "'/train/images' has 3 channel(s)",
            "model.in_channels is 1", only_when_loading=True, in_channels=1)


def test_wrong_channels_suggests_the_layout(tmp_path):
    images, labels = make_arrays(8, (5, 5, 3))
    with h5py.File(tmp_path / "d.h5", "w") as f:  # NHWC images without a layout attribute
        f["train/images"], f["train/labels"] = images, labels
        f["val/images"], f["val/labels"] = images, labels
    refused(data_config(tmp_path / "d.h5"), "data.layout: NHWC", only_when_loading=True, in_channels=3)
    assert loaders(data_config(tmp_path / "d.h5", layout="NHWC")).train_size == 8


def test_splits_with_different_image_sizes(tmp_path):
    write_h5(tmp_path / "d.h5", *make_arrays(8, (3, 4, 5)), group="train")
    write_h5(tmp_path / "d.h5", *make_arrays(8, (3, 5, 4)), group="val", append_group=True)
    refused(data_config(tmp_path / "d.h5"), "'/val/images' holds rows of shape (3, 5, 4)", "(3, 4, 5)",
            only_when_loading=True, in_channels=3)


def test_layout_conflict(tmp_path):
    make_file(tmp_path / "d.h5", layout="NHWC", shape=(4, 4, 3))
    refused(data_config(tmp_path / "d.h5", layout="NCHW"), "declares layout NHWC", "data.layout is NCHW")


def external_link_file(tmp_path):
    make_file(tmp_path / "source.h5", 30)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["train/images"] = h5py.ExternalLink("source.h5", "/train/images")
        f["train/labels"] = h5py.ExternalLink("source.h5", "/train/labels")
        f["val"] = h5py.ExternalLink("source.h5", "/val")
    return "external link", "'/train/images'"


def external_storage_file(tmp_path):
    images, labels = make_arrays(30)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        for group in ("train", "val"):
            raw = str(tmp_path / f"{group}.raw")
            f.create_dataset(f"{group}/images", data=images, external=[(raw, 0, images.nbytes)])
            f[f"{group}/labels"] = labels
    return "external storage", "train.raw"


def virtual_dataset_file(tmp_path):
    make_file(tmp_path / "source.h5", 30)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        for group in ("train", "val"):
            for key, shape, dtype in (("images", (30, 3, 4, 5), np.uint8), ("labels", (30,), np.int64)):
                layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
                layout[:] = h5py.VirtualSource(str(tmp_path / "source.h5"), f"{group}/{key}", shape=shape)
                f.create_virtual_dataset(f"{group}/{key}", layout)
        f["train_alias"] = h5py.SoftLink("/train")
    return "virtual dataset", "source.h5"


@pytest.mark.parametrize("make", [external_link_file, external_storage_file, virtual_dataset_file])
def test_data_outside_the_file_needs_the_switch(tmp_path, make):
    feature, detail = make(tmp_path)
    refused(data_config(tmp_path / "d.h5"), str(tmp_path / "d.h5"), "/train/images", feature, detail,
            "data.allow_external_storage")
    allowed = data_config(tmp_path / "d.h5", allow_external_storage=True)
    prepare_data(allowed)
    built = loaders(allowed)
    built.train_sampler.set_epoch(0)
    fields, rows = next(iter(built.train))
    np.testing.assert_array_equal(fields["image"].numpy(), make_arrays(30)[0][rows.numpy()])


def test_soft_link_to_a_virtual_dataset_is_refused_too(tmp_path):
    virtual_dataset_file(tmp_path)
    refused(data_config(tmp_path / "d.h5", train_group="train_alias"), "'/train_alias/images'", "virtual dataset")
