"""Image-classification datasets for training and pruning, plus ImageFolder -> Parquet export.

Datasets: "digits" (scikit-learn's embedded 8x8 handwritten digits, no download), "cifar10",
"cifar100" (torchvision's on-disk layout), "imagefolder" (ImageNet layout root/train, root/val)
and "parquet" (root/train, root/val of Parquet shards written by `to-parquet`, local or URI;
Ray Train streams them through Ray Data, one process reads them into memory).
Every item is (float32 tensor 3xHxW, normalised; int label).

CLI: python -m ccpcsa.data to-parquet SRC DST [--rows-per-shard N] [--split NAME]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "parquet")
NEEDS_ROOT = ("cifar10", "cifar100", "imagefolder", "parquet")
DEFAULT_IMAGE_SIZE = {"digits": 16, "cifar10": 32, "cifar100": 32, "imagefolder": 224,
                      "parquet": 224}
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}
MIN_IMAGE_SIZE = 8

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2
DIGITS_SHIFT = 1  # max translation in pixels for digits augmentation
SHARD_PATTERN = "part-{:05d}.parquet"
CLASSES_FILE = "_classes.json"
CLASSES_META_KEY = b"classes"


class DataError(ValueError):
    """A bad dataset path or setting; the message names it and what was expected."""


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"
    root: str | None = None
    image_size: int | None = None
    augment: bool = True


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    image_size: int
    channels: int


# ---------------------------------------------------------------- validation


def _validate(cfg: DataConfig) -> int:
    """Checks name, root and image_size; returns the effective image size."""
    if cfg.name not in DATASETS:
        raise DataError(f"unknown dataset {cfg.name!r}; expected one of {', '.join(DATASETS)}")
    if cfg.name in NEEDS_ROOT and not cfg.root:
        raise DataError(f"dataset {cfg.name!r} needs root (a folder); got root={cfg.root!r}")
    size = DEFAULT_IMAGE_SIZE[cfg.name] if cfg.image_size is None else cfg.image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_IMAGE_SIZE:
        raise DataError(f"image_size must be an int >= {MIN_IMAGE_SIZE}; got {cfg.image_size!r}")
    return size


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DataError(f"{path}: not found; expected {what}")


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """Classes and input geometry; for imagefolder this lists the class folders of root/train."""
    size = _validate(cfg)
    if cfg.name == "imagefolder":
        num_classes = len(_find_classes(os.path.join(str(cfg.root), "train")))
    elif cfg.name == "parquet":
        num_classes = len(parquet_classes(str(cfg.root), "train"))
    else:
        num_classes = NUM_CLASSES[cfg.name]
    return DatasetInfo(num_classes=num_classes, image_size=size, channels=3)


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """(train, test) map-style datasets of (float32 3xSxS normalised tensor, int label)."""
    size = _validate(cfg)
    if cfg.name == "digits":
        return _digits(size, cfg.augment)
    if cfg.name in ("cifar10", "cifar100"):
        return _cifar(cfg.name, str(cfg.root), size, cfg.augment)
    if cfg.name == "parquet":
        return _parquet(str(cfg.root), size, cfg.augment)
    return _imagefolder(str(cfg.root), size, cfg.augment)


# ---------------------------------------------------------------- digits


class TensorImageDataset(Dataset):
    """Precomputed 1-channel normalised images, served as 3-channel copies.

    With augment, each item is shifted by up to `shift` pixels (pad with the background value,
    random crop), drawing offsets from torch's global RNG.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        augment: bool,
        pad_value: float,
        shift: int = DIGITS_SHIFT,
    ) -> None:
        self.images = images
        self.labels = labels
        self.targets = labels.tolist()
        self.classes = [str(c) for c in range(10)]
        self.augment = augment
        self.pad_value = pad_value
        self.shift = shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.images[index]
        if self.augment and self.shift > 0:
            img = self._translate(img)
        # repeat copies, so callers may modify the item in place without touching the cache
        return img.repeat(3, 1, 1), self.targets[index]

    def _translate(self, img: torch.Tensor) -> torch.Tensor:
        s = self.shift
        padded = torch.nn.functional.pad(img, (s, s, s, s), value=self.pad_value)
        dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
        return padded[:, dy : dy + img.shape[1], dx : dx + img.shape[2]]


