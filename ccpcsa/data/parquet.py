"""Parquet shards (image bytes + label), as `python -m ccpcsa.data to-parquet` writes them
(ccpcsa.data.toparquet): reading them for training.

Shuffling. `to-parquet` writes the rows in a seeded random order across classes (an ImageFolder
scan is class-sorted: shards in that order held 1-2 labels per batch). Each shard is cut into
row groups of `rows_per_group` rows; a row group is the unit of shuffling and of random access.
Training then reshuffles every epoch, seeded and reproducible, through an *epoch plan*: a
permutation of all row groups of the split drawn from (seed, epoch), the rows of each group
permuted too, and the resulting sequence cut into `world` equal contiguous ranges of whole
per-worker batches. Every worker computes the same plan, so the plan needs no coordination,
every row is read at most once per epoch, fewer than one global batch of rows is left out per
epoch (as DistributedSampler's drop_last), and each worker gets exactly the same number of
steps (DDP needs that). Pieces (a row group, a row range of its permuted order, a seed) are what
Ray Data's decode tasks read (distributed.ingest); the same seed fixes their augmentation draws.

Why not Ray Data's own shuffles (Ray 2.60): `random_shuffle` and `randomize_block_order`
materialise the whole input in the object store (ImageNet: ~140 GB per epoch per trial);
`read_parquet(shuffle=FileShuffleConfig(seed))` with Train's `streaming_split` shuffles files,
but which worker gets which block depends on who asks first, so an epoch's order is random yet
not reproducible, and whole 1,000-row files are the unit. The plan keeps Ray Data for what it
is good at (parallel read + decode on the cluster's CPUs, prefetching, and a local shuffle
buffer that mixes pieces within a worker).

Evaluation splits the val rows evenly (counts differ by at most one); calibration batches for
channel scoring are whole random row groups drawn across the training split (seeded), which,
rows being shuffled at export, is a uniform random sample of it.

One process (no Ray) reads the shards into memory instead (ParquetImages: map-style, shuffled
each epoch by the same seeded sampler as the other map-style datasets).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset

from ccpcsa.data.common import DataError
from ccpcsa.data.imagefolder import decode_uint8_batch, imagefolder_transform
from ccpcsa.data.jpegdecode import CROP_FIELDS, draw_crops

log = logging.getLogger("ccpcsa.data")

SHARD_PATTERN = "part-{:05d}.parquet"
CLASSES_FILE = "_classes.json"
CLASSES_META_KEY = b"classes"
ROW_ORDER_META_KEY = b"row_order"  # JSON {"shuffled": true, "seed": S}, written by to-parquet
DEFAULT_ROWS_PER_SHARD = 1000
DEFAULT_ROWS_PER_GROUP = 64
FOOTER_THREADS = 16
_CALIBRATION_STREAM = 0x5CA1E  # keeps calibration draws apart from the epoch plans


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


def read_shard_table(path: str) -> pa.Table:
    fs, p = _resolve_dst(path)
    return pq.read_table(p, filesystem=fs, columns=["image", "label"])


# ---------------------------------------------------------------- the index and epoch plans


@dataclass(frozen=True)
class ShardIndex:
    """Every row group of a split: its shards and the rows of each of their row groups. Built
    once from the footers (shard_index); the plans below need nothing else."""

    paths: tuple[str, ...]
    group_rows: tuple[tuple[int, ...], ...]
    shuffled: bool  # rows written in random order across classes (to-parquet's row_order)

    @property
    def rows(self) -> int:
        return sum(sum(groups) for groups in self.group_rows)

    def chunks(self) -> list[tuple[str, int, int]]:
        """(shard path, row group, rows) of every row group, in file order."""
        return [(path, g, n) for path, groups in zip(self.paths, self.group_rows, strict=True)
                for g, n in enumerate(groups)]


def shard_index(root: str, split: str) -> ShardIndex:
    """Reads every shard footer of root/split (no image is read)."""
    paths = parquet_shards(root, split)
    with ThreadPoolExecutor(FOOTER_THREADS) as pool:  # object stores: latency, not bandwidth
        footers = list(pool.map(_readable_footer, paths))
    group_rows = [tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
                  for meta in footers]
    order = (footers[0].metadata or {}).get(ROW_ORDER_META_KEY)
    shuffled = bool(order and json.loads(order).get("shuffled"))
    return ShardIndex(tuple(paths), tuple(group_rows), shuffled)


def _readable_footer(shard: str) -> pq.FileMetaData:
    try:
        return footer(shard)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{shard}: not a readable Parquet shard ({exc})") from None


@functools.lru_cache(maxsize=8192)
def footer(path: str) -> pq.FileMetaData:
    """A shard's footer, read once per process (a decode task reads many pieces of a shard)."""
    fs, p = _resolve_dst(path)
    with fs.open_input_file(p) as f:
        return pq.ParquetFile(f).metadata


