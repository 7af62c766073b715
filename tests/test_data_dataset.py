"""Reading: batched fetches return the right rows, handles are per process, loaders work with real workers."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import data_config, loaders, make_arrays, make_file
from ddp_kit.data import H5Dataset, describe_split, write_h5
from ddp_kit.data.dataset import held_fields

pytestmark = pytest.mark.timeout(120)
SCRIPTS = Path(__file__).parent / "scripts"


def dataset(path, group="train", **kwargs):
    split = describe_split(path, group=group)
    return H5Dataset(split, held_fields(split, in_memory=False), **kwargs)


def check_batch(batch, images, labels):
    fields, ids = batch
    x, y = fields["image"], fields["label"]
    assert x.dtype == torch.uint8 and y.dtype == torch.int64 and ids.dtype == torch.int64
    np.testing.assert_array_equal(x.numpy(), images[ids.numpy()])
    np.testing.assert_array_equal(y.numpy(), labels[ids.numpy()])


@pytest.mark.parametrize("compression", [None, "gzip"])
@pytest.mark.parametrize("block_cache", [False, True])
def test_batches_match_the_arrays_in_any_order(tmp_path, compression, block_cache):
    arrays = make_file(tmp_path / "d.h5", 100, compression=compression)
    ds = dataset(tmp_path / "d.h5", **({"block_rows": 7, "cache_blocks": 3} if block_cache else {}))
    for rows in ([0, 1, 2, 3], [99, 3, 50, 4, 5], [10, 10, 2, 10], list(range(100)), [42]):
        batch = ds[rows]
        assert batch[1].tolist() == rows, "rows come back in the order asked for"
        check_batch(batch, *arrays["train"])


def test_out_of_range_rows_are_refused(tmp_path):
    make_file(tmp_path / "d.h5", 10)
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        dataset(tmp_path / "d.h5")[[3, 10]]


@pytest.mark.parametrize("layout", ["NHWC", "NHW"])
def test_other_layouts_come_back_as_nchw(tmp_path, layout):
    shape = (4, 5, 3) if layout == "NHWC" else (4, 5)
    images, labels = make_arrays(20, shape)
    write_h5(tmp_path / "d.h5", images, labels, layout="NHWC" if layout == "NHWC" else "NCHW")
    split = describe_split(tmp_path / "d.h5")
    x = H5Dataset(split, {})[[1, 5]][0]["image"]
    expected = images[[1, 5]].transpose(0, 3, 1, 2) if layout == "NHWC" else images[[1, 5], None]
    assert split.field("image").channels == (3 if layout == "NHWC" else 1)
    np.testing.assert_array_equal(x.numpy(), expected)


def test_float_images_keep_their_dtype(tmp_path):
    images = np.random.default_rng(0).random((12, 1, 3, 3), dtype=np.float32)
    write_h5(tmp_path / "f.h5", images, np.arange(12) % 3)
    split = describe_split(tmp_path / "f.h5")
    x = H5Dataset(split, {})[[2, 7]][0]["image"]
    assert x.dtype == torch.float32
    np.testing.assert_array_equal(x.numpy(), images[[2, 7]])


def test_handle_is_opened_lazily_never_pickled_and_reopened_in_a_new_process(tmp_path):
    arrays = make_file(tmp_path / "d.h5", 30)
    ds = dataset(tmp_path / "d.h5", block_rows=7, cache_blocks=2)
    assert ds._file is None, "nothing is opened in __init__"
    fresh = pickle.loads(pickle.dumps(ds))
    check_batch(fresh[[1, 2]], *arrays["train"])
    check_batch(ds[[4, 20]], *arrays["train"])
    assert ds._file is not None and ds._blocks
    copy = pickle.loads(pickle.dumps(ds))  # an open h5py handle cannot be pickled: this proves it is dropped
    assert copy._file is None and not copy._blocks
    check_batch(copy[[0, 29]], *arrays["train"])
    ds._pid = -1  # as if this object had been inherited by a forked child
    first_handle = ds._file
    check_batch(ds[[27]], *arrays["train"])  # a block not cached yet, so the file is read
    assert ds._file is not first_handle and ds._pid == os.getpid()
    ds.close()
    check_batch(ds[[6]], *arrays["train"])


@pytest.mark.parametrize("context, shuffle", [("fork", "chunk"), ("fork", "full"), ("spawn", "chunk")])
def test_loader_with_two_workers_reads_the_right_samples(tmp_path, context, shuffle):
    arrays = make_file(tmp_path / "d.h5", 90, compression="gzip")
    cfg = data_config(tmp_path / "d.h5", num_workers=2, multiprocessing_context=context, shuffle=shuffle)
    built = loaders(cfg)
    assert built.train_size == 90 and built.val_size == 90 and len(built.train) == 12
    for epoch in range(2):  # persistent workers carry over to the second epoch
        built.train_sampler.set_epoch(epoch)
        seen = []
        for batch in built.train:
            check_batch(batch, *arrays["train"])
            seen.extend(batch[1].tolist())
        assert sorted(seen) == list(range(90))
    val_rows = []
    for batch in built.val:
        check_batch(batch, *arrays["val"])
        val_rows.extend(batch[1].tolist())
    assert val_rows == list(range(90))


def test_loader_order_matches_the_sampler_and_resumes_mid_epoch(tmp_path):
    make_file(tmp_path / "d.h5", 60)
    built = loaders(data_config(tmp_path / "d.h5", num_workers=2), batch_size=5)
    built.train_sampler.set_epoch(3)
    full = [batch[1].tolist() for batch in built.train]
    assert full == [b.tolist() for b in built.train_sampler]
    built.train_sampler.set_epoch(3, start_batch=4)
    assert [batch[1].tolist() for batch in built.train] == full[4:]


def test_each_loader_worker_decodes_its_own_blocks(tmp_path, monkeypatch):
    # 20 gzip chunks of 8 rows = 20 blocks, windows of 2 blocks, batches of 8: consecutive batches share a
    # window. Handed out round-robin in sampling order, both workers would decode nearly every block.
    make_file(tmp_path / "d.h5", 160, chunk_rows=8, compression="gzip")
    reads = tmp_path / "reads"
    reads.mkdir()
    read_block = H5Dataset._block

    def logged_block(self, info, block):
        if (info.name, block) not in self._blocks:
            with open(reads / str(os.getpid()), "a") as log:
                log.write(f"{block}\n")
        return read_block(self, info, block)

    monkeypatch.setattr(H5Dataset, "_block", logged_block)  # fork: the workers inherit it
    cfg = data_config(tmp_path / "d.h5", num_workers=2, multiprocessing_context="fork", shuffle_window=2)
    built = loaders(cfg, batch_size=8)
    for epoch in range(2):
        built.train_sampler.set_epoch(epoch)
        assert sorted(row for batch in built.train for row in batch[1].tolist()) == list(range(160))
    per_worker = [[int(b) for b in log.read_text().split()] for log in reads.iterdir()]
    assert len(per_worker) == 2
    # Each block once per epoch, plus at most the window where the two workers' segments meet.
    assert sum(map(len, per_worker)) <= 2 * (20 + 2 * 2)


def torch_shm_files() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("torch_")}


@pytest.mark.parametrize("strategy", ["file_system", "file_descriptor"])
def test_workers_hand_over_batches_with_the_configured_sharing_strategy(tmp_path, strategy):
    arrays = make_file(tmp_path / "d.h5", 64)
    before = torch_shm_files()
    built = loaders(data_config(tmp_path / "d.h5", num_workers=2, multiprocessing_context="fork",
                                worker_sharing_strategy=strategy))
    held = list(built.train)  # alive: named segments exist while a batch does
    for batch in held:
        check_batch(batch, *arrays["train"])
    workers = {str(w.pid) for w in built.train._iterator._workers}
    created = torch_shm_files() - before
    if strategy == "file_system":  # torch_<worker pid>_...: one per batch held or in flight
        assert len(created) >= len(held) and {name.split("_")[1] for name in created} <= workers
    else:
        assert not created
    assert torch.multiprocessing.get_sharing_strategy() == "file_descriptor"  # the trainer's own is untouched


def test_named_shared_memory_is_removed_after_kill_9_of_the_process_group(tmp_path):
    # torch_shm_manager runs in its own session, so it survives killpg and unlinks what the dead left. (A
    # kill of every process, e.g. a whole cgroup, takes it down too: then the files stay; docs/data.md.)
    make_file(tmp_path / "d.h5", 64)
    before = torch_shm_files()
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "hold_batches.py"), str(tmp_path / "d.h5")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert "holding" in proc.stdout.readline()
        created = torch_shm_files() - before
        assert len(created) >= 6
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its workers, as the OOM killer or scancel would
        proc.wait()
    deadline = time.monotonic() + 30
    while torch_shm_files() & created and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not torch_shm_files() & created  # torch_shm_manager unlinked what the dead processes left


def test_chunk_mode_workers_prefetch_a_window_of_batches(tmp_path):
    # Blocks of 8 rows, windows of 4 blocks = 32 rows = 6.4 batches of 5: a worker decodes a window for its
    # first batch, so it must be allowed to run that far ahead (ceil(6.4) + 1 batches).
    make_file(tmp_path / "d.h5", 80, chunk_rows=8, compression="gzip")
    chunk = loaders(data_config(tmp_path / "d.h5", num_workers=2, shuffle_window=4), batch_size=5)
    assert (chunk.train.prefetch_factor, chunk.val.prefetch_factor, chunk.train_eval.prefetch_factor) == (8, 2, 2)
    wide_batches = loaders(data_config(tmp_path / "d.h5", num_workers=2, shuffle_window=4), batch_size=64)
    assert wide_batches.train.prefetch_factor == 2
    for settings in ({"shuffle": "full"}, {"in_memory": True}):
        other = loaders(data_config(tmp_path / "d.h5", num_workers=2, **settings), batch_size=5)
        assert other.train.prefetch_factor == 2
    chosen = loaders(data_config(tmp_path / "d.h5", num_workers=2, prefetch_factor=3), batch_size=5)
    assert (chosen.train.prefetch_factor, chosen.val.prefetch_factor) == (3, 3)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_cover_the_training_split_once_and_validation_once(tmp_path, world_size):
    make_file(tmp_path / "d.h5", 50)
    cfg = data_config(tmp_path / "d.h5", drop_last=True)
    ranks = [loaders(cfg, rank=r, world_size=world_size, batch_size=4) for r in range(world_size)]
    assert len({len(r.train) for r in ranks}) == 1
    train_rows, val_rows, train_eval_rows = [], [], []
    for r in ranks:
        r.train_sampler.set_epoch(1)
        train_rows += [i for batch in r.train for i in batch[1].tolist()]
        val_rows += [i for batch in r.val for i in batch[1].tolist()]
        train_eval_rows += [i for batch in r.train_eval for i in batch[1].tolist()]
    assert len(train_rows) == len(set(train_rows)) == 50 // (4 * world_size) * 4 * world_size
    assert val_rows == list(range(50)), "validation: every row once, no padding, shards in order"
    assert train_eval_rows == list(range(50)), "train_eval: the training split sharded the same way"
    assert ranks[0].sample_shape == (3, 4, 5)
    bounded = [loaders(cfg, rank=r, world_size=world_size, batch_size=4, stats_rows=20).train_eval
               for r in range(world_size)]
    assert [i for loader in bounded for batch in loader for i in batch[1].tolist()] == list(range(20)), \
        "swa.bn_rows: the first rows of the split, whatever the world size"


@pytest.mark.parametrize("context", ["fork", "forkserver"])
def test_in_memory_mode_serves_the_same_batches_from_shared_memory(tmp_path, context):
    make_file(tmp_path / "d.h5", 70)
    from_file = loaders(data_config(tmp_path / "d.h5", num_workers=2))  # same workers: same batch order
    in_memory = loaders(data_config(tmp_path / "d.h5", in_memory=True, num_workers=2,
                                    multiprocessing_context=context))
    assert set(in_memory.train.dataset.held) == {"image", "label"}
    assert all(values.is_shared() for values in in_memory.train.dataset.held.values())
    for built in (from_file, in_memory):
        built.train_sampler.set_epoch(2)
    for (a, a_rows), (b, b_rows) in zip(from_file.train, in_memory.train, strict=True):
        assert torch.equal(a_rows, b_rows) and a.keys() == b.keys()
        assert all(torch.equal(a[name], b[name]) for name in a)
