"""prepare_images and prepare_batch: scaling, normalization, per-sample augmentation, memory format,
reproducibility."""

import torch

from ddp_kit.config import DataConfig
from ddp_kit.data import prepare_batch, prepare_images

CPU = torch.device("cpu")


def test_uint8_is_scaled_and_normalized_per_channel():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2).contiguous()
    cfg = DataConfig(mean=[0.5, 0.2, 0.0], std=[0.5, 0.1, 2.0])
    fields, rows = prepare_batch(({"image": images, "label": torch.tensor([1, 2])}, torch.tensor([5, 9])), CPU, cfg,
                                 train=False)
    x, y = fields["image"], fields["label"]  # the image field prepared, the others as stored
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.tolist() == [1, 2] and rows.tolist() == [5, 9]
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-1.0, 0.0, 0.5]))


def test_float_images_are_taken_as_scaled_and_not_modified_in_place():
    images = torch.full((2, 1, 3, 3), 0.75)
    x = prepare_images(images, CPU, DataConfig(), train=True)
    torch.testing.assert_close(x, torch.full((2, 1, 3, 3), 0.5))
    assert torch.equal(images, torch.full((2, 1, 3, 3), 0.75)), "the loader's batch must stay untouched"


def test_channels_last_and_channels_last_input():
    nhwc = torch.randint(0, 256, (4, 6, 6, 3), dtype=torch.uint8)
    images = nhwc.permute(0, 3, 1, 2)  # what the dataset returns for an NHWC file
    x = prepare_images(images, CPU, DataConfig(), train=False, channels_last=True)
    assert x.shape == (4, 3, 6, 6) and x.is_contiguous(memory_format=torch.channels_last)
    plain = prepare_images(images, CPU, DataConfig(), train=False)
    assert plain.is_contiguous() and torch.equal(plain, x)


def test_random_crop_shifts_each_image_within_the_padding():
    padding = 2
    images = torch.randint(1, 256, (64, 2, 8, 8), dtype=torch.uint8)
    cfg = DataConfig(mean=[0.0], std=[1.0], random_crop_padding=padding)
    torch.manual_seed(0)
    x = prepare_images(images, CPU, cfg, train=True)
    assert x.shape == images.shape
    padded = torch.nn.functional.pad(images.float() / 255, (padding,) * 4)
    offsets = set()
    for i in range(64):
        matches = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
                   if torch.allclose(padded[i, :, dy:dy + 8, dx:dx + 8], x[i])]
        assert matches, f"image {i} is not a crop of its padded original"
        offsets.add(matches[0])
    assert len(offsets) > 5, "offsets are drawn per sample"
    evaluation = prepare_images(images, CPU, cfg, train=False)
    assert torch.equal(evaluation, images.float() / 255), "no augmentation outside training"


def test_horizontal_flip_per_sample():
    images = torch.randint(0, 256, (64, 1, 5, 5), dtype=torch.uint8)
    cfg = DataConfig(mean=[0.0], std=[1.0], horizontal_flip=True)
    x = prepare_images(images, CPU, cfg, train=True)
    original, flipped = images.float() / 255, images.flip(3).float() / 255
    same = [torch.equal(x[i], original[i]) for i in range(64)]
    mirrored = [torch.equal(x[i], flipped[i]) for i in range(64)]
    assert all(a or b for a, b in zip(same, mirrored))
    assert 10 < sum(mirrored) < 54


def test_augmentation_draws_from_its_seed_and_leaves_the_global_generator_alone():
    images = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    cfg = DataConfig(mean=[0.5], std=[0.25], random_crop_padding=4, horizontal_flip=True)
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    first = prepare_images(images, CPU, cfg, train=True, augment_seed=7)
    assert torch.equal(torch.rand(4), expected_next), "a seeded draw consumes nothing of the global stream"
    assert torch.equal(prepare_images(images, CPU, cfg, train=True, augment_seed=7), first)
    assert not torch.equal(prepare_images(images, CPU, cfg, train=True, augment_seed=8), first)
    runs = []
    for _ in range(2):  # without a seed: the global generator, reproducible with torch.manual_seed
        torch.manual_seed(123)
        runs.append(prepare_images(images, CPU, cfg, train=True))
    assert torch.equal(*runs) and not torch.equal(runs[0], prepare_images(images, CPU, cfg, train=True))
