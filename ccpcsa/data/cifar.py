"""CIFAR-10/100 from a local folder in torchvision's layout (nothing is downloaded)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence

from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T

from ccpcsa.data.common import CIFAR100_MEAN, CIFAR100_STD, CIFAR_MEAN, CIFAR_STD, DataError


class _LayoutCheckedCIFAR10(tv_datasets.CIFAR10):
    """torchvision's CIFAR10 minus the MD5 checks; cifar_datasets checks the file layout beforehand.

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


def cifar_datasets(name: str, root: str, image_size: int, augment: bool) -> tuple[Dataset, Dataset]:
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

