"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) from the four standard idx `.gz` files.

Debian's `dataset-fashion-mnist` package puts them in /usr/share/datasets/fashion-mnist (the
default root); any folder holding the same four files works. 60,000 training and 10,000 test
images, 28x28 grayscale, 10 classes; nothing is downloaded.

Grayscale is replicated to 3 channels, as for digits: every registered model (torchvision's
and the CIFAR ResNets) takes 3-channel input, checkpoints record (3, H, W), and the only cost is
the stem conv's 3x input MACs (resnet20 at 28x28: 0.3 M of 38 M). Normalised by the training
split's pixel mean and standard deviation. Augmentation (training only): a random shift of up
to 2 pixels (zero-padded, as the background is black) and a horizontal flip, the usual
choice for Fashion-MNIST (garments are left-right symmetric; digits are not flipped).
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

from ccpcsa.data.common import DataError

FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_SIZE = 28
FASHION_SHIFT = 2
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
_IMAGES_MAGIC, _LABELS_MAGIC = 0x0803, 0x0801  # idx: unsigned bytes, 3 dims / 1 dim


def check_fashion_files(root: str) -> None:
    """One-line DataError when any of the four files is missing from `root`."""
    names = [n for pair in FASHION_FILES.values() for n in pair]
    missing = [n for n in names if not os.path.isfile(os.path.join(root, n))]
    if missing:
        raise DataError(
            f"{root}: Fashion-MNIST not found (missing {', '.join(missing)}); install it with "
            f"`apt-get install dataset-fashion-mnist` (files in {FASHION_ROOT}) or pass "
            "--data-root FOLDER holding the four idx .gz files")


def read_idx(path: str, magic: int, dims: int) -> np.ndarray:
    """An idx file (gzip-compressed) as a uint8 array of its `dims` dimensions."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    header = 4 + 4 * dims
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path}: not an idx file of {dims}-dimensional unsigned bytes "
                        f"(expected magic number 0x{magic:08x})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(f"{path}: holds {len(raw) - header} bytes of data, its header "
                        f"promises {int(np.prod(shape))} (shape {shape})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _read_split(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    image_file, label_file = (os.path.join(root, n) for n in FASHION_FILES[split])
    images = read_idx(image_file, _IMAGES_MAGIC, 3)
    labels = read_idx(label_file, _LABELS_MAGIC, 1)
    if len(images) != len(labels):
        raise DataError(f"{root}: {split} split has {len(images)} images but "
                        f"{len(labels)} labels")
    if labels.size and int(labels.max()) >= len(FASHION_CLASSES):
        raise DataError(f"{label_file}: label {int(labels.max())} is not one of the "
                        f"{len(FASHION_CLASSES)} classes")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


@lru_cache(maxsize=2)
def _fashion_tensors(root: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor, float, float]:
    """uint8 images and labels of both splits, plus the training split's mean and std."""
    check_fashion_files(root)
    x_train, y_train = _read_split(root, "train")
    x_test, y_test = _read_split(root, "test")
    pixels = x_train.double() / 255.0
    return x_train, y_train, x_test, y_test, float(pixels.mean()), float(pixels.std())


class GrayscaleDataset(Dataset):
    """uint8 N x H x W images served as normalised 3 x S x S float tensors (the channel
    replicated); with augment, a random shift of up to `shift` pixels and a horizontal flip,
    drawn from torch's global RNG (seeded per worker by the trainers)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int,
                 mean: float, std: float, augment: bool, shift: int = FASHION_SHIFT) -> None:
        self.images, self.labels = images, labels
        self.targets = labels.tolist()
        self.classes = list(FASHION_CLASSES)
        self.image_size, self.mean, self.std = image_size, mean, std
        self.augment, self.shift = augment, shift

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.images[index].float().div_(255.0)[None]  # 1 x H x W
        if self.augment:
            img = self._augment(img)
        if img.shape[-1] != self.image_size:
            img = torch.nn.functional.interpolate(
                img[None], size=(self.image_size, self.image_size), mode="bilinear",
                align_corners=False)[0]
        img = (img - self.mean) / self.std
        return img.expand(3, -1, -1).contiguous(), self.targets[index]

    def _augment(self, img: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        s = self.shift
        if s > 0:
            padded = torch.nn.functional.pad(img, (s, s, s, s))
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            img = padded[:, dy:dy + img.shape[1], dx:dx + img.shape[2]]
        return img


def fashion_datasets(root: str | None, image_size: int, augment: bool
                     ) -> tuple[Dataset, Dataset]:
    """(train, test) of Fashion-MNIST from `root` (default FASHION_ROOT)."""
    x_train, y_train, x_test, y_test, mean, std = _fashion_tensors(
        os.path.abspath(root or FASHION_ROOT))
    return (GrayscaleDataset(x_train, y_train, image_size, mean, std, augment),
            GrayscaleDataset(x_test, y_test, image_size, mean, std, False))
