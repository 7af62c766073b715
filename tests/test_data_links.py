"""Links in a user's HDF5 file: soft links are followed within the file; nothing that leads into another
file (external link, external storage, virtual dataset), at any step of a chain of soft links, is followed
unless data.allow_external_storage is set, and the other file is not even opened.

The other file is a FIFO (tests/opens.py), which blocks whoever opens it like a dead network mount: each
test asserts that nobody opened it, and that HDF5 does open it once the links are allowed (so the check
would see an open). Covered: data.path and data.val_path (prepare_data, build_dataloaders), the readers,
`ddp-kit data inspect`, and writing a split into an existing file.
"""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from data_helpers import data_config, loaders, make_arrays, make_file, refused, triples
from ddp_kit.data import DataError, H5Dataset, describe_split, inspect_h5, write_h5
from ddp_kit.data.dataset import held_fields, load_field
from opens import Fifo, OpenWatch

pytestmark = pytest.mark.timeout(20)
N = 30


def relink(f: h5py.File, name: str, link) -> None:
    if name in f:
        del f[name]
    f[name] = link


def soft_link_to_external_link(f: h5py.File, other: Path) -> str:
    relink(f, "train/labels", h5py.SoftLink("/ext_labels"))
    f["ext_labels"] = h5py.ExternalLink(other.name, "/train/labels")
    return f"'/train/labels' -> '/ext_labels' is an external link to {other.name}:/train/labels"


def soft_link_chain_to_external_link(f: h5py.File, other: Path) -> str:
    relink(f, "train/labels", h5py.SoftLink("/hop1"))
    f["hop1"] = h5py.SoftLink("hop2")  # relative to the root, where hop1 lives
    f["hop2"] = h5py.ExternalLink(other.name, "/train/labels")
    return "'/train/labels' -> '/hop1' -> '/hop2' is an external link"


def group_behind_external_link(f: h5py.File, other: Path) -> str:
    relink(f, "train", h5py.SoftLink("/mnt/train"))
    f["mnt"] = h5py.ExternalLink(other.name, "/")
    return f"'/train' -> '/mnt' is an external link to {other.name}:/"


def unlimited_virtual_dataset(f: h5py.File, name: str, source: Path) -> None:
    """Labels mapped from `source` without a fixed length: even the shape is read from the source file."""
    layout = h5py.VirtualLayout(shape=(N,), dtype=np.int64, maxshape=(None,))
    unlimited = h5py.h5s.UNLIMITED
    layout[0:unlimited] = h5py.VirtualSource(str(source), "/train/labels", shape=(N,), maxshape=(None,))[0:unlimited]
    f.create_virtual_dataset(name, layout)


def soft_link_to_virtual_dataset(f: h5py.File, other: Path) -> str:
    relink(f, "train/labels", h5py.SoftLink("/virtual_labels"))
    unlimited_virtual_dataset(f, "virtual_labels", other)
    return f"'/train/labels' -> '/virtual_labels' is a virtual dataset (data mapped from {other})"


def soft_link_to_external_storage(f: h5py.File, other: Path) -> str:
    images = f["train/images"]
    f.create_dataset("raw_images", shape=images.shape, dtype=images.dtype, external=[(str(other), 0, images.nbytes)])
    relink(f, "train/images", h5py.SoftLink("/raw_images"))
    return f"'/train/images' -> '/raw_images' uses external storage (raw data in {other})"


LINKS_OUT = [soft_link_to_external_link, soft_link_chain_to_external_link, group_behind_external_link,
             soft_link_to_virtual_dataset, soft_link_to_external_storage]


def read_a_batch_of_each(cfg) -> None:
    built = loaders(cfg)
    built.train_sampler.set_epoch(0)
    next(iter(built.train))
    next(iter(built.val))


@pytest.mark.parametrize("entry", ["data.path", "data.val_path"])
@pytest.mark.parametrize("link_out", LINKS_OUT)
def test_links_out_of_the_file_are_refused_before_the_other_file_is_opened(tmp_path, link_out, entry):
    linked, other = tmp_path / "linked.h5", tmp_path / "other.h5"
    make_file(linked, N)
    with h5py.File(linked, "a") as f:
        chain = link_out(f, other)
    cfg = dict(path=linked)
    if entry == "data.val_path":  # the linked file holds the validation split, its group is 'train'
        make_file(tmp_path / "plain.h5", N)
        cfg = dict(path=tmp_path / "plain.h5", val_path=str(linked), val_group="train")
    with Fifo(other) as fifo:
        refused(data_config(**cfg), str(linked), chain, "data.allow_external_storage")
        refused(data_config(**cfg), str(linked), chain, num_classes=10)
        assert fifo.opens == 0
        with pytest.raises((DataError, OSError, RuntimeError)):  # allowed, HDF5 follows the links: opens the FIFO
            read_a_batch_of_each(data_config(**cfg, allow_external_storage=True))
        assert fifo.opens > 0


