"""Parquet shards (image bytes + label) for Ray Data: reading them, and writing them from an
ImageFolder split (`python -m ccpcsa.data to-parquet`)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset

from ccpcsa.data.common import DataError
from ccpcsa.data.imagefolder import imagefolder_transform, scan_imagefolder

SHARD_PATTERN = "part-{:05d}.parquet"
CLASSES_FILE = "_classes.json"
CLASSES_META_KEY = b"classes"


def parquet_split_dir(root: str, split: str) -> str:
    return _join(root, split)


def parquet_classes(root: str, split: str) -> list[str]:
    """Class names of a shard folder (root/split/_classes.json, written by to-parquet)."""
    folder = parquet_split_dir(root, split)
    fs, base = _resolve_dst(folder)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise DataError(f"{folder}: not found; expected a folder of Parquet shards written by "
                        "`python -m ccpcsa.data to-parquet` (with train/ and val/ under the root)")
    try:
        with fs.open_input_stream(_join(base, CLASSES_FILE)) as f:
            classes = json.loads(f.read())
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder}: no readable {CLASSES_FILE}; expected the class list that "
                        f"to-parquet writes ({exc})") from None
    if not isinstance(classes, list) or len(classes) < 2:
        raise DataError(f"{folder}/{CLASSES_FILE}: expected a JSON list of >= 2 class names")
    return classes


def parquet_shards(root: str, split: str) -> list[str]:
    """The shard files of root/split in order, in root's form (local path or URI)."""
    folder = parquet_split_dir(root, split)
    parquet_classes(root, split)
    fs, base = _resolve_dst(folder)
    entries = fs.get_file_info(pafs.FileSelector(base))
    names = sorted(e.base_name for e in entries if e.base_name.endswith(".parquet"))
    if not names:
        raise DataError(f"{folder}: no *.parquet shards; expected part-00000.parquet, ...")
    return [_join(folder, n) for n in names]


def parquet_rows(root: str, split: str) -> int:
    """Rows of a shard folder, from the Parquet footers (no image is read)."""
    total = 0
    for shard in parquet_shards(root, split):
        fs, p = _resolve_dst(shard)
        with fs.open_input_file(p) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def read_shard_table(path: str) -> pa.Table:
    fs, p = _resolve_dst(path)
    return pq.read_table(p, filesystem=fs, columns=["image", "label"])


class ParquetImages(Dataset):
    """Parquet shards (image bytes, label) held in memory, decoded and transformed on access.
    For one process; N workers stream the same shards through Ray Data instead."""

    def __init__(self, shards: list[str], classes: list[str], image_size: int, train: bool
                 ) -> None:
        table = pa.concat_tables([read_shard_table(s) for s in shards])
        self.images = table.column("image").to_pylist()
        self.targets = table.column("label").to_pylist()
        self.classes = classes
        self.transform = imagefolder_transform(image_size, train)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = Image.open(io.BytesIO(self.images[index])).convert("RGB")
        return self.transform(img), self.targets[index]


def parquet_datasets(root: str, image_size: int, augment: bool) -> tuple[Dataset, Dataset]:
    classes = parquet_classes(root, "train")
    if parquet_classes(root, "val") != classes:
        raise DataError(f"{parquet_split_dir(root, 'val')}: classes differ from train; "
                        "expected both splits exported from the same class folders")
    train = ParquetImages(parquet_shards(root, "train"), classes, image_size, augment)
    val = ParquetImages(parquet_shards(root, "val"), classes, image_size, False)
    return train, val



def _resolve_dst(dst: str) -> tuple[pafs.FileSystem, str]:
    if "://" in dst:
        try:
            return pafs.FileSystem.from_uri(dst)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(f"{dst}: unsupported destination URI ({exc})") from exc
    return pafs.LocalFileSystem(), os.path.abspath(dst)


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _check_empty_dst(fs: pafs.FileSystem, path: str, dst: str) -> None:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise DataError(f"{dst}: is a file; expected a folder (new or without Parquet shards)")
    if info.type == pafs.FileType.NotFound:
        return
    entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    stale = [e.base_name for e in entries if e.base_name.endswith(".parquet")]
    stale += [e.base_name for e in entries if e.base_name == CLASSES_FILE]
    if stale:
        # refuse rather than mix or silently delete shards from an earlier export
        raise DataError(f"{dst}: already holds {stale[0]}; expected a folder without shards")


def _shard_schema(classes: list[str]) -> pa.Schema:
    fields = [pa.field("image", pa.binary()), pa.field("label", pa.int64())]
    return pa.schema(fields, metadata={CLASSES_META_KEY: json.dumps(classes).encode()})


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def iter_shards(
    src: str, dst: str, rows_per_shard: int, split: str | None
) -> Iterator[tuple[str, int, list[str]]]:
    """Writes the shards one by one, yielding (shard path, rows, classes) after each."""
    if isinstance(rows_per_shard, bool) or not isinstance(rows_per_shard, int):
        raise DataError(f"rows_per_shard must be an int >= 1; got {rows_per_shard!r}")
    if rows_per_shard < 1:
        raise DataError(f"rows_per_shard must be an int >= 1; got {rows_per_shard!r}")
    folder = os.path.join(src, split) if split else src
    classes, samples = scan_imagefolder(folder)
    fs, base = _resolve_dst(dst)
    _check_empty_dst(fs, base, dst)
    fs.create_dir(base, recursive=True)
    with fs.open_output_stream(_join(base, CLASSES_FILE)) as out:
        out.write(json.dumps(classes).encode())
    schema = _shard_schema(classes)
    for shard, start in enumerate(range(0, len(samples), rows_per_shard)):
        chunk = samples[start : start + rows_per_shard]
        table = pa.table(
            {
                "image": pa.array([_read_bytes(p) for p, _ in chunk], pa.binary()),
                "label": pa.array([label for _, label in chunk], pa.int64()),
            },
            schema=schema,
        )
        name = SHARD_PATTERN.format(shard)
        pq.write_table(table, _join(base, name), filesystem=fs)
        yield _join(dst, name), len(chunk), classes


def imagefolder_to_parquet(
    src: str, dst: str, rows_per_shard: int = 1000, split: str | None = None
) -> list[str]:
    """ImageFolder split -> Parquet shards (image: encoded bytes, label: int64) under dst.

    Class names go to the schema metadata key b"classes" and to dst/_classes.json (JSON lists).
    Returned paths use dst's form (local path or URI).
    """
    return [path for path, _, _ in iter_shards(src, dst, rows_per_shard, split)]

