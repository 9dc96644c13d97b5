"""Synthetic photo-like JPEGs for the data-path benchmarks (no download, no scikit-learn).

A smooth random field (bicubic upsampling of coarse noise) plus fine grain, saved at JPEG
quality 94: 400-520 x 265-415 pixels, 75-135 KB (mean ~106 KB), the resolution and size of an
average ImageNet training image (~400 x 350, ~110 KB), which is what decoding cost depends on.
A pool of distinct images is made once and cycled through, so a large folder is cheap to write.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def photo_jpeg(rng: np.random.Generator, grain: np.ndarray) -> bytes:
    width = int(rng.integers(400, 521))
    height = int(width * rng.uniform(0.66, 0.8))
    coarse = rng.integers(0, 256, (height // 24 + 2, width // 24 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC),
                        dtype=np.int16)
    y = int(rng.integers(0, grain.shape[0] - height))
    x = int(rng.integers(0, grain.shape[1] - width))
    pixels = np.clip(smooth + grain[y:y + height, x:x + width], 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=94)
    return out.getvalue()


def jpeg_pool(count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    grain = rng.normal(0, 20, (600, 640, 3)).astype(np.int16)
    return [photo_jpeg(rng, grain) for _ in range(count)]


def write_imagefolder(root: Path, split_sizes: dict[str, int], classes: int, pool: list[bytes]
                      ) -> None:
    """root/<split>/class_NNN/<i>.jpg in class order (as an ImageNet scan is), cycling `pool`."""
    k = 0
    for split, count in split_sizes.items():
        for i in range(count):
            folder = root / split / f"class_{i * classes // count:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:06d}.jpg").write_bytes(pool[k % len(pool)])
            k += 1


def write_parquet_dataset(work: Path, split_sizes: dict[str, int], classes: int,
                          pool: list[bytes]) -> str:
    """write_imagefolder under work/folder, then each split exported by to-parquet (shuffled
    across classes) to work/parquet/<split>; returns that Parquet root."""
    from ccpcsa.data import imagefolder_to_parquet

    write_imagefolder(work / "folder", split_sizes, classes, pool)
    for split in split_sizes:
        imagefolder_to_parquet(str(work / "folder" / split), str(work / "parquet" / split))
    return str(work / "parquet")
