"""Sampling semantics: exact coverage, disjoint ranks, lockstep batch counts, determinism, resume, contiguity."""

import functools
import itertools

import numpy as np
import pytest

from ddp_kit.data.dataset import contiguous_runs
from ddp_kit.data.sampler import ShardBatchSampler, TrainBatchSampler

N, BATCH, BLOCK, WINDOW = 103, 8, 7, 3


def samplers(world_size, *, n=N, batch_size=BATCH, shuffle="chunk", drop_last=False, seed=5, block_rows=BLOCK,
             num_workers=0):
    return [TrainBatchSampler(n, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                              shuffle=shuffle, block_rows=block_rows, shuffle_window=WINDOW, drop_last=drop_last,
                              num_workers=num_workers)
            for rank in range(world_size)]


def epoch_batches(sampler, epoch, start_batch=0):
    sampler.set_epoch(epoch, start_batch)
    return list(sampler)


@pytest.mark.parametrize("shuffle", ["chunk", "full", "none"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("num_workers", [0, 3])
def test_every_row_once_per_epoch_across_ranks(shuffle, world_size, drop_last, num_workers):
    ranks = samplers(world_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers)
    for epoch in range(3):
        per_rank = [epoch_batches(s, epoch) for s in ranks]
        counts = {len(batches) for batches in per_rank}
        assert counts == {len(ranks[0])}, "every rank must run the same number of batches"
        sizes = [[len(b) for b in batches] for batches in per_rank]
        assert all(s == sizes[0] for s in sizes), "batch sizes must match across ranks"
        assert all(size == BATCH for size in sizes[0][:-1])
        rows = np.concatenate([np.concatenate(batches) for batches in per_rank])
        seen = np.bincount(rows, minlength=N)
        if drop_last:
            assert sizes[0][-1] == BATCH
            assert seen.max() == 1, "no row twice with drop_last"
            assert 0 <= N - seen.sum() < world_size * BATCH, "only the ragged tail is dropped"
            for a, b in itertools.combinations(per_rank, 2):
                assert not set(np.concatenate(a)) & set(np.concatenate(b)), "ranks must be disjoint"
        else:
            assert seen.min() == 1, "every row at least once"
            padding = -(-N // world_size) * world_size - N
            assert seen.sum() - N == padding < world_size, "padding repeats fewer than world_size rows"


@pytest.mark.parametrize("shuffle", ["chunk", "full"])
def test_padding_repeats_the_start_of_the_epoch_order(shuffle):
    n, world = 10, 4  # 3 rows per rank, 2 of them padding
    ranks = samplers(world, n=n, batch_size=3, shuffle=shuffle, block_rows=2)
    orders = [s.epoch_rows(1) for s in ranks]
    global_order = np.concatenate(orders)
    assert sorted(global_order[:n].tolist()) == list(range(n))
    # The padding comes from the start of the epoch order, which rank 0 holds (in chunk mode rank 0 then
    # shuffles its rows within windows, so only the set is the same).
    assert len(global_order[n:]) == 2 and set(global_order[n:]) <= set(orders[0])
    if shuffle == "full":
        np.testing.assert_array_equal(global_order[n:], global_order[:2])


@pytest.mark.parametrize("shuffle", ["chunk", "full"])
def test_order_is_deterministic_and_changes_with_epoch_and_seed(shuffle):
    first, again = samplers(2, shuffle=shuffle)[1], samplers(2, shuffle=shuffle)[1]
    for epoch in range(3):
        assert all(np.array_equal(a, b) for a, b in zip(epoch_batches(first, epoch), epoch_batches(again, epoch)))
    other_seed = samplers(2, shuffle=shuffle, seed=6)[1]
    order = [first.epoch_rows(epoch) for epoch in range(3)]
    assert not np.array_equal(order[0], order[1]) and not np.array_equal(order[1], order[2])
    assert not np.array_equal(order[0], other_seed.epoch_rows(0))


def test_no_shuffle_is_file_order_in_contiguous_shards():
    ranks = samplers(3, n=30, batch_size=4, shuffle="none")
    np.testing.assert_array_equal(np.concatenate([s.epoch_rows(7) for s in ranks]), np.arange(30))


@pytest.mark.parametrize("shuffle", ["chunk", "full", "none"])
@pytest.mark.parametrize("start_batch", [0, 1, 5, 13])
def test_start_batch_gives_the_tail_of_the_epoch(shuffle, start_batch):
    sampler = samplers(2, shuffle=shuffle)[0]
    full = epoch_batches(sampler, 4)
    assert len(full) == len(sampler) == 7
    tail = epoch_batches(sampler, 4, min(start_batch, len(full)))
    expected = full[min(start_batch, len(full)):]
    assert len(tail) == len(expected) and all(np.array_equal(a, b) for a, b in zip(tail, expected))
    assert len(sampler) == 7, "len() stays the per-epoch batch count"


def test_start_batch_and_epoch_are_checked():
    sampler = samplers(1)[0]
    with pytest.raises(ValueError, match="start_batch"):
        sampler.set_epoch(0, len(sampler) + 1)
    with pytest.raises(ValueError, match="epoch"):
        sampler.set_epoch(-1)


def test_drop_last_needs_one_global_batch():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        samplers(3, n=20, drop_last=True)


def test_batches_are_sorted_so_reads_ascend():
    for batch in epoch_batches(samplers(2, shuffle="full")[0], 0):
        assert np.all(np.diff(batch) > 0)


def test_chunk_mode_reads_whole_blocks_as_contiguous_runs():
    # 960 rows in 24 blocks of 40; 2 ranks of 12 blocks; a batch is one window of 3 blocks.
    n, block, window, batch = 960, 40, 3, 120
    for rank in range(2):
        chunk = TrainBatchSampler(n, batch_size=batch, rank=rank, world_size=2, seed=1, shuffle="chunk",
                                  block_rows=block, shuffle_window=window)
        full = TrainBatchSampler(n, batch_size=batch, rank=rank, world_size=2, seed=1, shuffle="full")
        chunk_runs = [len(contiguous_runs(b)) for b in epoch_batches(chunk, 2)]
        full_runs = [len(contiguous_runs(b)) for b in epoch_batches(full, 2)]
        assert all(runs <= window for runs in chunk_runs), chunk_runs
        assert sum(chunk_runs) <= 12 < sum(full_runs) // 5
        # Rows are shuffled inside each window, not left in file order.
        assert not np.all(np.diff(chunk.epoch_rows(2)[:batch]) == 1)


def test_chunk_mode_rank_takes_contiguous_ranges_even_when_blocks_split_between_ranks():
    n, block = 1000, 64  # a rank boundary (500) falls inside a block
    for rank in range(2):
        sampler = TrainBatchSampler(n, batch_size=50, rank=rank, world_size=2, seed=3, shuffle="chunk",
                                    block_rows=block, shuffle_window=4)
        rows = np.sort(sampler.epoch_rows(0))
        assert len(contiguous_runs(rows)) <= n // block // 2 + 2


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 10, 11])
def test_validation_shards_are_disjoint_complete_and_unpadded(world_size, n):
    shards = [list(ShardBatchSampler(n, batch_size=4, rank=r, world_size=world_size)) for r in range(world_size)]
    rows = np.concatenate([np.concatenate(s) if s else np.empty(0, np.int64) for s in shards])
    np.testing.assert_array_equal(rows, np.arange(n))  # contiguous shards, in order, no repeats
    for r, batches in enumerate(shards):
        assert len(batches) == len(ShardBatchSampler(n, batch_size=4, rank=r, world_size=world_size))
        assert all(0 < len(b) <= 4 for b in batches)


@pytest.mark.parametrize("batches, workers", [(13, 4), (12, 3), (5, 2), (7, 1), (3, 4)])
def test_chunk_batches_are_interleaved_so_each_loader_worker_walks_its_own_segment(batches, workers):
    sampler = TrainBatchSampler(batches * BATCH - 3, batch_size=BATCH, rank=0, world_size=1, seed=2,
                                shuffle="chunk", block_rows=BLOCK, shuffle_window=WINDOW, num_workers=workers)
    order = sampler.batch_order()
    assert sorted(order.tolist()) == list(range(batches))
    assert order[-1] == batches - 1, "the short batch stays last"
    for worker in range(min(workers, batches)):  # worker w gets positions w, w + W, ...: consecutive batches
        turns = order[worker::workers]
        assert np.array_equal(turns, np.arange(turns[0], turns[0] + len(turns)))
    rows = sampler.epoch_rows(0)
    expected = [np.sort(rows[b * BATCH:(b + 1) * BATCH]) for b in order]
    got = epoch_batches(sampler, 0)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected)) and len(got) == batches
    resumed = epoch_batches(sampler, 0, start_batch=2)
    assert all(np.array_equal(a, b) for a, b in zip(resumed, expected[2:])) and len(resumed) == batches - 2


@pytest.mark.parametrize("shuffle", ["full", "none"])
def test_only_chunk_mode_reorders_batches_for_workers(shuffle):
    plain, with_workers = (TrainBatchSampler(N, batch_size=BATCH, rank=0, world_size=1, seed=2, shuffle=shuffle,
                                             num_workers=w) for w in (0, 4))
    assert all(np.array_equal(a, b) for a, b in zip(epoch_batches(plain, 1), epoch_batches(with_workers, 1)))


def test_a_resumed_epoch_keeps_the_order_of_the_workers_it_was_cut_for():
    make = functools.partial(TrainBatchSampler, 20 * BATCH, batch_size=BATCH, rank=0, world_size=1, seed=2,
                             shuffle="chunk", block_rows=BLOCK, shuffle_window=WINDOW)
    cut_for_four = epoch_batches(make(num_workers=4), 3)
    resumed = make(num_workers=0)
    resumed.set_epoch(3, start_batch=6, order_workers=4)
    assert all(np.array_equal(a, b) for a, b in zip(list(resumed), cut_for_four[6:], strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(epoch_batches(resumed, 3), cut_for_four))
