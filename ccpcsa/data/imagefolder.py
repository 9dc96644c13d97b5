"""ImageNet-style folders (root/train/<class>/..., root/val/<class>/...) and image decoding."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms as T

from ccpcsa.data.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MIN_IMAGE_SIZE,
    DataError,
    require_dir,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def imagefolder_geometry(image_size: int, train: bool) -> Callable[[Image.Image], Image.Image]:
    """PIL -> PIL. Train: RandomResizedCrop + flip; eval: resize to size*256/224, centre crop."""
    if train:
        return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()])
    return T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size)])


def imagefolder_transform(image_size: int, train: bool) -> Callable:
    """PIL -> normalised float32 3xSxS: imagefolder_geometry, then ToTensor + Normalize."""
    return T.Compose([imagefolder_geometry(image_size, train), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _is_image(filename: str) -> bool:
    return filename.lower().endswith(IMAGE_EXTENSIONS)


def find_classes(folder: str) -> list[str]:
    require_dir(folder, "a folder of class subfolders")
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
    classes = find_classes(folder)
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
    """The image file decoded to RGB; DataError naming the file if it is unreadable,
    truncated or not an image."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from None


def check_imagefolder(root: str) -> None:
    """What imagefolder_datasets would refuse, found without listing every file: train/ and
    val/ with the same class folders, each holding at least one image (the scan of a class
    stops at its first image)."""
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    require_dir(root, "an ImageNet-style folder holding train/<class>/ and val/<class>/")
    require_dir(train_dir, "train/<class>/<image files> under the dataset root")
    require_dir(val_dir, "val/<class>/<image files> under the dataset root")
    train_classes, val_classes = find_classes(train_dir), find_classes(val_dir)
    _check_same_classes(train_dir, train_classes, val_dir, val_classes)
    for folder, classes in ((train_dir, train_classes), (val_dir, val_classes)):
        for name in classes:
            class_dir = os.path.join(folder, name)
            if not _has_image(class_dir):
                raise DataError(f"{class_dir}: no images; expected files ending in "
                                f"{', '.join(IMAGE_EXTENSIONS)}")


def _has_image(class_dir: str) -> bool:
    for _dirpath, _dirs, names in os.walk(class_dir, followlinks=True):
        if any(_is_image(n) for n in names):
            return True
    return False


def _check_same_classes(train_dir: str, train_classes: list[str], val_dir: str,
                        val_classes: list[str]) -> None:
    if val_classes != train_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f"{val_dir}: class folders differ from {train_dir}; expected the same classes "
            f"(only in train: {only_train[:5]}, only in val: {only_val[:5]})"
        )


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


def imagefolder_datasets(root: str, image_size: int, augment: bool) -> tuple[Dataset, Dataset]:
    require_dir(root, "an ImageNet-style folder holding train/<class>/ and val/<class>/")
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    require_dir(train_dir, "train/<class>/<image files> under the dataset root")
    require_dir(val_dir, "val/<class>/<image files> under the dataset root")
    train_classes, train_samples = scan_imagefolder(train_dir)
    val_classes, val_samples = scan_imagefolder(val_dir)
    _check_same_classes(train_dir, train_classes, val_dir, val_classes)
    train_tf = imagefolder_transform(image_size, train=augment)
    test_tf = imagefolder_transform(image_size, train=False)
    return ImageFiles(train_samples, train_classes, train_tf), ImageFiles(
        val_samples, val_classes, test_tf
    )


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise DataError(f"image_size must be an int >= {MIN_IMAGE_SIZE}; got {image_size!r}")
    if image_size < MIN_IMAGE_SIZE:
        raise DataError(f"image_size must be an int >= {MIN_IMAGE_SIZE}; got {image_size!r}")


def _open_rgb(data: bytes, index: int) -> Image.Image:
    try:
        return Image.open(io.BytesIO(bytes(data))).convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"image {index} of the batch: not a decodable image ({exc})") from exc


def decode_image_batch(images: Sequence[bytes], image_size: int, train: bool) -> torch.Tensor:
    """Encoded image bytes -> N x 3 x S x S float32, with the imagefolder dataset's transforms
    (ToTensor + Normalize on the CPU). The Parquet path sends decode_uint8_batch's pixels
    instead and normalises on the device (Uint8Normalizer)."""
    _check_size(image_size)
    transform = imagefolder_transform(image_size, train)
    out = torch.empty(len(images), 3, image_size, image_size, dtype=torch.float32)
    for i, data in enumerate(images):
        out[i] = transform(_open_rgb(data, i))
    return out


def decode_uint8_batch(images: Sequence[bytes], image_size: int, train: bool) -> np.ndarray:
    """Encoded image bytes -> N x S x S x 3 uint8 pixels after imagefolder_geometry: the same
    crops as decode_image_batch (same random draws from torch's RNG), a quarter of the bytes,
    no float work on the CPU."""
    _check_size(image_size)
    geometry = imagefolder_geometry(image_size, train)
    out = np.empty((len(images), image_size, image_size, 3), dtype=np.uint8)
    for i, data in enumerate(images):
        out[i] = np.asarray(geometry(_open_rgb(data, i)))
    return out