def parquet_rows(root: str, split: str) -> int:
    """Rows of a shard folder, from the Parquet footers (no image is read)."""
    return shard_index(root, split).rows


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of a row group's rows in the order `order_seed` permutes them to
    (order_seed < 0: file order). The seed also fixes the rows' augmentation draws."""

    path: str
    group: int
    start: int
    stop: int
    order_seed: int = -1

    @property
    def rows(self) -> int:
        return self.stop - self.start


def steps_per_epoch(index: ShardIndex, world: int, batch_per_worker: int) -> int:
    """Full global batches per epoch: every worker runs exactly this many steps."""
    return index.rows // (world * batch_per_worker)


def train_pieces(index: ShardIndex, seed: int, epoch: int, rank: int, world: int,
                 batch_per_worker: int) -> list[Piece]:
    """Worker `rank`'s rows of epoch `epoch`: its equal contiguous range of a permutation of
    all row groups, rows permuted within each group; every worker computes the same plan."""
    per_worker = steps_per_epoch(index, world, batch_per_worker) * batch_per_worker
    if per_worker == 0:
        raise DataError(f"the training split has {index.rows} rows, fewer than one global "
                        f"batch of {world} x {batch_per_worker}")
    chunks = index.chunks()
    rng = np.random.default_rng([_nonnegative(seed), epoch])
    order = rng.permutation(len(chunks))
    seeds = rng.integers(0, 2**62, size=len(chunks))
    return _cut(chunks, order, seeds, rank * per_worker, (rank + 1) * per_worker)


