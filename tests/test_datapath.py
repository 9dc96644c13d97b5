"""What the model sees from Parquet: shuffled across classes, reshuffled each epoch, seeded.

The data set is written by `to-parquet` from a class-sorted ImageFolder (10 classes, files in
class order, as an ImageNet scan is). Checked for the one-process map-style path
(build_datasets + the seeded sampler, as train.fit uses them) and for the Ray Train path (the
worker's own batch source, which streams its share of the epoch plan through Ray Data on a real
local Ray instance), plus the calibration batches channels are scored on, and that uint8 pixels
normalised on the device equal the float32 CPU path.
"""

from __future__ import annotations

import collections
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from ccpcsa.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataConfig,
    DataError,
    Uint8Normalizer,
    build_datasets,
    calibration_pieces,
    decode_image_batch,
    decode_pieces,
    decode_uint8_batch,
    eval_pieces,
    imagefolder_to_parquet,
    read_piece,
    shard_index,
    steps_per_epoch,
    train_pieces,
)
from ccpcsa.distributed import RayRunner, _parquet_indexes
from ccpcsa.distributed.worker import GroupSetup, TrainSource, Worker
from ccpcsa.search.config import ConfigError, build_config
from ccpcsa.search.trial import train_config
from ccpcsa.train import InputWait, TrainConfig, loader, loader_workers_for, train_sampler

CLASSES = 10
PER_CLASS = 16  # 160 training rows
BATCH = 16  # global batch: 10 steps per epoch
HALF = CLASSES // 2
SIZE = 8


