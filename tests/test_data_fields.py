"""data.fields: any named HDF5 datasets as the batch's fields, read through build_dataloaders and prepare_batch."""

import h5py
import numpy as np
import pytest
import torch

from data_helpers import data_config, loaders, refused
from ddp_kit.config import ConfigError, load_config
from ddp_kit.data import DataError, describe_split, prepare_batch, write_fields

pytestmark = pytest.mark.timeout(120)
CPU = torch.device("cpu")
REGRESSION = {"features": "x", "target": "y", "weight": "w"}


def regression_file(path, n=(45, 17)):
    """Float features (row id in column 0), a 3-output target and a weight per row, in train/ and val/."""
    arrays = {}
    for i, (group, rows) in enumerate(zip(("train", "val"), n)):
        rng = np.random.default_rng(i)
        x = rng.normal(size=(rows, 6)).astype(np.float32)
        x[:, 0] = np.arange(rows)
        arrays[group] = {"x": x, "y": rng.normal(size=(rows, 3)), "w": rng.uniform(size=rows).astype(np.float32)}
        write_fields(path, arrays[group], group=group, chunk_rows=8, append_group=i > 0)
    return arrays


def segmentation_file(path, n=30):
    rng = np.random.default_rng(0)
    arrays = {}
    for i, group in enumerate(("train", "val")):
        images = rng.integers(0, 256, size=(n, 3, 4, 5), dtype=np.uint8)
        arrays[group] = {"images": images, "masks": rng.integers(0, 3, size=(n, 4, 5)).astype(np.int64)}
        write_fields(path, arrays[group], group=group, chunk_rows=4, append_group=i > 0)
    return arrays


