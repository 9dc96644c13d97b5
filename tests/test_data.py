"""Datasets and Parquet export on real (small, locally written) data."""

from __future__ import annotations

import collections
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ccpcsa.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    DATASETS,
    DataConfig,
    DataError,
    DatasetInfo,
    build_datasets,
    dataset_info,
    decode_image_batch,
    imagefolder_to_parquet,
    main,
)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fixtures


def _write_cifar10(root: Path, per_batch: int = 4) -> np.ndarray:
    """torchvision's CIFAR-10 python layout; returns the test batch's raw data."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    data = None
    for name in names:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        batch = {"batch_label": name, "data": data, "labels": [i % 10 for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    assert data is not None
    return data


def _write_cifar100(root: Path, n: int = 6) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in ("train", "test"):
        batch = {
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "fine_labels": [i * 17 % 100 for i in range(n)],
            "coarse_labels": [0] * n,
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": ["x"] * 20}
    (folder / "meta").write_bytes(pickle.dumps(meta))


CLASSES = ["cat", "dog", "fox"]


def _write_split(folder: Path, per_class: int, seed: int) -> dict[Path, int]:
    rng = np.random.default_rng(seed)
    files = {}
    for label, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(32, 40, 3), dtype=np.uint8)
            suffix = ".jpg" if i == 0 else ".png"
            path = folder / name / f"img{i}{suffix}"
            Image.fromarray(pixels).save(path)
            files[path] = label
    (folder / CLASSES[0] / "notes.txt").write_text("not an image")
    return files


@pytest.fixture
def imagenet(tmp_path: Path) -> tuple[Path, dict[Path, int], dict[Path, int]]:
    root = tmp_path / "imagenet"
    train = _write_split(root / "train", per_class=3, seed=0)
    val = _write_split(root / "val", per_class=2, seed=1)
    return root, train, val


# ---------------------------------------------------------------- digits


def test_digits_shapes_labels_and_split_sizes() -> None:
    train, test = build_datasets(DataConfig())
    assert (len(train), len(test)) == (1437, 360)
    image, label = train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert isinstance(label, int)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    test_counts = collections.Counter(test[i][1] for i in range(len(test)))
    assert sorted(test_counts) == list(range(10))
    assert all(35 <= c <= 37 for c in test_counts.values())  # stratified: ~36 per class
    assert dataset_info(DataConfig()) == dataset_info(DataConfig(image_size=16))
    assert dataset_info(DataConfig()).num_classes == 10


def test_digits_is_deterministic_and_normalised() -> None:
    cfg = DataConfig(augment=False)
    a_train, a_test = build_datasets(cfg)
    b_train, b_test = build_datasets(cfg)
    x = torch.stack([a_train[i][0] for i in range(len(a_train))])
    y = torch.stack([b_train[i][0] for i in range(len(b_train))])
    assert torch.equal(x, y)
    assert [a_test[i][1] for i in range(50)] == [b_test[i][1] for i in range(50)]
    assert abs(x.mean().item()) < 1e-4
    assert abs(x.std().item() - 1.0) < 1e-3


def test_digits_augmentation_shifts_train_only() -> None:
    plain_train, plain_test = build_datasets(DataConfig(augment=False, image_size=8))
    aug_train, aug_test = build_datasets(DataConfig(augment=True, image_size=8))
    assert aug_train[0][0].shape == (3, 8, 8)
    original = plain_train[0][0]
    background = original.min()
    torch.manual_seed(0)
    changed = 0
    for _ in range(20):
        shifted, _ = aug_train[0]
        padded = torch.nn.functional.pad(original, (1, 1, 1, 1), value=background.item())
        windows = [padded[:, dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]
        assert any(torch.allclose(shifted, w) for w in windows)
        changed += not torch.equal(shifted, original)
    assert changed > 0
    assert all(torch.equal(aug_test[5][0], plain_test[5][0]) for _ in range(5))  # never augmented


def test_digits_item_is_a_copy() -> None:
    train, _ = build_datasets(DataConfig(augment=False))
    image, _ = train[3]
    image.zero_()
    assert train[3][0].abs().sum() > 0


# ---------------------------------------------------------------- cifar


def test_cifar10_fake_folder_loads(tmp_path: Path) -> None:
    test_data = _write_cifar10(tmp_path)
    train, test = build_datasets(DataConfig("cifar10", root=str(tmp_path), augment=False))
    assert (len(train), len(test)) == (20, 4)
    image, label = test[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 1
    raw = torch.tensor(test_data[1].reshape(3, 32, 32), dtype=torch.float32) / 255
    expected = (raw - torch.tensor(CIFAR_MEAN)[:, None, None]) / torch.tensor(CIFAR_STD)[
        :, None, None
    ]
    assert torch.allclose(image, expected, atol=1e-5)
    info = dataset_info(DataConfig("cifar10", root=str(tmp_path)))
    assert (info.num_classes, info.image_size, info.channels) == (10, 32, 3)
    aug_train, _ = build_datasets(DataConfig("cifar10", root=str(tmp_path), image_size=16))
    assert aug_train[0][0].shape == (3, 16, 16)


def test_cifar100_fake_folder_loads(tmp_path: Path) -> None:
    _write_cifar100(tmp_path)
    train, test = build_datasets(DataConfig("cifar100", root=str(tmp_path)))
    assert (len(train), len(test)) == (6, 6)
    assert test[1][1] == 17 and train[0][0].shape == (3, 32, 32)
    assert dataset_info(DataConfig("cifar100", root=str(tmp_path))).num_classes == 100


# ---------------------------------------------------------------- errors


def _error(cfg: DataConfig) -> str:
    with pytest.raises(DataError) as info:
        build_datasets(cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_test_subset_is_a_fixed_random_part_of_the_test_split() -> None:
    train, test = build_datasets(DataConfig())
    small_train, small = build_datasets(DataConfig(test_subset=50))
    assert len(small_train) == len(train) and len(small) == 50
    assert small.indices == build_datasets(DataConfig(test_subset=50))[1].indices
    assert small.indices != list(range(50))  # drawn across the split, not its head
    assert torch.equal(small[0][0], test[small.indices[0]][0])
    assert len(build_datasets(DataConfig(test_subset=1000))[1]) == len(test)  # > split: all
    assert "test_subset" in _error(DataConfig(test_subset=-1))
    assert "parquet" in _error(DataConfig(name="parquet", root="x", test_subset=5))


def test_config_errors() -> None:
    message = _error(DataConfig(name="mnist"))
    assert "mnist" in message and all(name in message for name in DATASETS)
    assert "3" in _error(DataConfig(image_size=3))
    assert "root" in _error(DataConfig(name="cifar10"))
    with pytest.raises(DataError, match="imagefolder"):
        dataset_info(DataConfig(name="imagefolder"))


def test_cifar_missing_or_wrong_layout(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    message = _error(DataConfig("cifar10", root=str(missing)))
    assert str(missing) in message and "cifar-10-batches-py" in message
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"")
    message = _error(DataConfig("cifar100", root=str(tmp_path)))
    assert str(tmp_path) in message and "cifar-100-python" in message and "test" in message


def test_cifar_corrupt_batch(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    assert "cifar-10-batches-py" in _error(DataConfig("cifar10", root=str(tmp_path)))


def test_imagefolder_errors(tmp_path: Path) -> None:
    root = tmp_path / "inet"
    assert str(root) in _error(DataConfig("imagefolder", root=str(root)))
    root.mkdir()
    assert str(root / "train") in _error(DataConfig("imagefolder", root=str(root)))
    (root / "train").mkdir()
    (root / "val").mkdir()
    assert "no class folders" in _error(DataConfig("imagefolder", root=str(root)))
    (root / "train" / "a").mkdir()
    message = _error(DataConfig("imagefolder", root=str(root)))
    assert str(root / "train" / "a") in message and "no images" in message
    Image.new("RGB", (8, 8)).save(root / "train" / "a" / "x.png")
    (root / "val" / "b").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "b" / "y.png")
    message = _error(DataConfig("imagefolder", root=str(root)))
    assert str(root / "val") in message and "'a'" in message and "'b'" in message


# ---------------------------------------------------------------- imagefolder


def test_imagefolder_loads(imagenet: tuple[Path, dict, dict]) -> None:
    root, train_files, val_files = imagenet
    cfg = DataConfig("imagefolder", root=str(root), image_size=24)
    train, val = build_datasets(cfg)
    assert (len(train), len(val)) == (len(train_files), len(val_files)) == (9, 6)
    assert train.classes == CLASSES and val.classes == CLASSES
    assert {Path(p): label for p, label in train.samples} == train_files
    for dataset in (train, val):
        image, label = dataset[len(dataset) - 1]
        assert image.shape == (3, 24, 24) and image.dtype == torch.float32
        assert label == 2
    info = dataset_info(cfg)
    assert (info.num_classes, info.image_size, info.channels) == (3, 24, 3)
    assert dataset_info(DataConfig("imagefolder", root=str(root))).image_size == 224


# ---------------------------------------------------------------- parquet


def _read_shards(paths: list[str]) -> tuple[list[bytes], list[int], list[str]]:
    images: list[bytes] = []
    labels: list[int] = []
    classes: list[str] = []
    for path in paths:
        table = pq.read_table(path)
        assert table.schema.field("label").type == "int64"
        images += table.column("image").to_pylist()
        labels += table.column("label").to_pylist()
        classes = json.loads(table.schema.metadata[b"classes"])
    return images, labels, classes


def test_to_parquet_round_trip(imagenet: tuple[Path, dict, dict], tmp_path: Path) -> None:
    root, train_files, _ = imagenet
    dst = tmp_path / "shards"
    paths = imagefolder_to_parquet(str(root), str(dst), rows_per_shard=4, split="train")
    assert [Path(p).name for p in paths] == [f"part-0000{i}.parquet" for i in range(3)]
    images, labels, classes = _read_shards(paths)
    assert classes == CLASSES
    assert json.loads((dst / "_classes.json").read_text()) == CLASSES
    by_bytes = collections.Counter((path.read_bytes(), lab) for path, lab in train_files.items())
    assert collections.Counter(zip(images, labels, strict=True)) == by_bytes
    assert labels != sorted(labels)  # shuffled across classes (tests/test_datapath.py: more)

    batch = decode_image_batch(images[:5], image_size=24, train=True)
    assert batch.shape == (5, 3, 24, 24) and batch.dtype == torch.float32
    # exported bytes decode exactly like the dataset's eval transform (same pipeline)
    eval_batch = decode_image_batch(images[:2], 24, train=False)
    plain, _ = build_datasets(
        DataConfig("imagefolder", root=str(root), image_size=24, augment=False)
    )
    index = {Path(path).read_bytes(): i for i, (path, _) in enumerate(plain.samples)}
    for row in range(2):
        assert torch.equal(eval_batch[row], plain[index[images[row]]][0])

    with pytest.raises(DataError, match="already holds"):
        imagefolder_to_parquet(str(root / "train"), str(dst))


def test_to_parquet_file_uri_and_errors(imagenet: tuple[Path, dict, dict], tmp_path: Path) -> None:
    root, _, val_files = imagenet
    uri = (tmp_path / "out").as_uri()
    paths = imagefolder_to_parquet(str(root / "val"), uri)
    assert paths == [uri + "/part-00000.parquet"]
    images, labels, _ = _read_shards([str(tmp_path / "out" / "part-00000.parquet")])
    assert len(images) == len(val_files) and sorted(labels) == sorted(val_files.values())
    with pytest.raises(DataError, match="rows_per_shard"):
        imagefolder_to_parquet(str(root / "val"), str(tmp_path / "x"), rows_per_shard=0)
    with pytest.raises(DataError, match="nope"):
        imagefolder_to_parquet(str(root), str(tmp_path / "y"), split="nope")
    with pytest.raises(DataError, match="image 1"):
        decode_image_batch([images[0], b"not an image"], 24, train=False)


# ---------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "ccpcsa.data", "to-parquet", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_to_parquet(imagenet: tuple[Path, dict, dict], tmp_path: Path) -> None:
    root, _, _ = imagenet
    dst = tmp_path / "cli"
    done = _cli(str(root), str(dst), "--rows-per-shard", "5", "--split", "train")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("wrote ") for line in lines[:2])
    assert "9 images in 3 classes -> 2 shards" in lines[-1]
    assert "rows shuffled across classes with seed 0" in lines[-1]
    assert sorted(p.name for p in dst.glob("*.parquet")) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]

    missing = tmp_path / "missing-src"
    failed = _cli(str(missing), str(tmp_path / "cli2"))
    assert failed.returncode == 2
    assert len(failed.stderr.strip().splitlines()) == 1 and str(missing) in failed.stderr


def test_cli_help_explains_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["to-parquet", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("SRC", "DST", "--rows-per-shard", "--rows-per-group", "--seed", "--split",
                 "s3://"):
        assert flag in text


# ---------------------------------------------------------------- Fashion-MNIST


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """The idx format: big-endian magic and dimensions, then the bytes; gzip-compressed."""
    import gzip

    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _write_fashion(root: Path, train: int = 12, test: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count, prefix in (("train", train, "train"), ("test", test, "t10k")):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        images[:, :, :14] = 0  # left half black: a flip is visible
        labels = np.arange(count) % 10
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images, 0x0803)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x0801)
        arrays[split], arrays[f"{split}_labels"] = images, labels
    return arrays


def test_fashion_mnist_reads_idx_files(tmp_path: Path) -> None:
    arrays = _write_fashion(tmp_path)
    cfg = DataConfig("fashion-mnist", str(tmp_path), augment=False)
    assert dataset_info(cfg) == DatasetInfo(num_classes=10, image_size=28, channels=3)
    train, test = build_datasets(cfg)
    assert (len(train), len(test)) == (12, 5)
    pixels = arrays["train"].astype(np.float64) / 255.0
    mean, std = pixels.mean(), pixels.std(ddof=1)  # normalised by the training split
    for i in (0, 7):
        x, y = test[i] if i < 5 else train[i]
        raw = arrays["test" if i < 5 else "train"][i]
        assert x.shape == (3, 28, 28) and y == int(arrays["test_labels" if i < 5 else
                                                             "train_labels"][i])
        expected = torch.tensor((raw / 255.0 - mean) / std, dtype=torch.float32)
        for c in range(3):  # grayscale replicated to 3 channels
            torch.testing.assert_close(x[c], expected, rtol=1e-5, atol=1e-5)
    small = build_datasets(DataConfig("fashion-mnist", str(tmp_path), image_size=16))[1]
    assert small[0][0].shape == (3, 16, 16)


def test_fashion_mnist_augments_train_only(tmp_path: Path) -> None:
    _write_fashion(tmp_path)
    train, test = build_datasets(DataConfig("fashion-mnist", str(tmp_path)))
    plain = build_datasets(DataConfig("fashion-mnist", str(tmp_path), augment=False))[0]
    torch.manual_seed(0)
    assert any(not torch.equal(train[0][0], plain[0][0]) for _ in range(10))
    assert all(torch.equal(test[1][0], test[1][0]) for _ in range(5))


def test_fashion_mnist_missing_or_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as info:
        dataset_info(DataConfig("fashion-mnist", str(tmp_path)))
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    _write_fashion(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros((5, 2)), 0x0803)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: not an idx file"):
        build_datasets(DataConfig("fashion-mnist", str(tmp_path)))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="not a readable gzip file"):
        build_datasets(DataConfig("fashion-mnist", str(tmp_path)))


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
                    .is_file(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_real_files() -> None:
    train, test = build_datasets(DataConfig("fashion-mnist", augment=False))
    assert (len(train), len(test)) == (60_000, 10_000)
    counts = collections.Counter(test.targets)
    assert sorted(counts) == list(range(10)) and set(counts.values()) == {1000}
    x, _ = train[0]
    assert x.shape == (3, 28, 28) and torch.isfinite(x).all()
    assert abs(float(train.mean) - 0.286) < 0.01 and abs(float(train.std) - 0.353) < 0.01