@lru_cache(maxsize=4)
def _digits_tensors(
    image_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Loads, resizes, splits and normalises digits once per image size."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != pixels.shape[-1]:
        pixels = torch.nn.functional.interpolate(
            pixels, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        list(range(len(labels))),
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SEED,
        stratify=digits.target,
    )
    train_idx_t, test_idx_t = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    mean = pixels[train_idx_t].mean()
    std = pixels[train_idx_t].std()
    normed = (pixels - mean) / std
    background = float((0.0 - mean) / std)
    return (
        normed[train_idx_t].contiguous(),
        labels[train_idx_t],
        normed[test_idx_t].contiguous(),
        labels[test_idx_t],
        background,
    )


def _digits(image_size: int, augment: bool) -> tuple[Dataset, Dataset]:
    x_train, y_train, x_test, y_test, background = _digits_tensors(image_size)
    train = TensorImageDataset(x_train, y_train, augment, background)
    test = TensorImageDataset(x_test, y_test, False, background)
    return train, test


# ---------------------------------------------------------------- cifar


class _LayoutCheckedCIFAR10(tv_datasets.CIFAR10):
    """torchvision's CIFAR10 minus the MD5 checks; _cifar checks the file layout beforehand.

    Skipping MD5 lets subsets in the same format load and saves hashing 170 MB per build;
    a damaged file still fails when it is unpickled.
    """

    def _check_integrity(self) -> bool:
        return True

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        with open(path, "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _LayoutCheckedCIFAR100(_LayoutCheckedCIFAR10):
    base_folder = tv_datasets.CIFAR100.base_folder
    train_list = tv_datasets.CIFAR100.train_list
    test_list = tv_datasets.CIFAR100.test_list
    meta = tv_datasets.CIFAR100.meta


def _cifar_layout_error(root: str, cls: type[tv_datasets.CIFAR10]) -> str | None:
    names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    folder = os.path.join(root, cls.base_folder)
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if not missing:
        return None
    return (
        f"{root}: not a torchvision CIFAR folder; expected {cls.base_folder}/ holding "
        f"{', '.join(names)} (missing: {', '.join(missing)})"
    )


def cifar_transform(
    image_size: int, train: bool, mean: Sequence[float], std: Sequence[float]
) -> Callable:
    steps: list[Callable] = []
    if train:
        steps += [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    if image_size != 32:
        steps.append(T.Resize(image_size))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def _cifar(name: str, root: str, image_size: int, augment: bool) -> tuple[Dataset, Dataset]:
    cls = _LayoutCheckedCIFAR10 if name == "cifar10" else _LayoutCheckedCIFAR100
    mean, std = (CIFAR_MEAN, CIFAR_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    error = _cifar_layout_error(root, cls)
    if error:
        raise DataError(error)
    train_tf = cifar_transform(image_size, augment, mean, std)
    test_tf = cifar_transform(image_size, False, mean, std)
    try:
        train = cls(root, train=True, transform=train_tf, download=False)
        test = cls(root, train=False, transform=test_tf, download=False)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as exc:
        folder = os.path.join(root, cls.base_folder)
        raise DataError(f"{folder}: unreadable CIFAR batch files ({exc!r})") from exc
    return train, test


# ---------------------------------------------------------------- imagefolder


def imagefolder_transform(image_size: int, train: bool) -> Callable:
    """Train: RandomResizedCrop + flip; eval: resize to size*256/224 and centre crop."""
    if train:
        steps: list[Callable] = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _is_image(filename: str) -> bool:
    return filename.lower().endswith(IMAGE_EXTENSIONS)


def _find_classes(folder: str) -> list[str]:
    _require_dir(folder, "a folder of class subfolders")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise DataError(f"{folder}: no class folders; expected {folder}/<class>/<image files>")
    return classes


def _class_files(class_dir: str) -> list[str]:
    """Image files under class_dir (recursive, like torchvision's ImageFolder), sorted."""
    files = []
    for dirpath, _, names in sorted(os.walk(class_dir, followlinks=True)):
        files += [os.path.join(dirpath, n) for n in sorted(names) if _is_image(n)]
    return files


def scan_imagefolder(folder: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(sorted class names, [(file path, class index)]) in deterministic order."""
    classes = _find_classes(folder)
    samples: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        class_dir = os.path.join(folder, name)
        files = _class_files(class_dir)
        if not files:
            raise DataError(
                f"{class_dir}: no images; expected files ending in {', '.join(IMAGE_EXTENSIONS)}"
            )
        samples += [(path, index) for path in files]
    return classes, samples


def load_rgb(path: str) -> Image.Image:
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


class ImageFiles(Dataset):
    """Image files with labels, decoded to RGB and transformed on access."""

    def __init__(
        self, samples: list[tuple[str, int]], classes: list[str], transform: Callable
    ) -> None:
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(load_rgb(path)), label


def _imagefolder(root: str, image_size: int, augment: bool) -> tuple[Dataset, Dataset]:
    _require_dir(root, "an ImageNet-style folder holding train/<class>/ and val/<class>/")
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    _require_dir(train_dir, "train/<class>/<image files> under the dataset root")
    _require_dir(val_dir, "val/<class>/<image files> under the dataset root")
    train_classes, train_samples = scan_imagefolder(train_dir)
    val_classes, val_samples = scan_imagefolder(val_dir)
    if val_classes != train_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f"{val_dir}: class folders differ from {train_dir}; expected the same classes "
            f"(only in train: {only_train[:5]}, only in val: {only_val[:5]})"
        )
    train_tf = imagefolder_transform(image_size, train=augment)
    test_tf = imagefolder_transform(image_size, train=False)
    return ImageFiles(train_samples, train_classes, train_tf), ImageFiles(
        val_samples, val_classes, test_tf
    )


def decode_image_batch(images: Sequence[bytes], image_size: int, train: bool) -> torch.Tensor:
    """Encoded image bytes -> N x 3 x S x S float32, with the imagefolder dataset's transforms."""
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise DataError(f"image_size must be an int >= {MIN_IMAGE_SIZE}; got {image_size!r}")
    if image_size < MIN_IMAGE_SIZE:
        raise DataError(f"image_size must be an int >= {MIN_IMAGE_SIZE}; got {image_size!r}")
    transform = imagefolder_transform(image_size, train)
    out = torch.empty(len(images), 3, image_size, image_size, dtype=torch.float32)
    for i, data in enumerate(images):
        try:
            img = Image.open(io.BytesIO(bytes(data))).convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"image {i} of the batch: not a decodable image ({exc})") from exc
        out[i] = transform(img)
    return out


# ---------------------------------------------------------------- parquet shards (read)


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


def _parquet(root: str, image_size: int, augment: bool) -> tuple[Dataset, Dataset]:
    classes = parquet_classes(root, "train")
    if parquet_classes(root, "val") != classes:
        raise DataError(f"{parquet_split_dir(root, 'val')}: classes differ from train; "
                        "expected both splits exported from the same class folders")
    train = ParquetImages(parquet_shards(root, "train"), classes, image_size, augment)
    val = ParquetImages(parquet_shards(root, "val"), classes, image_size, False)
    return train, val


# ---------------------------------------------------------------- parquet export


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


def _iter_shards(
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
    return [path for path, _, _ in _iter_shards(src, dst, rows_per_shard, split)]


# ---------------------------------------------------------------- CLI


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
            "(int64); class names go to the schema metadata and DST/_classes.json."
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
        default=1000,
        metavar="N",
        help="images per Parquet shard (default: 1000)",
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
        for path, n, classes in _iter_shards(args.src, args.dst, args.rows_per_shard, args.split):
            shards, rows, num_classes = shards + 1, rows + n, len(classes)
            print(f"wrote {path} ({n} rows)", flush=True)
    except DataError as exc:
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"done: {rows} images in {num_classes} classes -> {shards} shards in {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
