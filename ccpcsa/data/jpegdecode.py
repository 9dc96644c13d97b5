"""JPEG decode on the training worker's device (`--decode gpu`): the decode tasks only read the
encoded bytes and draw each image's crop and flip; the worker decodes a whole batch with
torchvision.io.decode_jpeg (nvJPEG with device="cuda", libjpeg-turbo on the CPU) and applies the
geometry there. The crop and flip draws are made by the same calls, from the same seeds, as the
CPU path's imagefolder_geometry (RandomResizedCrop.get_params, then the flip's torch.rand(1)),
so both paths see the same crops; only the decoders' and resizers' rounding differs.

Per image a CPU decode of an ImageNet JPEG costs ~4 ms of a core (~240 img/s): an 8-GPU node at
~2,800 img/s per GPU would need ~95 cores for decoding alone.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ccpcsa.data.common import DataError

DECODES = ("cpu", "gpu")
CROP_FIELDS = 5  # top, left, height, width, flip; all -1 for the eval geometry


def check_decode(decode: str) -> str:
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {', '.join(DECODES)}; got {decode!r}")
    return decode


def draw_crops(images: Sequence[bytes], train: bool) -> np.ndarray:
    """N x 5 int64 (top, left, height, width, flip) per image: the draws the CPU path's
    RandomResizedCrop + RandomHorizontalFlip make from torch's RNG in the same order. Reads only
    each image's header for its size. Eval: rows of -1 (resize + centre crop, no draw)."""
    out = np.full((len(images), CROP_FIELDS), -1, dtype=np.int64)
    if not train:
        return out
    import torchvision.transforms as T

    for n, data in enumerate(images):
        try:
            header = Image.open(io.BytesIO(bytes(data)))  # lazy: the size, no pixel decode
        except (OSError, ValueError) as exc:
            raise DataError(f"image {n} of the batch: not a decodable image ({exc})") from exc
        top, left, h, w = T.RandomResizedCrop.get_params(header, (0.08, 1.0),
                                                         (3.0 / 4.0, 4.0 / 3.0))
        flip = int(torch.rand(1) < 0.5)
        out[n] = (top, left, h, w, flip)
    return out


def decode_on_device(images: Sequence[bytes | np.ndarray], crops: torch.Tensor | np.ndarray,
                     image_size: int, device: torch.device) -> torch.Tensor:
    """Encoded JPEGs + their crop rows -> N x S x S x 3 uint8 on `device` (the CPU path's
    layout), decoded as one batch there. Non-JPEG images are decoded one by one on the CPU."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    data = [torch.frombuffer(bytearray(bytes(b)), dtype=torch.uint8) for b in images]
    if not data:
        return torch.empty((0, image_size, image_size, 3), dtype=torch.uint8, device=device)
    try:
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # a PNG or a corrupt file among them: one by one, on the CPU
        decoded = []
        for n, d in enumerate(data):
            try:
                decoded.append(decode_image(d, mode=ImageReadMode.RGB).to(device))
            except RuntimeError as exc:
                raise DataError(f"image {n} of the batch: not a decodable image ({exc})"
                                ) from exc
    crops = torch.as_tensor(crops).tolist()
    out = torch.empty((len(data), image_size, image_size, 3), dtype=torch.uint8, device=device)
    resize_to = int(image_size * 256 / 224)
    for n, (img, (top, left, h, w, flip)) in enumerate(zip(decoded, crops, strict=True)):
        if h < 0:  # eval: imagefolder_geometry's Resize + CenterCrop
            img = F.center_crop(F.resize(img, [resize_to], antialias=True),
                                [image_size, image_size])
        else:
            img = F.resized_crop(img, top, left, h, w, [image_size, image_size],
                                 antialias=True)
            if flip:
                img = F.horizontal_flip(img)
        out[n] = img.permute(1, 2, 0)
    return out
