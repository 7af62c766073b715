"""data.tokens: a 1-D token stream read as non-overlapping windows of context_length + 1 tokens, sampled with
the chunk-aware, exact-once, resumable order of every HDF5 split."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from data_helpers import data_config, loaders, refused
from ddp_kit.train import train
from ddp_kit.config import ConfigError, load_config
from ddp_kit.data import DataError, prepare_batch, train_batches_per_epoch, write_tokens
from ddp_kit.objectives import LanguageModel

pytestmark = pytest.mark.timeout(120)
CPU = torch.device("cpu")
CONTEXT = 4  # windows of 5 tokens


def token_file(path, n_train=203, n_val=57):
    """Tokens equal to their position (mod 1000), so a window's first token says where it was read."""
    write_tokens(path, np.arange(n_train) % 1000, group="train", chunk_rows=16)
    write_tokens(path, np.arange(n_val), group="val", append_group=True)


def token_config(path, **overrides):
    return data_config(path, **{"tokens": "tokens", "context_length": CONTEXT, **overrides})


def windows_of(fields, rows):
    """Check a prepared batch against the stream and return its window ids."""
    start = rows[:, None] * (CONTEXT + 1) + torch.arange(CONTEXT + 1)
    assert torch.equal(fields["input"], start[:, :-1]) and torch.equal(fields["target"], start[:, 1:])
    return rows.tolist()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_window_once_per_epoch_at_any_world_size(tmp_path, world_size):
    token_file(tmp_path / "t.h5")
    cfg = token_config(tmp_path / "t.h5", drop_last=True, shuffle_window=2)
    ranks = [loaders(cfg, rank=r, world_size=world_size, batch_size=3, num_classes=None, in_channels=None)
             for r in range(world_size)]
    assert ranks[0].field_shapes == {"input": (CONTEXT,), "target": (CONTEXT,)} and ranks[0].train_size == 40
    assert ranks[0].train_sampler.block_rows == 3, "16-token chunks hold 3 whole windows"
    for epoch in (0, 1):
        seen = []
        for built in ranks:
            built.train_sampler.set_epoch(epoch)
            for batch in built.train:
                seen += windows_of(*prepare_batch(batch, CPU, cfg, train=True))
        assert len(seen) == len(set(seen)) == 40 // (3 * world_size) * 3 * world_size
        assert set(seen) <= set(range(40))
    validated = [w for built in ranks for b in built.val for w in windows_of(*prepare_batch(b, CPU, cfg, train=False))]
    assert validated == list(range(57 // (CONTEXT + 1)))
    assert len(ranks[0].train) == train_batches_per_epoch(cfg, batch_size=3, world_size=world_size)


@pytest.mark.parametrize("in_memory", [False, True])
def test_a_resumed_epoch_continues_the_same_order(tmp_path, in_memory):
    token_file(tmp_path / "t.h5")
    cfg = token_config(tmp_path / "t.h5", num_workers=2, in_memory=in_memory)
    built = loaders(cfg, batch_size=4, num_classes=None, in_channels=None)
    built.train_sampler.set_epoch(3)
    whole = [windows_of(*prepare_batch(b, CPU, cfg, train=True)) for b in built.train]
    assert sorted(w for batch in whole for w in batch) == list(range(40))
    fresh = loaders(cfg, batch_size=4, num_classes=None, in_channels=None)  # a new process after the restart
    fresh.train_sampler.set_epoch(3, start_batch=4)
    assert [windows_of(*prepare_batch(b, CPU, cfg, train=True)) for b in fresh.train] == whole[4:]


def test_bad_token_streams_are_refused(tmp_path):
    write_tokens(tmp_path / "t.h5", np.arange(9), group="train")
    write_tokens(tmp_path / "t.h5", np.arange(3), group="val", append_group=True)
    refused(token_config(tmp_path / "t.h5"), "'/val/tokens' holds 3 tokens", "data.context_length + 1 = 5")
    refused(token_config(tmp_path / "t.h5", tokens="words"), "'/train/words' does not exist (data.tokens)")
    with pytest.raises(DataError, match="1-D integer array of token ids"):
        write_tokens(tmp_path / "u.h5", np.zeros((4, 2), np.int64))
    with pytest.raises(ConfigError, match="data.context_length"):
        load_config(None, [f"data.path={tmp_path / 't.h5'}", "data.tokens=tokens"])
    with pytest.raises(ConfigError, match="cannot be combined with data.fields"):
        load_config(None, [f"data.path={tmp_path / 't.h5'}", "data.tokens=tokens", "data.context_length=4",
                           "data.fields={a: b}"])


class Bigram(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(1000, 1000)

    def forward(self, tokens):
        return self.table(tokens)


def test_a_language_model_trains_on_the_stream(tmp_path):
    token_file(tmp_path / "t.h5")
    cfg = load_config(None, [f"data.path={tmp_path / 't.h5'}", "data.tokens=tokens", f"data.context_length={CONTEXT}",
                             "data.num_workers=0", "model.inputs=[input]", f"run.output_dir={tmp_path}",
                             "train.epochs=1", "train.batch_size=8", "optim.name=adamw", "optim.lr=0.01",
                             "train.record_sample_ids=true", "checkpoint.best_metric=null"])
    result = train(cfg, model=Bigram, objective=LanguageModel())
    assert result["status"] == "completed" and result["step"] == 5
    ledger = (tmp_path / "run" / "samples" / "rank0.jsonl").read_text()
    assert sorted(w for line in ledger.splitlines() for w in json.loads(line)["indices"]) == list(range(40))
