"""torchvision transforms.v2 from the config: per image in the loader workers, per batch on the device."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from data_helpers import data_config, loaders, make_file, triples
from ddp_kit.data import DataError, prepare_images

pytestmark = pytest.mark.timeout(120)
CPU = torch.device("cpu")
HFLIP = [{"RandomHorizontalFlip": {"p": 1.0}}]


@pytest.mark.parametrize("settings", [{"num_workers": 2, "multiprocessing_context": "fork"},
                                      {"num_workers": 2, "multiprocessing_context": "spawn"},
                                      {"in_memory": True}])
def test_sample_transforms_flip_every_training_image_and_no_evaluation_image(tmp_path, settings):
    arrays = make_file(tmp_path / "d.h5", 40)
    images, labels = arrays["train"]
    built = loaders(data_config(tmp_path / "d.h5", sample_transforms=HFLIP, **settings))
    seen = []
    for x, y, ids in triples(built.train):
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 4, 5)
        np.testing.assert_array_equal(x.numpy(), images[ids.numpy()][..., ::-1])
        np.testing.assert_array_equal(y.numpy(), labels[ids.numpy()])
        seen.extend(ids.tolist())
    assert sorted(seen) == list(range(40))
    for loader, (stored, _) in ((built.val, arrays["val"]), (built.train_eval, arrays["train"])):
        for x, _, ids in triples(loader):
            np.testing.assert_array_equal(x.numpy(), stored[ids.numpy()])


def test_sample_transforms_draw_parameters_per_image(tmp_path):
    images, _ = make_file(tmp_path / "d.h5", 64)["train"]
    built = loaders(data_config(tmp_path / "d.h5", num_workers=2, sample_transforms=[
        {"RandomHorizontalFlip": {"p": 0.5}}]), batch_size=32)
    flipped_per_batch = []
    for x, _, ids in triples(built.train):
        stored = images[ids.numpy()]
        flipped = [bool(np.array_equal(got, want[..., ::-1])) for got, want in zip(x.numpy(), stored)]
        kept = [bool(np.array_equal(got, want)) for got, want in zip(x.numpy(), stored)]
        assert all(f != k for f, k in zip(flipped, kept))  # each image is either flipped or untouched
        flipped_per_batch.append(sum(flipped))
    assert all(0 < count < 32 for count in flipped_per_batch)  # both within every batch


def _flip_draws(cfg, images, epochs, *, start_batch: int = 0, **where) -> dict:
    """{(epoch, row): flipped?} from a real loader over `epochs` (the first started at `start_batch`)."""
    built = loaders(cfg, batch_size=8, **where)
    draws = {}
    for n, epoch in enumerate(epochs):
        built.train_sampler.set_epoch(epoch, start_batch=start_batch if n == 0 else 0)
        for x, _, ids in triples(built.train):
            for got, row in zip(x.numpy(), ids.tolist()):
                flipped = bool(np.array_equal(got, images[row][..., ::-1]))
                assert flipped or np.array_equal(got, images[row])
                draws[epoch, row] = flipped
    return draws


def test_sample_draws_depend_on_seed_epoch_and_row_only(tmp_path):
    images, _ = make_file(tmp_path / "d.h5", 64)["train"]
    flip = [{"RandomHorizontalFlip": {"p": 0.5}}]
    cfg = data_config(tmp_path / "d.h5", sample_transforms=flip, shuffle="none", num_workers=2,
                      persistent_workers=False)
    reference = _flip_draws(cfg, images, [0, 1])  # workers rebuilt every epoch: they used to repeat epoch 0
    assert len(reference) == 128 and 16 < sum(reference.values()) < 112
    changed = sum(reference[0, row] != reference[1, row] for row in range(64))
    assert 10 < changed < 54, "each epoch draws anew"
    assert _flip_draws(replace(cfg, persistent_workers=True), images, [0, 1]) == reference
    assert _flip_draws(replace(cfg, num_workers=0), images, [0, 1]) == reference
    assert _flip_draws(replace(cfg, shuffle="chunk"), images, [0, 1]) == reference, "draws follow the row"
    ranks = [_flip_draws(cfg, images, [1], rank=r, world_size=3) for r in range(3)]
    assert {k: v for r in ranks for k, v in r.items()} == {k: v for k, v in reference.items() if k[0] == 1}
    resumed = _flip_draws(cfg, images, [1], start_batch=3)  # a rebuilt loader, resumed mid-epoch
    assert len(resumed) == 40 and all(reference[key] == flipped for key, flipped in resumed.items())
    other_seed = _flip_draws(cfg, images, [0], seed=1)
    assert other_seed != {k: v for k, v in reference.items() if k[0] == 0}


def test_batch_transforms_run_on_the_device_batch_before_normalization(tmp_path):
    images, _ = make_file(tmp_path / "d.h5", 40)["train"]
    cfg = data_config(tmp_path / "d.h5", mean=[0.5], std=[0.25], batch_transforms=[{"RandomVerticalFlip": {"p": 0.5}}])
    built = loaders(cfg)
    outcomes = set()
    torch.manual_seed(0)
    for x, y, ids in triples(built.train):
        out = prepare_images(x, CPU, cfg, train=True, batch_transform=built.batch_transform)
        scaled = (torch.from_numpy(images[ids.numpy()]).float() / 255 - 0.5) / 0.25
        if torch.equal(out, scaled.flip(2)):
            outcomes.add("flipped")
        else:
            torch.testing.assert_close(out, scaled, rtol=0, atol=0)  # one draw for the whole batch
            outcomes.add("kept")
        evaluated = prepare_images(x, CPU, cfg, train=False)
        torch.testing.assert_close(evaluated, scaled, rtol=0, atol=0)
    assert outcomes == {"flipped", "kept"}


def test_batch_transforms_see_the_unit_scaled_batch_not_the_normalized_one(tmp_path):
    # Inversion does not commute with normalization (a flip would): 1 - x is only right before it.
    images, _ = make_file(tmp_path / "d.h5", 40)["train"]
    cfg = data_config(tmp_path / "d.h5", mean=[0.5], std=[0.25], batch_transforms=[{"RandomInvert": {"p": 1.0}}])
    built = loaders(cfg)
    for x, y, ids in triples(built.train):
        out = prepare_images(x, CPU, cfg, train=True, batch_transform=built.batch_transform, augment_seed=0)
        unit = torch.from_numpy(images[ids.numpy()]).float() / 255
        torch.testing.assert_close(out, (1 - unit - 0.5) / 0.25, rtol=0, atol=1e-6)
        assert not torch.allclose(out, 1 - (unit - 0.5) / 0.25, atol=0.1)


@pytest.mark.parametrize("key, specs, fragment", [
    ("sample_transforms", [{"RandomHorizontalFlp": {}}],
     "data.sample_transforms[0]: 'RandomHorizontalFlp' is not a torchvision.transforms.v2 transform; did you mean "
     "'RandomHorizontalFlip'?"),
    ("sample_transforms", [{"RandomHorizontalFlip": {}, "RandomVerticalFlip": {}}],
     "data.sample_transforms[0]: expected one transform written as {ClassName: {arguments}}"),
    ("batch_transforms", [{"RandomVerticalFlip": {}}, {"RandomHorizontalFlip": [0.5]}],
     "data.batch_transforms[1]: the arguments of RandomHorizontalFlip must be a mapping"),
    ("sample_transforms", [{"RandomHorizontalFlip": {"prob": 0.5}}],
     "data.sample_transforms[0]: RandomHorizontalFlip(**{'prob': 0.5}) failed"),
    ("sample_transforms", [{"RandomCrop": {"size": 2}}], "row 0 of shape (3, 4, 5) into (3, 2, 2)"),
    ("sample_transforms", [{"ToPILImage": None}], "of shape (3, 4, 5) into Image"),
    ("batch_transforms", [{"Normalize": {"mean": [0.5, 0.5], "std": [1.0, 1.0]}}],
     "data.batch_transforms: failed on a batch of"),
])
def test_bad_transforms_fail_before_training_naming_the_key(tmp_path, key, specs, fragment):
    make_file(tmp_path / "d.h5", 20)
    with pytest.raises(DataError) as err:
        loaders(data_config(tmp_path / "d.h5", **{key: specs}))
    assert fragment in str(err.value)