def eval_pieces(index: ShardIndex, rank: int, world: int) -> list[Piece]:
    """Worker `rank`'s share of the split in file order: row counts differ by at most one."""
    rows = index.rows
    chunks = index.chunks()
    return _cut(chunks, range(len(chunks)), None, rank * rows // world,
                (rank + 1) * rows // world)


def calibration_pieces(index: ShardIndex, rows: int, seed: int, rank: int = 0, world: int = 1
                       ) -> list[Piece]:
    """`rows` rows drawn at random across the whole split (whole row groups in a seeded random
    order, rows permuted within each; the same every call), worker `rank` taking its even share."""
    chunks = index.chunks()
    rng = np.random.default_rng([_nonnegative(seed), _CALIBRATION_STREAM])
    order = rng.permutation(len(chunks))
    seeds = rng.integers(0, 2**62, size=len(chunks))
    rows = min(rows, index.rows)
    return _cut(chunks, order, seeds, rank * rows // world, (rank + 1) * rows // world)


def _cut(chunks: list[tuple[str, int, int]], order, seeds, lo: int, hi: int) -> list[Piece]:
    """Positions [lo, hi) of the row sequence that visits `chunks` in `order`."""
    pieces, pos = [], 0
    for c in order:
        path, group, n = chunks[c]
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            pieces.append(Piece(path, group, a - pos, b - pos,
                                -1 if seeds is None else int(seeds[c])))
        pos += n
        if pos >= hi:
            break
    return pieces


def _nonnegative(seed: int) -> int:
    return int(seed) % 2**63


# ---------------------------------------------------------------- reading and decoding pieces


def read_piece(piece: Piece) -> tuple[list[bytes], np.ndarray]:
    """(encoded images, int64 labels) of a piece, in the piece's row order."""
    fs, p = _resolve_dst(piece.path)
    with fs.open_input_file(p) as f:
        table = pq.ParquetFile(f, metadata=footer(piece.path)).read_row_group(
            piece.group, columns=["image", "label"])
    rows = np.arange(table.num_rows)
    if piece.order_seed >= 0:
        rows = np.random.default_rng(piece.order_seed).permutation(table.num_rows)
    taken = table.take(pa.array(rows[piece.start:piece.stop]))
    return (taken.column("image").to_pylist(),
            taken.column("label").to_numpy().astype(np.int64))


def decode_pieces(batch: dict[str, np.ndarray], image_size: int, train: bool,
                  mix: bool = False, decode: str = "cpu") -> dict[str, np.ndarray]:
    """Ray Data map_batches function: a batch of pieces (columns of Piece's fields) -> their
    rows as {"image": N x S x S x 3 uint8, "label": int64, "checksum": int64 crc32 of the
    encoded image}. A piece's seed (with its start) fixes its augmentation draws; with `mix`
    the rows of all the pieces are shuffled together, in an order their seeds fix (the
    shuffle a consumer-side buffer would do, here on the decode task's CPU). With decode="gpu"
    the pixels are left to the worker: "jpeg" holds the encoded bytes and "crop" each image's
    crop and flip draws (ccpcsa.data.jpegdecode), the same draws the CPU decode makes."""
    images, labels, checksums = [], [], []
    for i in range(len(batch["path"])):
        piece = Piece(str(batch["path"][i]), int(batch["group"][i]), int(batch["start"][i]),
                      int(batch["stop"][i]), int(batch["order_seed"][i]))
        data, piece_labels = read_piece(piece)
        if train and piece.order_seed >= 0:
            torch.manual_seed(int(np.random.SeedSequence([piece.order_seed, piece.start])
                                  .generate_state(1, np.uint64)[0]) % 2**63)
        if decode == "gpu":
            encoded = np.empty(len(data), dtype=object)
            encoded[:] = data
            images.append((encoded, draw_crops(data, train)))
        else:
            images.append(decode_uint8_batch(data, image_size, train))
        labels.append(piece_labels)
        checksums.append(np.array([zlib.crc32(d) for d in data], dtype=np.int64))
    out = {"label": np.concatenate(labels) if labels else np.empty(0, np.int64),
           "checksum": np.concatenate(checksums) if checksums else np.empty(0, np.int64)}
    if decode == "gpu":
        out["jpeg"] = (np.concatenate([e for e, _ in images]) if images
                       else np.empty(0, dtype=object))
        out["crop"] = (np.concatenate([c for _, c in images]) if images
                       else np.empty((0, CROP_FIELDS), np.int64))
    else:
        out["image"] = (np.concatenate(images) if images
                        else np.empty((0, image_size, image_size, 3), np.uint8))
    if mix and len(out["label"]):
        key = [v for i in range(len(batch["path"]))
               for v in (_nonnegative(int(batch["order_seed"][i])), int(batch["start"][i]))]
        order = np.random.default_rng(key).permutation(len(out["label"]))
        out = {k: v[order] for k, v in out.items()}
    return out


def decode_task(batch: dict[str, np.ndarray], image_size: int, decode: str = "cpu"
                ) -> dict[str, np.ndarray]:
    """Ray Data map_batches function over decode tasks (batch_size=1): each row holds "pieces"
    (a JSON list of Piece fields), "train" and "mix"; returns decode_pieces' rows. One stream
    can so carry several segments (epochs, an evaluation), each with its own settings."""
    outs = []
    for i in range(len(batch["pieces"])):
        pieces = json.loads(str(batch["pieces"][i]))
        columns = {k: np.array([p[k] for p in pieces]) for k in
                   ("path", "group", "start", "stop", "order_seed")}
        out = decode_pieces(columns, image_size, bool(batch["train"][i]), bool(batch["mix"][i]),
                            decode)
        outs.append(out)
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


# ---------------------------------------------------------------- one process


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


def check_parquet_splits(root: str) -> list[str]:
    """The class list, after checking that train/ and val/ were exported from the same classes."""
    classes = parquet_classes(root, "train")
    if parquet_classes(root, "val") != classes:
        raise DataError(f"{parquet_split_dir(root, 'val')}: classes differ from train; "
                        "expected both splits exported from the same class folders")
    return classes


def parquet_datasets(root: str, image_size: int, augment: bool) -> tuple[Dataset, Dataset]:
    classes = check_parquet_splits(root)
    train = ParquetImages(parquet_shards(root, "train"), classes, image_size, augment)
    val = ParquetImages(parquet_shards(root, "val"), classes, image_size, False)
    return train, val


def warn_if_class_sorted(index: ShardIndex, folder: str) -> None:
    if not index.shuffled:
        log.warning("%s: rows are in the order they were exported (no row_order metadata: an "
                    "older to-parquet wrote them class by class); batches and calibration "
                    "draws will hold few classes. Export again with this version.", folder)


def _resolve_dst(dst: str) -> tuple[pafs.FileSystem, str]:
    if "://" in dst:
        return _from_uri(dst)
    return _LOCAL, os.path.abspath(dst)


@functools.lru_cache(maxsize=8192)
def _from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """One filesystem object per shard URI and process, not one per piece read (an object
    store's client, credentials and connection pool are set up once)."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"{uri}: unsupported destination URI ({exc})") from exc


_LOCAL = pafs.LocalFileSystem()


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name
