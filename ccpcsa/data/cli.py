"""python -m ccpcsa.data to-parquet SRC DST [--rows-per-shard N] [--rows-per-group N]
[--split NAME] [--seed S]"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ccpcsa.data.common import DataError
from ccpcsa.data.parquet import DEFAULT_ROWS_PER_GROUP, DEFAULT_ROWS_PER_SHARD, iter_shards


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
            "DST/_classes.json."
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
        "--split",
        default=None,
        metavar="NAME",
        help="read SRC/NAME instead of SRC, e.g. --split train for an ImageNet root",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    shards = rows = num_classes = 0
    try:
        shards_written = iter_shards(args.src, args.dst, args.rows_per_shard, args.split,
                                     args.seed, args.rows_per_group)
        for path, n, classes in shards_written:
            shards, rows, num_classes = shards + 1, rows + n, len(classes)
            print(f"wrote {path} ({n} rows)", flush=True)
    except DataError as exc:
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"done: {rows} images in {num_classes} classes -> {shards} shards in {args.dst}; "
          f"rows shuffled across classes with seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
