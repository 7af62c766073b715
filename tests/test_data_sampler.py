"""Sampling semantics: exact coverage, disjoint ranks, lockstep batch counts, determinism, resume, contiguity."""

import functools
import itertools
import math

import numpy as np
import pytest

from ddp_kit.data.dataset import contiguous_runs
from ddp_kit.data.sampler import EpochLayout, ShardBatchSampler, TrainBatchSampler

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


def _layout_samplers(n, world_size, batch_size, accum, *, shuffle="chunk", num_workers=0, drop_last=False):
    return [TrainBatchSampler(n, batch_size=batch_size, rank=rank, world_size=world_size, seed=5, shuffle=shuffle,
                              block_rows=BLOCK, shuffle_window=WINDOW, drop_last=drop_last, num_workers=num_workers,
                              accum_steps=accum)
            for rank in range(world_size)]


def _steps(ranks, start):
    """Each optimizer step's rows (sorted, all ranks) and per-rank batch sizes, from batch `start` on."""
    per_rank = [list(s) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1, "every rank runs the same number of batches"
    k, steps = ranks[0].accum_steps, []
    first = -(start % k)  # a resumed epoch starts on a step boundary
    assert first == 0
    for i in range(0, len(per_rank[0]), k):
        batches = [b for rank in per_rank for b in rank[i:i + k]]
        assert all(len(b) > 0 for b in batches)
        steps.append(np.sort(np.concatenate(batches)))
    return steps


# (world size, batch size, accum_steps) of the three runs of one epoch, each keeping its global batch (32, 48)
LAYOUT_CHANGES = [((4, 8, 1), (2, 8, 2), (1, 8, 4)), ((2, 4, 4), (4, 8, 1), (1, 32, 1)),
                  ((1, 16, 3), (3, 8, 2), (4, 12, 1))]


@pytest.mark.parametrize("layouts", LAYOUT_CHANGES)
@pytest.mark.parametrize("n, shuffle, workers, drop_last", [(1024, "chunk", 0, False), (1000, "full", 3, False),
                                                              (997, "chunk", 2, True), (331, "none", 0, False)])
def test_an_epoch_resumed_on_other_layouts_takes_each_remaining_step_s_rows_and_every_row_once(
        layouts, n, shuffle, workers, drop_last):
    (w0, b0, k0), *later = layouts
    if drop_last and any(n < w * b for w, b, _ in layouts):
        pytest.skip("drop_last needs a global batch of rows per rank")
    epoch = 2
    first = _layout_samplers(n, w0, b0, k0, shuffle=shuffle, num_workers=workers, drop_last=drop_last)
    for s in first:
        s.set_epoch(epoch)
    reference = _steps(first, 0)
    origin = first[0].epoch_layout
    assert origin == EpochLayout(w0, b0, k0, workers)
    order = first[0].rows_in_step_order(epoch, origin)
    assert np.array_equal(np.sort(np.concatenate(reference)), np.sort(order))
    # run 1 stops after 5 steps, run 2 after 4 more (in its own steps), run 3 finishes the epoch
    done_steps, seen = 5, list(reference[:5])
    rows_done = first[0].rows_done(done_steps * k0)
    assert rows_done == sum(len(s) for s in reference[:5])
    for i, (w, b, k) in enumerate(later):
        ranks = _layout_samplers(n, w, b, k, shuffle=shuffle, num_workers=1 + i, drop_last=drop_last)
        starts = {s.resume_epoch(epoch, origin, rows_done=rows_done) for s in ranks}
        assert len(starts) == 1 and starts.pop() % k == 0
        steps = _steps(ranks, ranks[0].start_batch)
        reference_rest = reference[len(seen):]
        full = min(len(steps), len(reference_rest)) - 1  # the epoch's last step may be split differently
        assert all(np.array_equal(a, e) for a, e in zip(steps[:full], reference_rest[:full]))
        keep = 4 if i == 0 else len(steps)
        seen += steps[:keep]
        rows_done = ranks[0].rows_done(ranks[0].start_batch + keep * k)
        assert rows_done == sum(len(s) for s in seen)
    used = np.concatenate(seen)
    assert np.array_equal(np.sort(used), np.sort(order)), "every row of the epoch used as often as in one run"


def test_the_epoch_s_last_rows_are_split_evenly_and_repeated_only_when_fewer_than_the_ranks():
    first = _layout_samplers(30, 1, 10, 1)
    first[0].set_epoch(0)
    origin = first[0].epoch_layout
    for rows_done, expected_sizes in [(20, [3, 3, 2, 2]), (27, [1, 1, 1, 1])]:
        ranks = _layout_samplers(30, 4, 10, 1)
        for s in ranks:
            s.resume_epoch(0, origin, rows_done=rows_done)
        batches = [list(s) for s in ranks]
        assert [len(b[0]) for b in batches] == expected_sizes and all(len(b) == 1 for b in batches)
        rest = np.concatenate([b[0] for b in batches])
        assert set(rest.tolist()) == set(first[0].rows_in_step_order(0, origin)[rows_done:].tolist())


def test_resuming_on_the_same_layout_is_the_plain_mid_epoch_skip():
    ranks = _layout_samplers(N, 2, BATCH, 2, num_workers=3)
    for s in ranks:
        s.set_epoch(1)
    whole = [list(s) for s in ranks]
    origin = ranks[0].epoch_layout
    for s, batches in zip(_layout_samplers(N, 2, BATCH, 2), whole):
        assert s.resume_epoch(1, origin, rows_done=ranks[0].rows_done(4)) == 4 and s._dealt is None
        assert all(np.array_equal(a, b) for a, b in zip(list(s), batches[4:], strict=True))


def test_a_changed_global_batch_takes_the_rest_of_the_epoch_in_the_new_size_without_loss_or_repeat():
    first = _layout_samplers(1000, 2, 8, 1)
    for s in first:
        s.set_epoch(0)
    origin, order = first[0].epoch_layout, first[0].rows_in_step_order(0, first[0].epoch_layout)
    rows_done = first[0].rows_done(7)
    ranks = _layout_samplers(1000, 3, 8, 2)
    for s in ranks:
        s.resume_epoch(0, origin, rows_done=rows_done)
    steps = _steps(ranks, ranks[0].start_batch)
    assert [len(s) for s in steps[:-1]] == [48] * (len(steps) - 1) and 0 < len(steps[-1]) <= 48
    assert rows_done == 2 * 7 * 8 and rows_done + sum(len(s) for s in steps) == 1000
    assert np.array_equal(np.sort(np.concatenate([order[:rows_done], *steps])), np.sort(order))


def test_later_epochs_follow_the_step_order_of_the_layout_the_run_began_with():
    begun = _layout_samplers(200, 4, 5, 1)
    for s in begun:
        s.set_epoch(3)
    now = _layout_samplers(200, 1, 5, 4)
    for s in now:
        s.order_layout = begun[0].epoch_layout
        s.set_epoch(3)
    assert all(np.array_equal(a, b) for a, b in zip(_steps(now, 0), _steps(begun, 0), strict=True))
    with pytest.raises(ValueError, match="continue an epoch of .* with resume_epoch"):
        now[0].set_epoch(3, start_batch=4)


@pytest.mark.parametrize("n, drop_last", [(120, True), (120, False), (100, True), (97, False)])
def test_steps_per_epoch_are_the_begun_layout_s_on_any_layout_that_keeps_its_global_batch(n, drop_last):
    # With drop_last, 4 x 8 x 1 drops 24 of 120 rows and takes 3 steps, where 1 x 8 x 4 on its own would drop
    # none and take 4: the schedule must count the steps the run really takes.
    begun = _layout_samplers(n, 4, 8, 1, drop_last=drop_last)[0]
    for world, accum in ((2, 2), (1, 4)):
        now = _layout_samplers(n, world, 8, accum, drop_last=drop_last)
        for s in now:
            s.order_layout = begun.epoch_layout
            s.set_epoch(1)
        assert {s.micro_batches_per_epoch for s in now} == {len(now[0])}
        assert len(_steps(now, 0)) == math.ceil(begun.batches_per_epoch / begun.accum_steps)
        own = _layout_samplers(n, world, 8, accum, drop_last=drop_last)[0]
        assert own.micro_batches_per_epoch == own.batches_per_epoch
    assert _layout_samplers(120, 1, 8, 4, drop_last=True)[0].batches_per_epoch == 15  # 4 steps on its own
