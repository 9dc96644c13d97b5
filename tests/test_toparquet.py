"""to-parquet at cluster scale: parallel workers, resumable per shard, split across machines
with --part; the ImageNet archives unpacked into class folders; shard footers and filesystems
read once per process."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_data import REPO, _write_split

from ccpcsa.data import DataError, imagefolder_to_parquet, read_piece, shard_index
from ccpcsa.data.imagenet import read_val_labels, unpack_train, unpack_val
from ccpcsa.data.parquet import Piece, footer
from ccpcsa.data.toparquet import iter_shards, parse_part


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    _write_split(tmp_path / "src", per_class=7, seed=3)
    return tmp_path / "src"


def _tables(paths: list[str]) -> list[list]:
    return [pq.read_table(p).to_pylist() for p in paths]


def test_parallel_export_writes_the_same_shards_as_one_process(folder, tmp_path):
    one = imagefolder_to_parquet(str(folder), str(tmp_path / "one"), rows_per_shard=4)
    two = imagefolder_to_parquet(str(folder), str(tmp_path / "two"), rows_per_shard=4,
                                 workers=2)
    assert len(one) == 6 and [Path(p).name for p in one] == [Path(p).name for p in two]
    assert _tables(one) == _tables(two)
    assert not list((tmp_path / "two").glob(".*.tmp"))


def test_an_export_stopped_half_way_writes_only_what_is_missing(folder, tmp_path):
    dst = tmp_path / "out"
    whole = _tables(imagefolder_to_parquet(str(folder), str(dst), rows_per_shard=4))
    (dst / "part-00001.parquet").unlink()  # never written
    (dst / "part-00003.parquet").write_bytes(b"PAR1 cut short")  # killed mid-write elsewhere
    again = list(iter_shards(str(folder), str(dst), rows_per_shard=4, workers=2))
    rewritten = sorted(Path(path).name for path, _, _, written in again if written)
    assert rewritten == ["part-00001.parquet", "part-00003.parquet"]
    assert _tables(sorted(str(p) for p in dst.glob("part-*.parquet"))) == whole
    with pytest.raises(DataError, match="another rows_per_shard"):
        imagefolder_to_parquet(str(folder), str(dst), rows_per_shard=5)
    with pytest.raises(DataError, match="another seed"):
        imagefolder_to_parquet(str(folder), str(dst), rows_per_shard=4, seed=1)


def test_parts_on_two_machines_make_one_export(folder, tmp_path):
    whole = _tables(imagefolder_to_parquet(str(folder), str(tmp_path / "all"),
                                           rows_per_shard=4))
    shared = tmp_path / "shared"
    mine = [Path(p).name for p, *_ in iter_shards(str(folder), str(shared), 4, part=(0, 2))]
    theirs = [Path(p).name for p, *_ in iter_shards(str(folder), str(shared), 4, part=(1, 2))]
    assert mine == ["part-00000.parquet", "part-00002.parquet", "part-00004.parquet"]
    assert theirs == ["part-00001.parquet", "part-00003.parquet", "part-00005.parquet"]
    assert _tables(sorted(str(p) for p in shared.glob("part-*.parquet"))) == whole
    assert shard_index(str(tmp_path), "shared").rows == 21


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "-1/3"])
def test_a_bad_part_is_one_line_naming_it(text):
    with pytest.raises(DataError, match="--part"):
        parse_part(text)


def test_cli_part_and_workers(folder, tmp_path):
    command = [sys.executable, "-m", "ccpcsa.data", "to-parquet", str(folder),
               str(tmp_path / "cli"), "--rows-per-shard", "10", "--workers", "2"]
    done = subprocess.run([*command, "--part", "1/2"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote " in done.stdout and "part-00001.parquet" in done.stdout
    assert "part 1/2, 2 workers" in done.stdout and "rows/s" in done.stdout
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "kept (written earlier)" in again.stdout and "21 images in 3 classes -> 3 shards" \
        in again.stdout
    bad = subprocess.run([*command, "--part", "3/2"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "--part 3/2" in bad.stderr


def test_footers_and_filesystems_are_read_once_per_process(folder, tmp_path):
    imagefolder_to_parquet(str(folder), str(tmp_path / "data" / "train"), rows_per_shard=21,
                           rows_per_group=3)
    uri = (tmp_path / "data").as_uri()
    index = shard_index(uri, "train")
    (path,) = index.paths
    footer.cache_clear()
    rows = [read_piece(Piece(path, group, 0, 3))[1] for group in range(7)]
    assert footer.cache_info().misses == 1 and footer.cache_info().hits == 6
    assert sorted(np.concatenate(rows).tolist()) == [0] * 7 + [1] * 7 + [2] * 7


# ---------------------------------------------------------------- ImageNet archives

def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _imagenet_archives(folder: Path) -> tuple[Path, Path, Path]:
    train_tar = folder / "ILSVRC2012_img_train.tar"
    with tarfile.open(train_tar, "w") as outer:
        for k, wnid in enumerate(("n01440764", "n01443537")):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as archive:
                for i in range(3):
                    _add(archive, f"{wnid}_{i}.JPEG", _jpeg(10 * k + i))
                _add(archive, "../../escape.JPEG", _jpeg(99))  # must stay inside DST
            _add(outer, f"{wnid}.tar", inner.getvalue())
    val_tar = folder / "ILSVRC2012_img_val.tar"
    with tarfile.open(val_tar, "w") as archive:
        for i in range(1, 5):
            _add(archive, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(100 + i))
    labels = folder / "LOC_val_solution.csv"
    labels.write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i:08d},{('n01440764', 'n01443537')[i % 2]} 1 2 3 4\n"
        for i in range(1, 5)))
    return train_tar, val_tar, labels


def test_imagenet_archives_unpack_into_class_folders_that_export(tmp_path):
    train_tar, val_tar, labels = _imagenet_archives(tmp_path)
    root = tmp_path / "imagenet"
    done = subprocess.run(
        [sys.executable, "-m", "ccpcsa.data", "imagenet-folders", str(root), "--train-tar",
         str(train_tar), "--val-tar", str(val_tar), "--val-labels", str(labels)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train: 8 images written, 0 kept" in done.stdout
    assert "val: 4 images written, 0 kept (unpacked earlier) in 2 classes" in done.stdout
    assert sorted(p.name for p in (root / "val" / "n01443537").iterdir()) == [
        "ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000003.JPEG"]
    assert (root / "train" / "n01440764" / "escape.JPEG").is_file()
    assert not (tmp_path / "escape.JPEG").exists() and not (root / "escape.JPEG").exists()
    assert unpack_train(str(train_tar), str(root / "train")).kept == 8  # resumable
    shards = imagefolder_to_parquet(str(root), str(tmp_path / "pq"), split="val")
    assert sorted(pq.read_table(shards[0]).column("label").to_pylist()) == [0, 0, 1, 1]


def test_val_labels_in_either_format_and_refusals(tmp_path):
    plain = tmp_path / "labels.txt"
    plain.write_text("ILSVRC2012_val_00000001.JPEG n01751748\nILSVRC2012_val_00000002.JPEG "
                     "n09193705\n")
    assert read_val_labels(str(plain)) == {"ILSVRC2012_val_00000001.JPEG": "n01751748",
                                           "ILSVRC2012_val_00000002.JPEG": "n09193705"}
    plain.write_text("ILSVRC2012_val_00000001.JPEG 65\n")  # devkit class numbers: not wnids
    with pytest.raises(DataError, match="'65'"):
        read_val_labels(str(plain))
    _, val_tar, labels = _imagenet_archives(tmp_path)
    labels.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 1 2 3 4\n")
    with pytest.raises(DataError, match="no class for 3 validation image"):
        unpack_val(str(val_tar), str(tmp_path / "val"), str(labels))
