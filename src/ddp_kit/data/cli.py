"""The `ddp-kit data ...` commands: converters and inspection.

`register_cli(subparsers)` adds the `data` command group to the main parser. Every leaf command sets
`func`, a callable taking the parsed namespace and returning the exit status.
"""

from __future__ import annotations

import argparse

from ddp_kit.data.convert import convert_imagefolder, convert_npz, convert_npz_fields, write_digits
from ddp_kit.data.errors import DataError
from ddp_kit.data.inspection import inspect_h5


def _compression(value: str):
    return None if value == "none" else value


def _add_writing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compression", choices=("none", "gzip", "lzf"), default="none",
                        help="HDF5 compression of the images (gzip: smaller, slower to read; default: none)")
    parser.add_argument("--chunk-rows", type=int, default=None,
                        help="rows per HDF5 chunk (default: about 1 MiB of images)")


def _digits(args: argparse.Namespace) -> int:
    write_digits(args.out, size=args.size, val_fraction=args.val_fraction, seed=args.seed,
                 compression=_compression(args.compression))
    print(f"wrote {args.out}")
    return 0


def _imagefolder(args: argparse.Namespace) -> int:
    convert_imagefolder(args.root, args.out, size=args.size, group=args.group, append_group=args.append,
                        batch_size=args.batch_size, num_workers=args.workers, seed=args.seed,
                        chunk_rows=args.chunk_rows, compression=_compression(args.compression))
    print(f"wrote {args.out}")
    return 0


def _npz(args: argparse.Namespace) -> int:
    if args.field or args.all_arrays:
        fields = None
        if args.field:
            fields = {}
            for spec in args.field:
                name, _, key = spec.partition("=")
                if not name:
                    raise DataError(f"--field {spec!r}: expected NAME=ARRAY_KEY (or NAME, for the array of that name)")
                fields[name] = key or name
        convert_npz_fields(args.src, args.out, fields=fields, group=args.group, append_group=args.append,
                           shuffle_seed=None if args.no_shuffle else args.seed, chunk_rows=args.chunk_rows,
                           compression=_compression(args.compression))
        print(f"wrote {args.out}")
        return 0
    splits = {args.group: (args.images_key, args.labels_key)}
    if args.val_images_key:
        splits[args.val_group] = (args.val_images_key, args.val_labels_key)
    convert_npz(args.src, args.out, splits=splits, layout=args.layout,
                shuffle_seed=None if args.no_shuffle else args.seed, chunk_rows=args.chunk_rows,
                compression=_compression(args.compression))
    print(f"wrote {args.out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    print(inspect_h5(args.file, labels_key=args.labels_key))
    return 0


def register_cli(subparsers) -> None:
    """Add `data` and its commands (digits, imagefolder, npz, inspect) to an argparse subparsers object."""
    data = subparsers.add_parser("data", help="convert datasets to HDF5, inspect HDF5 files",
                                 description="Convert datasets to the HDF5 layout ddp_kit reads, or inspect one.")
    commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    digits = commands.add_parser("digits", help="scikit-learn's digits as a small demo file (groups train, val)")
    digits.add_argument("out", help="output .h5 file")
    digits.add_argument("--size", type=int, default=32, help="image side after upsampling (default: 32)")
    digits.add_argument("--val-fraction", type=float, default=0.2, help="share of each class in val/")
    digits.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    _add_writing_options(digits)
    digits.set_defaults(func=_digits)

    folder = commands.add_parser("imagefolder", help="an image tree ROOT/<class>/<image>, streamed")
    folder.add_argument("root", help="directory with one sub-directory of images per class")
    folder.add_argument("out", help="output .h5 file")
    folder.add_argument("--size", type=int, default=224, help="resize the shorter side, center-crop to this")
    folder.add_argument("--group", default="train", help="group for this split (default: train)")
    folder.add_argument("--append", action="store_true", help="add the group to an existing file")
    folder.add_argument("--batch-size", type=int, default=64, help="images decoded and written per step")
    folder.add_argument("--workers", type=int, default=2, help="image decoding processes")
    folder.add_argument("--seed", type=int, default=0, help="seed of the stored row order")
    _add_writing_options(folder)
    folder.set_defaults(func=_imagefolder)

    npz = commands.add_parser("npz", help="arrays from a NumPy .npz archive")
    npz.add_argument("src", help="input .npz archive")
    npz.add_argument("out", help="output .h5 file")
    npz.add_argument("--field", action="append", metavar="NAME=ARRAY_KEY",
                     help="write the archive's ARRAY_KEY as dataset NAME of --group (repeat for each field; read "
                          "them with data.fields); any arrays with one row per sample, any dtype and shape")
    npz.add_argument("--all-arrays", action="store_true", help="write every array of the archive as a field")
    npz.add_argument("--append", action="store_true", help="add the group to an existing file (with --field)")
    npz.add_argument("--images-key", default="images", help="archive key of the images")
    npz.add_argument("--labels-key", default="labels", help="archive key of the labels")
    npz.add_argument("--group", default="train", help="group for that split (default: train)")
    npz.add_argument("--val-images-key", help="archive key of validation images, if the archive has them")
    npz.add_argument("--val-labels-key", default="val_labels", help="archive key of the validation labels")
    npz.add_argument("--val-group", default="val", help="group for the validation split (default: val)")
    npz.add_argument("--layout", choices=("auto", "NCHW", "NHWC"), default="auto",
                     help="axis order of 4-D images (auto: NHWC if the last axis has 1, 3 or 4 entries)")
    npz.add_argument("--no-shuffle", action="store_true", help="keep the archive's row order")
    npz.add_argument("--seed", type=int, default=0, help="seed of the stored row order")
    _add_writing_options(npz)
    npz.set_defaults(func=_npz)

    inspect = commands.add_parser("inspect", help="keys, shapes, dtypes, chunks, compression, label histogram")
    inspect.add_argument("file", help="an .h5 file")
    inspect.add_argument("--labels-key", default="labels", help="name of labels datasets to histogram")
    inspect.set_defaults(func=_inspect)
