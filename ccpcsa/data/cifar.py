"""CIFAR-10/100 from a local folder in torchvision's layout (nothing is downloaded).

The batch files are Python pickles. They are read with an unpickler that only builds what a
CIFAR batch holds (dicts, lists, strings, numbers and numpy arrays): a file that asks for any
other class or function (the way a pickle runs code) is refused with DataError, so a
tampered --data-root cannot execute anything here. MD5 sums are not checked: subsets in the
same format load, and hashing 170 MB per build is saved.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from ccpcsa.data.common import CIFAR100_MEAN, CIFAR100_STD, CIFAR_MEAN, CIFAR_STD, DataError


class _Layout:
    def __init__(self, folder: str, train: list[str], test: list[str], meta: str,
                 label_key: str, names_key: str) -> None:
        self.folder, self.train, self.test, self.meta = folder, train, test, meta
        self.label_key, self.names_key = label_key, names_key


LAYOUTS = {
    "cifar10": _Layout("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                       ["test_batch"], "batches.meta", "labels", "label_names"),
    "cifar100": _Layout("cifar-100-python", ["train"], ["test"], "meta", "fine_labels",
                        "fine_label_names"),
}

# Everything a CIFAR batch pickle refers to: numpy's array reconstruction (numpy 1 and 2
# module names, pickle protocols 2-5) and the bytes helper of protocol-2 pickles from Python 3.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refers to {module}.{name}, which a CIFAR batch never holds")
        return super().find_class(module, name)


def load_batch(path: str) -> dict[str, Any]:
    """One CIFAR batch (or meta) file as a dict with str keys; DataError naming the file if it
    is not one."""
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as exc:
        raise DataError(f"{path}: not a CIFAR batch file ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path}: not a CIFAR batch file (holds a {type(entry).__name__})")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


class CifarImages(Dataset):
    """Images (N x 32 x 32 x 3 uint8) and labels from CIFAR batch files, transformed on
    access like torchvision's CIFAR10."""

    def __init__(self, folder: str, files: list[str], label_key: str, classes: list[str],
                 transform: Callable) -> None:
        data, targets = [], []
        for name in files:
            path = os.path.join(folder, name)
            entry = load_batch(path)
            images, labels = entry.get("data"), entry.get(label_key)
            if not isinstance(images, np.ndarray) or images.ndim != 2 or \
                    images.shape[1] != 3072 or not isinstance(labels, list) or \
                    len(labels) != len(images):
                raise DataError(f"{path}: not a CIFAR batch file (expected 'data' N x 3072 "
                                f"and {label_key!r} of N labels)")
            data.append(images.astype(np.uint8, copy=False))
            targets += [int(label) for label in labels]
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.targets = targets
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def _cifar_layout_error(root: str, layout: _Layout) -> str | None:
    names = [*layout.train, *layout.test, layout.meta]
    folder = os.path.join(root, layout.folder)
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if not missing:
        return None
    return (
        f"{root}: not a torchvision CIFAR folder; expected {layout.folder}/ holding "
        f"{', '.join(names)} (missing: {', '.join(missing)})"
    )


def check_cifar_layout(name: str, root: str) -> None:
    error = _cifar_layout_error(root, LAYOUTS[name])
    if error:
        raise DataError(error)


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
    layout = LAYOUTS[name]
    mean, std = (CIFAR_MEAN, CIFAR_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    check_cifar_layout(name, root)
    folder = os.path.join(root, layout.folder)
    meta = load_batch(os.path.join(folder, layout.meta))
    classes = [c.decode("latin1") if isinstance(c, bytes) else str(c)
               for c in meta.get(layout.names_key, [])]
    train_tf = cifar_transform(image_size, augment, mean, std)
    test_tf = cifar_transform(image_size, False, mean, std)
    train = CifarImages(folder, layout.train, layout.label_key, classes, train_tf)
    test = CifarImages(folder, layout.test, layout.label_key, classes, test_tf)
    return train, test
