"""The embedded default: scikit-learn's 8x8 handwritten digits (no download)."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch.utils.data import Dataset

DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2
DIGITS_SHIFT = 1  # max translation in pixels for digits augmentation


class TensorImageDataset(Dataset):
    """Precomputed 1-channel normalised images, served as 3-channel copies.

    With augment, each item is shifted by up to `shift` pixels (pad with the background value,
    random crop), drawing offsets from torch's global RNG.
    """

    needs_decoding = False  # in memory already: DataLoader worker processes would only add IPC

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


def digits_datasets(image_size: int, augment: bool) -> tuple[Dataset, Dataset]:
    x_train, y_train, x_test, y_test, background = _digits_tensors(image_size)
    train = TensorImageDataset(x_train, y_train, augment, background)
    test = TensorImageDataset(x_test, y_test, False, background)
    return train, test

