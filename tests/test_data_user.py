"""A user's map-style datasets (datasets=(train, val)): distributed samplers, worker seeding, exact mid-epoch
resume order and the ledger's row ids, as for HDF5."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from data_helpers import loaders
from ddp_kit.config import DataConfig, load_config
from ddp_kit.data import DataError, prepare_batch
from ddp_kit.objectives import Regression
from ddp_kit.train import train

pytestmark = pytest.mark.timeout(120)
CPU = torch.device("cpu")


class Pictures(Dataset):
    """Item i: a 1 x 2 x 3 uint8 image whose first pixel is i, and the label i % 4."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = torch.full((1, 2, 3), 7, dtype=torch.uint8)
        image[0, 0, 0] = i
        return {"image": image, "label": i % 4}


class Noisy(Pictures):
    """Pictures plus a draw from torch's global generator (the worker's seeded stream)."""

    def __getitem__(self, i):
        return {**super().__getitem__(i), "draw": torch.randint(0, 2**30, ())}


class Points(Dataset):
    def __init__(self, n: int):
        generator = torch.Generator().manual_seed(n)
        self.x = torch.randn(n, 3, generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"features": self.x[i], "target": self.x[i, :1] * 2}


def user_config(**overrides) -> DataConfig:
    return DataConfig(path=None, **{"num_workers": 0, **overrides})


def check(fields, rows):
    assert torch.equal(fields["image"][:, 0, 0, 0], (rows.float() / 255 - 0.5) / 0.5)
    assert torch.equal(fields["label"], rows % 4)
    return rows.tolist()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_cover_the_datasets_once_with_workers(world_size):
    cfg = user_config(num_workers=2, multiprocessing_context="fork")
    ranks = [loaders(cfg, rank=r, world_size=world_size, batch_size=4, in_channels=1, class_counts={"label": 4},
                     datasets=(Pictures(50), Pictures(21))) for r in range(world_size)]
    assert ranks[0].field_shapes == {"image": (1, 2, 3), "label": ()} and ranks[0].sample_shape == (1, 2, 3)
    assert len({len(r.train) for r in ranks}) == 1 and ranks[0].train_size == 50
    trained, validated = [], []
    for built in ranks:
        built.train_sampler.set_epoch(2)
        trained += [i for b in built.train for i in check(*prepare_batch(b, CPU, cfg, train=True))]
        validated += [i for b in built.val for i in check(*prepare_batch(b, CPU, cfg, train=False))]
    padded = -(-50 // world_size) * world_size  # without drop_last the last rows are repeated, as torch does
    assert sorted(set(trained)) == list(range(50)) and len(trained) == padded
    assert validated == list(range(21))
    probe, rows = prepare_batch(ranks[0].train_eval.dataset[range(3)], CPU, cfg, train=False)
    assert check(probe, rows) == [0, 1, 2]


def test_workers_are_seeded_and_a_resumed_epoch_continues_the_same_order():
    cfg = user_config(num_workers=2, multiprocessing_context="fork")
    build = lambda: loaders(cfg, batch_size=5, in_channels=1, num_classes=None, datasets=(Noisy(40), Noisy(10)))
    built = build()
    built.train_sampler.set_epoch(1)
    whole = [batch for batch in built.train]
    assert sorted(i for _, rows in whole for i in rows.tolist()) == list(range(40))
    draws = [fields["draw"] for fields, _ in whole]
    assert len({int(d[0]) for d in draws[:2]}) == 2, "the two workers draw from different streams"
    again = build()
    again.train_sampler.set_epoch(1)
    assert all(torch.equal(a[0]["draw"], b[0]["draw"]) for a, b in zip(whole, again.train)), "seeded, repeatable"
    resumed = build()  # a new process after the restart
    resumed.train_sampler.set_epoch(1, start_batch=3)
    assert [rows.tolist() for _, rows in resumed.train] == [rows.tolist() for _, rows in whole[3:]]


def test_bad_user_datasets_are_refused_before_training():
    cfg = user_config()

    class Pairs(Pictures):
        def __getitem__(self, i):
            return super().__getitem__(i)["image"], i

    class Other(Pictures):
        def __getitem__(self, i):
            return {"image": super().__getitem__(i)["image"]}

    for datasets, fragment in [
        ((Pairs(4), Pictures(4)), "the train dataset (Pairs)[0] is a tuple; items must be non-empty dicts"),
        ((Pictures(4), Other(4)), "the val dataset (Other)[0] has the fields ['image']"),
        ((Pictures(4), Pictures(0)), "the val dataset (Pictures) is empty"),
        (Pictures(4), "datasets= must be a pair (train, val)"),
    ]:
        with pytest.raises(DataError) as error:
            loaders(cfg, in_channels=1, datasets=datasets)
        assert fragment in str(error.value)
    with pytest.raises(DataError, match=r"\[0\]\['image'\] has 1 channel\(s\).*model.in_channels is 3"):
        loaders(cfg, in_channels=3, datasets=(Pictures(4), Pictures(4)))
    built = loaders(cfg, in_channels=1, class_counts={"label": 3}, datasets=(Pictures(8), Pictures(4)))
    built.train_sampler.set_epoch(0)
    with pytest.raises(DataError, match=r"\[3\]\['label'\] holds 3, outside the 3 classes"):
        list(built.train)


class Line(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x):
        return self.linear(x)


def test_train_on_user_datasets_records_their_indices(tmp_path):
    cfg = load_config(None, ["data.path=null", "data.num_workers=0", "model.inputs=[features]",
                             f"run.output_dir={tmp_path}", "train.epochs=2", "train.batch_size=6",
                             "train.record_sample_ids=true", "optim.lr=0.05", "checkpoint.best_metric=null"])
    result = train(cfg, model=Line, objective=Regression(), datasets=(Points(30), Points(12)))
    assert result["status"] == "completed" and result["step"] == 10 and result["val_r2"] > 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "samples" / "rank0.jsonl").read_text().splitlines()]
    for epoch in (0, 1):
        assert sorted(i for line in lines if line["epoch"] == epoch for i in line["indices"]) == list(range(30))
    assert np.isfinite(result["val_loss"])
