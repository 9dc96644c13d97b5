"""Image-classification datasets for training and pruning, plus ImageFolder -> Parquet export.

Datasets: "digits" (scikit-learn's embedded 8x8 handwritten digits, no download),
"fashion-mnist" (the standard idx .gz files, default /usr/share/datasets/fashion-mnist), "cifar10",
"cifar100" (torchvision's on-disk layout), "imagefolder" (ImageNet layout root/train, root/val)
and "parquet" (root/train, root/val of Parquet shards written by `to-parquet`, local or URI;
Ray Train streams them through Ray Data, one process reads them into memory).
Every item of a map-style dataset is (float32 tensor 3xHxW, normalised; int label); Parquet
under Ray Train arrives as uint8 pixels and is normalised on the device (Uint8Normalizer).

One module per source (digits, fashion, cifar, imagefolder, parquet); the CLI is
`python -m ccpcsa.data`.
"""

from __future__ import annotations

import os

from torch.utils.data import Dataset, Subset

from ccpcsa.data.cifar import check_cifar_layout, cifar_datasets
from ccpcsa.data.cli import main
from ccpcsa.data.common import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR_MEAN,
    CIFAR_STD,
    DATASETS,
    DEFAULT_IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NEEDS_ROOT,
    NUM_CLASSES,
    DataConfig,
    DataError,
    DatasetInfo,
    Uint8Normalizer,
    subset_indices,
    validate_config,
)
from ccpcsa.data.digits import digits_datasets
from ccpcsa.data.fashion import FASHION_ROOT, check_fashion_files, fashion_datasets
from ccpcsa.data.imagefolder import (
    check_imagefolder,
    decode_image_batch,
    decode_uint8_batch,
    find_classes,
    imagefolder_datasets,
    imagefolder_geometry,
    imagefolder_transform,
    scan_imagefolder,
)
from ccpcsa.data.parquet import (
    Piece,
    ShardIndex,
    calibration_pieces,
    check_parquet_splits,
    decode_pieces,
    decode_task,
    eval_pieces,
    parquet_classes,
    parquet_datasets,
    parquet_rows,
    parquet_shards,
    parquet_split_dir,
    read_piece,
    read_shard_table,
    shard_index,
    steps_per_epoch,
    train_pieces,
    warn_if_class_sorted,
)
from ccpcsa.data.toparquet import imagefolder_to_parquet


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """Classes and input geometry; for imagefolder this lists the class folders of root/train."""
    size = validate_config(cfg)
    if cfg.name == "imagefolder":
        num_classes = len(find_classes(os.path.join(str(cfg.root), "train")))
    elif cfg.name == "parquet":
        num_classes = len(parquet_classes(str(cfg.root), "train"))
    else:
        if cfg.name == "fashion-mnist":
            check_fashion_files(cfg.root or FASHION_ROOT)  # before anything trains
        num_classes = NUM_CLASSES[cfg.name]
    return DatasetInfo(num_classes=num_classes, image_size=size, channels=3)


def check_dataset(cfg: DataConfig) -> DatasetInfo:
    """dataset_info plus what building the datasets would refuse, found cheaply (no image is
    decoded): the CIFAR files (each batch read with the safe unpickler: a tampered one is
    refused here, not in a Ray worker), an ImageFolder's class folders each holding an image.
    Run it before starting anything that is costly to undo."""
    info = dataset_info(cfg)
    if cfg.name in ("cifar10", "cifar100"):
        check_cifar_layout(cfg.name, str(cfg.root))
        cifar_datasets(cfg.name, str(cfg.root), 32, augment=False)  # reads, decodes nothing
    elif cfg.name == "imagefolder":
        check_imagefolder(str(cfg.root))
    return info


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """(train, test) map-style datasets of (float32 3xSxS normalised tensor, int label); the
    training split cut to cfg.train_subset images and the test split to cfg.test_subset
    when those are set (a fixed random subset: the same for every run)."""
    train, test = _full_datasets(cfg)
    if cfg.train_subset and cfg.train_subset < len(train):
        train = Subset(train, subset_indices(len(train), cfg.train_subset))
    if cfg.test_subset and cfg.test_subset < len(test):
        test = Subset(test, subset_indices(len(test), cfg.test_subset))
    return train, test


def _full_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    size = validate_config(cfg)
    if cfg.name == "digits":
        return digits_datasets(size, cfg.augment)
    if cfg.name == "fashion-mnist":
        return fashion_datasets(cfg.root, size, cfg.augment)
    if cfg.name in ("cifar10", "cifar100"):
        return cifar_datasets(cfg.name, str(cfg.root), size, cfg.augment)
    if cfg.name == "parquet":
        return parquet_datasets(str(cfg.root), size, cfg.augment)
    return imagefolder_datasets(str(cfg.root), size, cfg.augment)


__all__ = [
    "CIFAR100_MEAN", "CIFAR100_STD", "CIFAR_MEAN", "CIFAR_STD", "DATASETS", "DEFAULT_IMAGE_SIZE",
    "FASHION_ROOT",
    "IMAGENET_MEAN", "IMAGENET_STD", "NEEDS_ROOT", "NUM_CLASSES", "DataConfig", "DataError",
    "DatasetInfo", "Piece", "ShardIndex", "Uint8Normalizer", "build_datasets",
    "calibration_pieces", "check_dataset", "check_parquet_splits", "dataset_info",
    "decode_image_batch", "decode_pieces", "decode_task", "decode_uint8_batch", "eval_pieces",
    "imagefolder_geometry", "imagefolder_to_parquet", "imagefolder_transform", "main",
    "parquet_classes",
    "parquet_rows", "parquet_shards", "parquet_split_dir", "read_piece", "read_shard_table",
    "scan_imagefolder", "shard_index", "steps_per_epoch", "train_pieces", "warn_if_class_sorted",
]
