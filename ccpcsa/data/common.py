"""What every dataset shares: its configuration, errors, geometry and normalisation constants."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "imagefolder", "parquet")
NEEDS_ROOT = ("cifar10", "cifar100", "imagefolder", "parquet")
DEFAULT_IMAGE_SIZE = {"digits": 16, "fashion-mnist": 28, "cifar10": 32, "cifar100": 32,
                      "imagefolder": 224, "parquet": 224}
NUM_CLASSES = {"digits": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100}
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
    # > 0: train (and score channels, re-estimate BatchNorm) on a fixed random N images of the
    # training split, the same N whatever the seed; the test split stays whole. For quick
    # searches and benchmarks; not for parquet (streamed by Ray Data).
    train_subset: int = 0
    # > 0: evaluate on a fixed random N images of the test split (a search's screening rounds:
    # a cheaper, noisier accuracy; search --screen-eval-images)
    test_subset: int = 0
    # parquet through Ray Data only (ccpcsa.distributed.ingest.IngestConfig): where JPEGs are
    # decoded ("cpu": Ray Data tasks; "gpu": the training worker's device), how batches reach
    # the device ("ring", "ray_pin", "pageable") and how many batches Ray Data prefetches
    decode: str = "cpu"
    host_copy: str = "ring"
    prefetch_batches: int = 2


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
    for name in ("train_subset", "test_subset"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DataError(f"{name} must be an int >= 0; got {value!r}")
        if value and cfg.name == "parquet":
            raise DataError(f"{name} is not supported for parquet (Ray Data streams the "
                            "shards); write a smaller set of shards instead")
    return size


def subset_indices(size: int, count: int) -> list[int]:
    """A fixed random `count` of `size` indices (seed 0: the same for every run and seed)."""
    gen = torch.Generator().manual_seed(0)
    return sorted(torch.randperm(size, generator=gen)[:count].tolist())


def require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DataError(f"{path}: not found; expected {what}")


# ---------------------------------------------------------------- normalisation on the device


class Uint8Normalizer:
    """N x H x W x 3 uint8 pixels -> N x 3 x H x W float32 (x / 255 - mean) / std on the pixels'
    device: the ops of ToTensor + Normalize, so the result equals the CPU float path. The output
    is a view of the NHWC input's layout, i.e. channels_last memory (what cuDNN wants)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device
                 ) -> None:
        # made once: building these per batch would copy from host memory at every step
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected N x H x W x 3 uint8 pixels, got {images.dtype} "
                             f"{tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float().div_(255)
        return x.sub_(self.mean).div_(self.std)