@pytest.mark.parametrize("in_memory", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_regression_fields_cover_every_row_once_at_any_world_size(tmp_path, world_size, in_memory):
    arrays = regression_file(tmp_path / "r.h5")
    cfg = data_config(tmp_path / "r.h5", fields=REGRESSION, in_memory=in_memory, drop_last=True)
    ranks = [loaders(cfg, rank=r, world_size=world_size, batch_size=4, num_classes=None, in_channels=None)
             for r in range(world_size)]
    assert ranks[0].field_shapes == {"features": (6,), "target": (3,), "weight": ()}
    assert ranks[0].sample_shape is None
    trained, validated = [], []
    for built in ranks:
        built.train_sampler.set_epoch(1)
        for split, loader, seen in (("train", built.train, trained), ("val", built.val, validated)):
            for fields, rows in (prepare_batch(b, CPU, cfg, train=split == "train") for b in loader):
                assert rows.dtype == torch.int64 and set(fields) == set(REGRESSION)
                for name, key in REGRESSION.items():
                    expected = torch.from_numpy(arrays[split][key][rows.numpy()])
                    assert fields[name].dtype == expected.dtype and torch.equal(fields[name], expected), name
                seen.extend(rows.tolist())
    per_rank = 45 // (4 * world_size) * 4
    assert len(trained) == len(set(trained)) == per_rank * world_size
    assert validated == list(range(17))
    probe, rows = prepare_batch(ranks[0].train_eval.dataset[range(5)], CPU, cfg, train=False)
    assert rows.tolist() == list(range(5)) and torch.equal(probe["target"], torch.from_numpy(arrays["train"]["y"][:5]))


@pytest.mark.parametrize("world_size", [1, 2])
def test_segmentation_image_and_mask(tmp_path, world_size):
    arrays = segmentation_file(tmp_path / "s.h5")
    cfg = data_config(tmp_path / "s.h5", fields={"image": "images", "mask": "masks"}, mean=[0.5], std=[0.25])
    ranks = [loaders(cfg, rank=r, world_size=world_size, num_classes=None) for r in range(world_size)]
    assert ranks[0].field_shapes == {"image": (3, 4, 5), "mask": (4, 5)} and ranks[0].sample_shape == (3, 4, 5)
    seen = []
    for built in ranks:
        built.train_sampler.set_epoch(0)
        for fields, rows in (prepare_batch(b, CPU, cfg, train=True) for b in built.train):
            images = torch.from_numpy(arrays["train"]["images"][rows.numpy()]).float() / 255
            assert torch.equal(fields["image"], (images - 0.5) / 0.25), "images: float, normalized"
            assert torch.equal(fields["mask"], torch.from_numpy(arrays["train"]["masks"][rows.numpy()])), "as stored"
            seen.extend(rows.tolist())
    assert sorted(seen) == list(range(30))
    masks_checked = loaders(cfg, class_counts={"mask": 3}, num_classes=None)
    assert masks_checked.train_size == 30
    message = refused(cfg, "'/train/masks'", "row ", "outside the 2 classes of field 'mask'", only_when_loading=True,
                      num_classes=None, class_counts={"mask": 2})
    assert "is 2" in message


def test_labels_with_trailing_singleton_dimensions_arrive_as_one_value_per_row(tmp_path):
    # PatchCamelyon stores its labels as N x 1 x 1 x 1.
    images = np.zeros((12, 1, 2, 2), np.uint8)
    labels = (np.arange(12) % 2).reshape(12, 1, 1, 1).astype(np.uint8)
    for i, group in enumerate(("train", "val")):
        write_fields(tmp_path / "p.h5", {"x": images, "y": labels}, group=group, append_group=i > 0)
    cfg = data_config(tmp_path / "p.h5", fields={"image": "x", "label": "y"})
    built = loaders(cfg, num_classes=2, in_channels=1)
    assert built.field_shapes["label"] == ()
    fields, rows = prepare_batch(built.train_eval.dataset[range(12)], CPU, cfg, train=False)
    assert fields["label"].shape == (12,) and fields["label"].tolist() == (np.arange(12) % 2).tolist()
    refused(cfg, "'/train/y'", "row 1 is 1", only_when_loading=True, num_classes=1, in_channels=1)


def test_the_chunk_block_comes_from_the_widest_chunked_field(tmp_path):
    with h5py.File(tmp_path / "c.h5", "w") as f:
        for group in ("train", "val"):
            f.create_dataset(f"{group}/big", data=np.zeros((64, 100), np.float32), chunks=(8, 100))
            f.create_dataset(f"{group}/small", data=np.zeros(64, np.int64), chunks=(32,))
    split = describe_split(tmp_path / "c.h5", group="train", fields={"a": "big", "b": "small"})
    assert split.default_block_rows == 8
    built = loaders(data_config(tmp_path / "c.h5", fields={"a": "big", "b": "small"}), num_classes=None)
    assert built.train_sampler.block_rows == 8


def test_missing_fields_and_different_lengths_are_refused(tmp_path):
    regression_file(tmp_path / "r.h5")
    path = str(tmp_path / "r.h5")
    refused(data_config(tmp_path / "r.h5", fields={**REGRESSION, "weight": "weights"}), path, "'/train/weights'",
            "does not exist (data.fields.weight)", "contains: w, x, y")
    with h5py.File(tmp_path / "r.h5", "a") as f:
        f["train/short"] = np.zeros(44, np.float32)
    refused(data_config(tmp_path / "r.h5", fields={**REGRESSION, "extra": "short"}), path,
            "the fields have different lengths", "'/train/x' has 45 rows", "'/train/short' has 44 rows")
    with h5py.File(tmp_path / "r.h5", "a") as f:
        f["train/names"] = np.array([b"a"] * 45)
    refused(data_config(tmp_path / "r.h5", fields={"features": "x", "name": "names"}), path, "'/train/names'",
            "cannot become a tensor")
    refused(data_config(tmp_path / "r.h5", fields=REGRESSION, image_fields=["features"]), "'/train/x' has shape",
            "image field")


def test_moved_and_bad_config_keys_name_what_to_use(tmp_path):
    regression_file(tmp_path / "r.h5")
    for old in ("images_key", "labels_key"):
        with pytest.raises(ConfigError, match=f"'data.{old}' has moved: use data.fields"):
            load_config(None, [f"data.path={tmp_path / 'r.h5'}", f"data.{old}=x"])
    with pytest.raises(ConfigError, match=r"data.image_fields.*not among data.fields"):
        load_config(None, [f"data.path={tmp_path / 'r.h5'}", "data.fields={a: x}", "data.image_fields=[image]"])
    cfg = load_config(None, [f"data.path={tmp_path / 'r.h5'}", "data.fields={features: x, target: y}"])
    assert cfg.data.fields == {"features": "x", "target": "y"}


def test_write_fields_refuses_rows_that_do_not_line_up(tmp_path):
    with pytest.raises(DataError, match="same number of rows.*a: 3, b: 2"):
        write_fields(tmp_path / "w.h5", {"a": np.zeros(3), "b": np.zeros(2)})
    assert not (tmp_path / "w.h5").exists()
    write_fields(tmp_path / "w.h5", {"a": np.zeros((3, 2, 2, 2), np.uint8)}, layouts={"a": "NHWC"}, chunk_rows=2)
    with h5py.File(tmp_path / "w.h5") as f:
        assert f["a"].attrs["layout"] == "NHWC" and f["a"].chunks == (2, 2, 2, 2)