def _write_class_sorted(folder: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        (folder / f"class{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"class{c:02d}" / f"{i:03d}.png")


@pytest.fixture(scope="module")
def parquet_root(tmp_path_factory) -> Path:
    src, root = tmp_path_factory.mktemp("folder"), tmp_path_factory.mktemp("parquet")
    _write_class_sorted(src / "train", PER_CLASS, 0)
    _write_class_sorted(src / "val", 3, 1)
    imagefolder_to_parquet(str(src / "train"), str(root / "train"), rows_per_shard=40,
                           rows_per_group=8)
    imagefolder_to_parquet(str(src / "val"), str(root / "val"), rows_per_shard=40,
                           rows_per_group=8)
    return root


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    yield
    ray.shutdown()


def _classes(labels) -> int:
    return len(set(torch.as_tensor(labels).tolist()))


# ---------------------------------------------------------------- export


def test_to_parquet_rows_are_shuffled_across_classes_by_seed(parquet_root, tmp_path):
    index = shard_index(str(parquet_root), "train")
    assert index.shuffled and index.rows == CLASSES * PER_CLASS
    assert index.group_rows == ((8,) * 5,) * 4  # 4 shards of 40 rows in row groups of 8
    first_group = read_piece(eval_pieces(index, 0, 1)[0])[1]
    assert _classes(first_group) >= HALF  # the first 8 rows written: not one class
    src = tmp_path / "src"
    _write_class_sorted(src, 2, 0)
    orders = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        imagefolder_to_parquet(str(src), str(tmp_path / name), seed=seed)
        piece = eval_pieces(shard_index(str(tmp_path), name), 0, 1)[0]
        orders[name] = read_piece(piece)[0]
    assert orders["a"] == orders["b"] != orders["c"]
    with pytest.raises(DataError, match="rows_per_group must be an int >= 1; got 0"):
        imagefolder_to_parquet(str(src), str(tmp_path / "d"), rows_per_group=0)


# ---------------------------------------------------------------- epoch plans


def test_epoch_plan_equal_disjoint_reproducible(parquet_root):
    index = shard_index(str(parquet_root), "train")
    world, per_worker = 3, 8  # 160 rows // 24 = 6 steps: 144 rows used, 16 (< 24) left out
    assert steps_per_epoch(index, world, per_worker) == 6

    def rows_of(epoch: int, rank: int) -> list[tuple[str, int, int]]:
        out = []
        for p in train_pieces(index, 0, epoch, rank, world, per_worker):
            order = np.random.default_rng(p.order_seed).permutation(8)
            out += [(p.path, p.group, int(r)) for r in order[p.start:p.stop]]
        return out

    epoch0 = [rows_of(0, r) for r in range(world)]
    assert [len(rows) for rows in epoch0] == [48, 48, 48]
    assert len(set().union(*map(set, epoch0))) == 144  # disjoint across workers
    assert epoch0 == [rows_of(0, r) for r in range(world)]  # same seed, same plan
    assert epoch0 != [rows_of(1, r) for r in range(world)]  # another epoch, another plan
    other_seed = train_pieces(index, 1, 0, 0, world, per_worker)
    assert other_seed != train_pieces(index, 0, 0, 0, world, per_worker)
    # evaluation: every val row once, worker counts differ by at most one
    val = shard_index(str(parquet_root), "val")
    shares = [sum(p.rows for p in eval_pieces(val, r, 4)) for r in range(4)]
    assert sum(shares) == 30 and max(shares) - min(shares) <= 1
    with pytest.raises(DataError, match="fewer than one global batch"):
        train_pieces(index, 0, 0, 0, 2, 100)


def test_decode_tasks_mix_rows_across_pieces_reproducibly(parquet_root):
    """The training shuffle done in the decode task (ingest's mix_pieces): the rows of all
    the task's pieces, interleaved in an order their seeds fix, each row exactly once."""
    index = shard_index(str(parquet_root), "train")
    pieces = train_pieces(index, 0, 0, 0, 1, BATCH)[:4]
    batch = {f: np.array([getattr(p, f) for p in pieces])
             for f in ("path", "group", "start", "stop", "order_seed")}
    plain = decode_pieces(batch, SIZE, False)
    mixed = decode_pieces(batch, SIZE, False, mix=True)
    assert sorted(mixed["checksum"]) == sorted(plain["checksum"])  # the same rows, once each
    assert list(mixed["checksum"]) != list(plain["checksum"])
    first_piece = set(plain["checksum"][:pieces[0].rows])
    # the first piece's rows no longer come first: they are spread over the whole output
    assert not set(mixed["checksum"][:pieces[0].rows]) <= first_piece
    again = decode_pieces(batch, SIZE, False, mix=True)
    assert all(np.array_equal(mixed[k], again[k]) for k in mixed)  # seeded
    # an image stays with its label and checksum
    order = {c: i for i, c in enumerate(plain["checksum"])}
    idx = [order[c] for c in mixed["checksum"]]
    assert np.array_equal(mixed["label"], plain["label"][idx])
    assert np.array_equal(mixed["image"], plain["image"][idx])


# ---------------------------------------------------------------- one process


def _one_process_epochs(root: Path, seed: int, epochs: int) -> list[list[list[int]]]:
    """Labels of every batch of each epoch, as train.fit draws them (sampler + loader)."""
    train, _ = build_datasets(DataConfig("parquet", str(root), SIZE, augment=False))
    cfg = TrainConfig(batch_size=BATCH, seed=seed, loader_workers=0)
    sampler = train_sampler(train, cfg)
    batches = loader(train, cfg, train=True, sampler=sampler)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out.append([y.tolist() for _, y in batches])
    return out


def test_one_process_parquet_batches_are_shuffled_per_epoch(parquet_root):
    first = _one_process_epochs(parquet_root, 0, 2)
    assert _classes(first[0][0]) >= HALF and _classes(first[1][0]) >= HALF
    assert first[0] != first[1]  # reshuffled every epoch
    assert first == _one_process_epochs(parquet_root, 0, 2)  # same seed, same order
    assert first[0] != _one_process_epochs(parquet_root, 1, 1)[0]


# ---------------------------------------------------------------- Ray Train workers


def _job(root: Path, seed: int, world: int, augment: bool = True) -> GroupSetup:
    data = DataConfig("parquet", str(root), SIZE, augment=augment)
    return GroupSetup(data, TrainConfig(batch_size=BATCH, seed=seed), "",
                      parquet=_parquet_indexes(data, world, 0.5))


def _worker_epoch(job: GroupSetup, epoch: int, world: int = 2
                  ) -> tuple[list[list[int]], list[torch.Tensor], int]:
    """What the model sees on each of `world` workers in one epoch: the labels of every step
    (global batch = the workers' batches together), the first step's images, the checksum."""
    steps: list[list[int]] = []
    images, checksum = [], 0
    for rank in range(world):
        source = TrainSource(job, rank, world, torch.device("cpu"))
        for step, (x, y) in enumerate(source.epoch(epoch)):
            assert x.dtype == torch.float32 and x.shape == (BATCH // world, 3, SIZE, SIZE)
            if rank == 0:
                steps.append([])
            steps[step] += y.tolist()
            if step == 0:
                images.append(x)
        assert step + 1 == source.steps_per_epoch == 10
        checksum += source.checksum()
    return steps, images, checksum


def test_ray_train_parquet_batches_are_shuffled_per_epoch(ray_cluster, parquet_root):
    job = _job(parquet_root, 0, 2)
    epoch0, images0, checksum0 = _worker_epoch(job, 0)
    assert _classes(epoch0[0]) >= HALF and _classes(epoch0[1]) >= HALF  # first global batches
    assert all(len(step) == BATCH for step in epoch0)
    counts = collections.Counter(label for step in epoch0 for label in step)
    assert counts == {c: PER_CLASS for c in range(CLASSES)}  # 160 rows = 10 steps: all once
    files = sorted((parquet_root / "train").glob("*.parquet"))
    expected = sum(zlib.crc32(b) for p in files for b in pq.read_table(p)["image"].to_pylist())
    assert checksum0 == expected  # every image exactly once
    epoch1, _, checksum1 = _worker_epoch(job, 1)
    assert epoch1 != epoch0 and checksum1 == checksum0  # reshuffled, same rows
    again, images_again, _ = _worker_epoch(_job(parquet_root, 0, 2), 0)
    assert again == epoch0  # same seed, same order ...
    assert all(torch.equal(a, b) for a, b in zip(images0, images_again, strict=True))  # crops
    assert _worker_epoch(_job(parquet_root, 1, 2), 0)[0] != epoch0


def test_calibration_batches_cover_the_classes(ray_cluster, parquet_root):
    """What the Ray Train workers score channels and re-estimate BatchNorm on: each of 2
    workers takes its half of 2 global batches of rows drawn at random across the split; the
    first global batch covers the classes, the draw is the same every call, and the workers'
    halves together are exactly the rows one worker would draw."""
    setup = _job(parquet_root, 0, 2, augment=False)
    cpu = torch.device("cpu")

    def draw(world: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        return [list(Worker(setup, rank, world, cpu).calibration(2)) for rank in range(world)]

    halves = draw(2)
    for pairs in halves:
        assert [tuple(x.shape) for x, _ in pairs] == [(BATCH // 2, 3, SIZE, SIZE)] * 2
    first_batch = torch.cat([halves[0][0][1], halves[1][0][1]])
    assert _classes(first_batch) >= HALF
    again = draw(2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for mine, other in zip(halves, again, strict=True)
               for a, b in zip(mine, other, strict=True))

    def rows(batches) -> list[tuple[int, float]]:
        return sorted((int(y), round(float(x.sum()), 3)) for images, labels in batches
                      for x, y in zip(images, labels, strict=True))

    (whole,) = draw(1)
    assert [tuple(x.shape) for x, _ in whole] == [(BATCH, 3, SIZE, SIZE)] * 2
    assert rows(halves[0] + halves[1]) == rows(whole)
    # drawn across the split: 4 random row groups of 8 rows, from more than one shard
    pieces = calibration_pieces(shard_index(str(parquet_root), "train"), 2 * BATCH, 0)
    assert sum(p.rows for p in pieces) == 2 * BATCH and len({p.path for p in pieces}) > 1


def test_parquet_needs_a_cpu_for_decoding(ray_cluster, parquet_root, tmp_path):
    data = DataConfig("parquet", str(parquet_root), SIZE)
    with pytest.raises(ValueError, match=r"Ray Data decoding\) needs 3 CPUs but .* has 2"):
        RayRunner(data, TrainConfig(batch_size=BATCH), 2, str(tmp_path), cpus_per_worker=1)


# ---------------------------------------------------------------- uint8 on the wire


def test_uint8_normalised_on_device_equals_float_path(parquet_root):
    """decode_uint8_batch + Uint8Normalizer vs the old CPU float path (ToTensor + Normalize):
    the same ops in the same order, so equal to float32 rounding; stated tolerance 1e-6 (in
    practice the tensors are bitwise equal). Augmented crops too, from the same RNG state."""
    index = shard_index(str(parquet_root), "train")
    images, _ = read_piece(eval_pieces(index, 0, 1)[0])
    normalize = Uint8Normalizer(IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu"))
    for train in (False, True):
        torch.manual_seed(3)
        pixels = decode_uint8_batch(images, 24, train)
        torch.manual_seed(3)
        reference = decode_image_batch(images, 24, train)
        assert pixels.dtype == np.uint8 and pixels.shape == (8, 24, 24, 3)
        ours = normalize(torch.from_numpy(pixels))
        assert ours.shape == reference.shape and ours.dtype == torch.float32
        assert (ours - reference).abs().max().item() <= 1e-6
        assert ours.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="uint8"):
        normalize(torch.zeros(1, 8, 8, 3))


# ---------------------------------------------------------------- map-style loader workers


def test_loader_workers_default_and_flags(parquet_root, monkeypatch):
    digits, _ = build_datasets(DataConfig())
    parquet, _ = build_datasets(DataConfig("parquet", str(parquet_root), SIZE))
    auto = TrainConfig()
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # what Ray sets for a 4-CPU worker
    assert loader_workers_for(parquet, auto) == 3  # images to decode: one per spare CPU
    assert loader_workers_for(torch.utils.data.Subset(parquet, [0]), auto) == 3
    assert loader_workers_for(digits, auto) == 0  # tensors in memory: nothing to decode
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert loader_workers_for(parquet, auto) == 0  # one CPU: decode on the training thread
    assert loader_workers_for(parquet, TrainConfig(loader_workers=2)) == 2
    assert train_config(build_config({}, {"loader_workers": 5})).loader_workers == 5
    assert train_config(build_config({}, {})).loader_workers is None
    with pytest.raises(ConfigError, match="loader_workers must be >= 0, got -1"):
        build_config({"loader_workers": -1}, {})


def test_input_wait_counts_only_the_wait_for_the_next_batch():
    def slow_source():
        yield 1
        time.sleep(0.2)  # the producer is late: the loop waits
        yield 2

    batches = InputWait(slow_source())
    seen = []
    for item in batches:
        seen.append(item)
        time.sleep(0.3)  # the loop's own work: not waiting
    assert seen == [1, 2]
    assert 0.2 <= batches.seconds < 0.3