def test_a_regular_file_behind_a_soft_link_is_opened_only_when_allowed(tmp_path):
    make_file(tmp_path / "d.h5", N)
    other_images, other_labels = make_arrays(N, seed=7)
    write_h5(tmp_path / "other.h5", other_images, other_labels, group="train")
    with h5py.File(tmp_path / "d.h5", "a") as f:
        chain = soft_link_to_external_link(f, tmp_path / "other.h5")
    with OpenWatch(tmp_path / "other.h5") as other:
        refused(data_config(tmp_path / "d.h5"), chain, "data.allow_external_storage")
        refused(data_config(tmp_path / "d.h5"), chain, num_classes=10)
        assert other.opens() == 0
        built = loaders(data_config(tmp_path / "d.h5", allow_external_storage=True))
        assert other.opens() > 0
    built.train_sampler.set_epoch(0)
    _, labels, rows = next(triples(built.train))
    np.testing.assert_array_equal(labels.numpy(), other_labels[rows.numpy()])


def aliased_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A file whose split 'alias' reaches the datasets of /store through absolute, relative and chained soft
    links; returns the stored (images, labels)."""
    arrays = make_file(path, N, groups=("store", "val"))
    with h5py.File(path, "a") as f:
        f["alias"] = h5py.SoftLink("train")  # relative to the root
        f["train/images"] = h5py.SoftLink("/store/images")
        f["train/labels"] = h5py.SoftLink("./labels_hop")  # relative to /train, through "."
        f["train/labels_hop"] = h5py.SoftLink("/store/labels")
    return arrays["store"]


@pytest.mark.parametrize("settings", [{}, {"in_memory": True}, {"sample_transforms": [
    {"RandomHorizontalFlip": {"p": 0.0}}]}])
def test_soft_links_within_the_file_are_followed(tmp_path, settings):
    images, labels = aliased_file(tmp_path / "d.h5")
    split = describe_split(tmp_path / "d.h5", group="alias")
    assert (split.field("image").path, split.field("label").path) == ("/store/images", "/store/labels")
    epochs = {}
    for allowed in (False, True):  # HDF5 following the same links itself reads the same rows
        built = loaders(data_config(tmp_path / "d.h5", train_group="alias", allow_external_storage=allowed,
                                    **settings))
        built.train_sampler.set_epoch(0)
        epochs[allowed] = [(x.clone(), y.clone(), ids.clone()) for x, y, ids in triples(built.train)]
    for (x, y, ids), (hdf5_x, hdf5_y, hdf5_ids) in zip(epochs[False], epochs[True]):
        np.testing.assert_array_equal(x.numpy(), images[ids.numpy()])
        np.testing.assert_array_equal(y.numpy(), labels[ids.numpy()])
        assert torch.equal(ids, hdf5_ids) and torch.equal(x, hdf5_x) and torch.equal(y, hdf5_y)
    assert sorted(torch.cat([ids for _, _, ids in epochs[False]]).tolist()) == list(range(N))


def test_readers_follow_no_link_after_validation(tmp_path):
    images, labels = aliased_file(tmp_path / "d.h5")
    other = tmp_path / "other.h5"
    split = describe_split(tmp_path / "d.h5", group="alias")
    with h5py.File(tmp_path / "d.h5", "a") as f:  # every link on the configured paths now leads out of the file
        relink(f, "alias", h5py.ExternalLink(other.name, "/"))
        relink(f, "train/images", h5py.ExternalLink(other.name, "/images"))
    with Fifo(other) as fifo:
        reader = H5Dataset(split, held_fields(split, in_memory=False))
        x, y, ids = next(triples([reader[np.arange(N)]]))
        reader.close()
        np.testing.assert_array_equal(x.numpy(), images)
        np.testing.assert_array_equal(y.numpy(), labels)
        with h5py.File(tmp_path / "d.h5", "a") as f:  # the datasets themselves replaced: refused, not followed
            relink(f, "store/images", h5py.ExternalLink(other.name, "/images"))
            relink(f, "store/labels", h5py.SoftLink("/alias/labels"))
        with pytest.raises(DataError, match="'/store/images' is an external link"):
            H5Dataset(split, {"label": y})[[0]]
        with pytest.raises(DataError, match="'/store/labels' -> '/alias' is an external link"):
            load_field(split, "label")
        assert fifo.opens == 0


def soft_link_chain(f: h5py.File, hops: int) -> str:
    """Groups hop0 .. hop{hops-1}, each a soft link to the one before, hop0 to /train; returns the last."""
    f["hop0"] = h5py.SoftLink("/train")
    for i in range(1, hops):
        f[f"hop{i}"] = h5py.SoftLink(f"/hop{i - 1}")
    return f"hop{hops - 1}"


def test_as_many_soft_links_as_hdf5_follows(tmp_path):
    arrays = make_file(tmp_path / "d.h5", N)
    with h5py.File(tmp_path / "d.h5", "a") as f:
        sixteen = soft_link_chain(f, 16)
    for allowed in (False, True):
        assert describe_split(tmp_path / "d.h5", group=sixteen, allow_external=allowed).length == N
    built = loaders(data_config(tmp_path / "d.h5", train_group=sixteen))
    built.train_sampler.set_epoch(0)
    x, _, ids = next(triples(built.train))
    np.testing.assert_array_equal(x.numpy(), arrays["train"][0][ids.numpy()])


def soft_link_cycle(f: h5py.File) -> None:
    relink(f, "train/labels", h5py.SoftLink("/loop_a"))
    f["loop_a"] = h5py.SoftLink("loop_b")
    f["loop_b"] = h5py.SoftLink("/loop_a")


@pytest.mark.parametrize("make, group, fragments", [
    (lambda f: soft_link_chain(f, 17), "hop16",
     ["'/hop16' -> '/hop15' -> ", " -> '/hop0': more than 16 soft links", "data.train_group"]),
    (soft_link_cycle, "train",
     ["soft link cycle '/train/labels' -> '/loop_a' -> '/loop_b' -> '/loop_a'", "data.fields.label"]),
    (lambda f: relink(f, "train/labels", h5py.SoftLink("/nowhere")), "train",
     ["'/train/labels' -> '/nowhere' does not exist (data.fields.label); '/' contains: "]),
    (lambda f: relink(f, "train/images", h5py.SoftLink("/val/images/more")), "train",
     ["'/val/images' is a dataset, not a group, so '/train/images' -> '/val/images/more' cannot exist",
      "data.fields.image"]),
])
def test_bad_soft_links_are_named(tmp_path, make, group, fragments):
    make_file(tmp_path / "d.h5", N)
    with h5py.File(tmp_path / "d.h5", "a") as f:
        make(f)
    refused(data_config(tmp_path / "d.h5", train_group=group), str(tmp_path / "d.h5"), *fragments)


def test_too_many_soft_links_for_hdf5_is_a_data_error_when_allowed(tmp_path):
    make_file(tmp_path / "d.h5", N)
    with h5py.File(tmp_path / "d.h5", "a") as f:
        seventeen = soft_link_chain(f, 17)
    refused(data_config(tmp_path / "d.h5", train_group=seventeen, allow_external_storage=True),
            f"'/{seventeen}' is a broken link", "too many links")


def test_inspect_opens_no_other_file(tmp_path):
    make_file(tmp_path / "d.h5", N)
    other = tmp_path / "other.h5"
    with h5py.File(tmp_path / "d.h5", "a") as f:
        soft_link_to_external_link(f, other)
        soft_link_to_external_storage(f, other)
        unlimited_virtual_dataset(f, "virtual_labels", other)
    with Fifo(other) as fifo:
        report = inspect_h5(tmp_path / "d.h5")
        assert fifo.opens == 0
    for fragment in ["labels -> soft link to /ext_labels",
                     "ext_labels -> external link to other.h5:/train/labels (not followed)",
                     f"virtual_labels: int64, virtual dataset, data mapped from {other} (not followed)",
                     f"raw_images: shape ({N}, 3, 4, 5), uint8, external storage in {other} (not followed)",
                     "images -> soft link to /raw_images"]:
        assert fragment in report, f"{fragment!r} not in:\n{report}"


def test_writing_a_split_into_a_file_with_links_follows_none(tmp_path):
    make_file(tmp_path / "d.h5", N)
    other = tmp_path / "other.h5"
    with h5py.File(tmp_path / "d.h5", "a") as f:
        soft_link_to_external_link(f, other)
        relink(f, "val", h5py.SoftLink("/mnt/val"))
        f["mnt"] = h5py.ExternalLink(other.name, "/")
    images, labels = make_arrays(8, seed=3)
    with Fifo(other) as fifo:
        write_h5(tmp_path / "d.h5", images, labels, group="extra/split", append_group=True)
        before = (tmp_path / "d.h5").read_bytes()
        with pytest.raises(DataError, match="'/val' -> '/mnt' is an external link to other.h5:/; splits are "
                                            "written into this file only"):
            write_h5(tmp_path / "d.h5", images, labels, group="val/more", append_group=True)
        assert fifo.opens == 0
    assert (tmp_path / "d.h5").read_bytes() == before, "a refused write leaves the file as it was"
    with h5py.File(tmp_path / "d.h5", "r") as f:
        assert f["train"].get("labels", getlink=True).path == "/ext_labels"
        assert f.get("mnt", getlink=True).filename == other.name
        np.testing.assert_array_equal(f["extra/split/images"][()], images)
        np.testing.assert_array_equal(f["extra/split/labels"][()], labels)
