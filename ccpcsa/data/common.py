"""What every dataset shares: its configuration, errors, geometry and normalisation constants."""

from __future__ import annotations

import os
from dataclasses import dataclass

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


def validate_config(cfg: DataConfig) -> int:
    """Checks name, root and image_size; returns the effective image size."""
    if cfg.name not in DATASETS:
        raise DataError(f"unknown dataset {cfg.name!r}; expected one of {', '.join(DATASETS)}")
    if cfg.name in NEEDS_ROOT and not cfg.root:
        raise DataError(f"dataset {cfg.name!r} needs root (a folder); got root={cfg.root!r}")
    size = DEFAULT_IMAGE_SIZE[cfg.name] if cfg.image_size is None else cfg.image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_IMAGE_SIZE:
        raise DataError(f"image_size must be an int >= {MIN_IMAGE_SIZE}; got {cfg.image_size!r}")
    return size


def require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DataError(f"{path}: not found; expected {what}")


