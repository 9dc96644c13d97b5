"""python -m ccpcsa.data to-parquet SRC DST [--rows-per-shard N] [--rows-per-group N]
[--split NAME] [--seed S] [--workers N] [--part I/N]
python -m ccpcsa.data imagenet-folders DST --train-tar T --val-tar V --val-labels F"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from ccpcsa.data.common import DataError
from ccpcsa.data.parquet import DEFAULT_ROWS_PER_GROUP, DEFAULT_ROWS_PER_SHARD
from ccpcsa.data.toparquet import iter_shards, parse_part


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ccpcsa.data", description="Dataset utilities for ccpcsa."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    to_parquet = commands.add_parser(
        "to-parquet",
        help="convert an ImageFolder split to Parquet shards for Ray Data",
        description=(
            "Convert an ImageFolder split (SRC/<class>/<image files>) into Parquet shards "
            "part-00000.parquet, ... with columns image (original encoded bytes) and label "
            "(int64), rows in a seeded random order across classes (training reads whole row "
            "groups, reshuffled every epoch); class names go to the schema metadata and "
            "DST/_classes.json. Resumable: the same command again writes only the shards "
            "still missing. Several machines can share one export with --part."
        ),
    )
    to_parquet.add_argument("src", metavar="SRC", help="local folder of class subfolders")
    to_parquet.add_argument(
        "dst",
        metavar="DST",
        help="output folder: local path or URI (s3://, gs://, file://); must hold no shards",
    )
    to_parquet.add_argument(
        "--rows-per-shard",
        type=int,
        default=DEFAULT_ROWS_PER_SHARD,
        metavar="N",
        help=f"images per Parquet shard (default: {DEFAULT_ROWS_PER_SHARD})",
    )
    to_parquet.add_argument(
        "--rows-per-group",
        type=int,
        default=DEFAULT_ROWS_PER_GROUP,
        metavar="N",
        help="images per Parquet row group: the unit training shuffles and reads at random "
             f"(default: {DEFAULT_ROWS_PER_GROUP})",
    )
    to_parquet.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="seed of the random row order across classes (default: 0)",
    )
    to_parquet.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="processes reading images and writing shards (default: this machine's CPUs, "
             f"{os.cpu_count() or 1})",
    )
    to_parquet.add_argument(
        "--part",
        default="0/1",
        metavar="I/N",
        help="write only the shards whose number is I modulo N: run I = 0 .. N-1 on N machines "
             "with the same SRC listing and DST to split one export (default: 0/1, all)",
    )
    to_parquet.add_argument(
        "--split",
        default=None,
        metavar="NAME",
        help="read SRC/NAME instead of SRC, e.g. --split train for an ImageNet root",
    )
    folders = commands.add_parser(
        "imagenet-folders",
        help="unpack the official ImageNet archives into DST/train/<wnid>/ and DST/val/<wnid>/",
        description=(
            "Unpack ILSVRC2012_img_train.tar (a tar of one tar per class, n01440764.tar, ...) "
            "and ILSVRC2012_img_val.tar (50,000 flat JPEGs) into an ImageFolder root that "
            "to-parquet reads, sorting the validation images into class folders by "
            "--val-labels. Resumable: files already unpacked at their size are skipped."
        ),
    )
    folders.add_argument("dst", metavar="DST", help="output root (train/ and val/ go under it)")
    folders.add_argument("--train-tar", metavar="T", help="ILSVRC2012_img_train.tar")
    folders.add_argument("--val-tar", metavar="V", help="ILSVRC2012_img_val.tar")
    folders.add_argument(
        "--val-labels", metavar="F",
        help="the validation labels: LOC_val_solution.csv (ImageId,PredictionString, as "
             "published with the ImageNet localization data) or a text file of lines "
             "'ILSVRC2012_val_00000001.JPEG n01751748'; required with --val-tar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ccpcsa.command import run_guarded  # imported here: ccpcsa.data imports this module

    args = _parser().parse_args(argv)

    def command(_termination) -> int:
        if args.command == "imagenet-folders":
            return _imagenet_folders(args)
        return _to_parquet(args)

    def interrupted(_exc: BaseException) -> str:
        return ("interrupted; what was written is kept: the same command again goes on "
                "from there")

    return run_guarded(command, interrupted)


def _to_parquet(args: argparse.Namespace) -> int:
    shards = rows = written_rows = num_classes = 0
    started = time.monotonic()
    shards_written = iter_shards(args.src, args.dst, args.rows_per_shard, args.split,
                                 args.seed, args.rows_per_group, args.workers,
                                 parse_part(args.part))
    for path, n, classes, written in shards_written:
        shards, rows, num_classes = shards + 1, rows + n, len(classes)
        written_rows += n if written else 0
        print(f"{'wrote' if written else 'kept (written earlier)'} {path} ({n} rows)",
              flush=True)
    seconds = time.monotonic() - started
    rate = f", {written_rows / seconds:,.0f} rows/s" if written_rows and seconds > 0 else ""
    print(f"done: {rows} images in {num_classes} classes -> {shards} shards in {args.dst} "
          f"(part {args.part}, {args.workers} workers, {seconds:.1f} s{rate}); rows shuffled "
          f"across classes with seed {args.seed}")
    return 0


def _imagenet_folders(args: argparse.Namespace) -> int:
    from ccpcsa.data.imagenet import unpack_train, unpack_val

    if not args.train_tar and not args.val_tar:
        raise DataError("imagenet-folders: give --train-tar and/or --val-tar")
    if args.val_tar and not args.val_labels:
        raise DataError("imagenet-folders: --val-tar needs --val-labels (which class each "
                        "validation image belongs to)")
    for what, tar, unpack in (("train", args.train_tar, unpack_train),
                              ("val", args.val_tar, unpack_val)):
        if not tar:
            continue
        extra = (args.val_labels,) if what == "val" else ()
        counts = unpack(tar, os.path.join(args.dst, what), *extra)
        print(f"{what}: {counts.written} images written, {counts.kept} kept (unpacked "
              f"earlier) in {counts.classes} classes -> {os.path.join(args.dst, what)}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
