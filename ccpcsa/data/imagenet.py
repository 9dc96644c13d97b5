"""The official ImageNet (ILSVRC2012) archives -> an ImageFolder root that to-parquet reads.

ILSVRC2012_img_train.tar holds one tar per class (n01440764.tar, ...) of that class's JPEGs;
ILSVRC2012_img_val.tar holds the 50,000 validation JPEGs in one flat folder, their classes
in a separate labels file. Both are streamed (never unpacked whole to a temporary folder);
only regular files with an image extension are written, under their base name, so an archive
cannot write outside DST. A file already there at its size is skipped: a stopped unpack runs
again with the same command.
"""

from __future__ import annotations

import csv
import os
import re
import tarfile
from dataclasses import dataclass
from typing import IO

from ccpcsa.data.common import DataError

WNID = re.compile(r"^n\d{8}$")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


@dataclass
class Counts:
    written: int = 0
    kept: int = 0
    classes: int = 0


def read_val_labels(path: str) -> dict[str, str]:
    """Validation file name (ILSVRC2012_val_00000001.JPEG) -> wnid, from LOC_val_solution.csv
    (ImageId,PredictionString: the first token is the class) or from 'file wnid' lines."""
    try:
        with open(path, newline="") as f:
            text = f.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the validation labels ({exc})") from None
    labels: dict[str, str] = {}
    if text.startswith("ImageId,"):
        for row in csv.DictReader(text.splitlines()):
            tokens = (row.get("PredictionString") or "").split()
            if row.get("ImageId") and tokens:
                labels[_val_name(row["ImageId"])] = tokens[0]
    else:
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2:
                labels[_val_name(parts[0])] = parts[1]
    bad = next((w for w in labels.values() if not WNID.match(w)), None)
    if not labels or bad is not None:
        raise DataError(f"{path}: expected LOC_val_solution.csv or lines 'FILE WNID' with "
                        f"wnids like n01751748" + (f"; found {bad!r}" if bad else ""))
    return labels


def unpack_train(tar_path: str, dst: str) -> Counts:
    """ILSVRC2012_img_train.tar -> dst/<wnid>/<file>.JPEG."""
    counts = Counts()
    with _open(tar_path) as outer:
        for member in outer:
            wnid = os.path.basename(member.name).removesuffix(".tar")
            if not member.isfile() or not member.name.endswith(".tar") or not WNID.match(wnid):
                continue
            inner_file = outer.extractfile(member)
            if inner_file is None:
                continue
            counts.classes += 1
            with tarfile.open(fileobj=inner_file, mode="r|*") as inner:
                for image in inner:
                    _write(inner, image, os.path.join(dst, wnid), counts)
    if not counts.classes:
        raise DataError(f"{tar_path}: no class archives (n01440764.tar, ...) inside; expected "
                        "ILSVRC2012_img_train.tar")
    return counts


def unpack_val(tar_path: str, dst: str, labels_path: str) -> Counts:
    """ILSVRC2012_img_val.tar -> dst/<wnid>/<file>.JPEG, classes from the labels file."""
    labels = read_val_labels(labels_path)
    counts = Counts()
    missing = []
    with _open(tar_path) as archive:
        for member in archive:
            name = os.path.basename(member.name)
            if not member.isfile() or not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            wnid = labels.get(name)
            if wnid is None:
                missing.append(name)
                continue
            _write(archive, member, os.path.join(dst, wnid), counts)
    if missing:
        raise DataError(f"{labels_path}: no class for {len(missing)} validation image(s), e.g. "
                        f"{missing[0]}; expected the labels of this archive")
    counts.classes = len(set(labels.values()))
    return counts


def _open(path: str) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r|*")  # a stream: one pass, no index of 1.2M members
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"{path}: not a readable tar archive ({exc})") from None


def _write(archive: tarfile.TarFile, member: tarfile.TarInfo, folder: str,
           counts: Counts) -> None:
    name = os.path.basename(member.name)
    if not member.isfile() or not name.lower().endswith(IMAGE_SUFFIXES):
        return
    target = os.path.join(folder, name)
    if os.path.isfile(target) and os.path.getsize(target) == member.size:
        counts.kept += 1
        return
    source = archive.extractfile(member)
    if source is None:
        return
    os.makedirs(folder, exist_ok=True)
    partial = target + ".part"
    with open(partial, "wb") as out:
        _copy(source, out)
    os.replace(partial, target)
    counts.written += 1


def _copy(source: IO[bytes], out: IO[bytes]) -> None:
    while chunk := source.read(1 << 20):
        out.write(chunk)


def _val_name(image_id: str) -> str:
    name = os.path.basename(image_id.strip())
    return name if name.lower().endswith(IMAGE_SUFFIXES) else f"{name}.JPEG"
