"""Feeding the device from Parquet (issue 27): the two decode paths agree, one stream per fit
serves the same batches as a stream per epoch, calibration batches are decoded once, and the
host-copy modes deliver the same tensors. On a real local Ray instance; CPU only (the pinned
ring's CUDA path is checked where CUDA exists)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from ccpcsa.data import (
    DataConfig,
    decode_pieces,
    eval_pieces,
    imagefolder_to_parquet,
    shard_index,
    train_pieces,
)
from ccpcsa.data.jpegdecode import check_decode, decode_on_device
from ccpcsa.distributed import _parquet_indexes
from ccpcsa.distributed.hostcopy import HostCopy, PinnedRing, check_host_copy
from ccpcsa.distributed.ingest import IngestConfig, ParquetBatches
from ccpcsa.distributed.worker import GroupSetup, Worker
from ccpcsa.train import TrainConfig

CLASSES, PER_CLASS, SIZE, BATCH = 4, 12, 16, 8  # 48 training rows: 6 steps per epoch
CPU = torch.device("cpu")


def _write_jpegs(folder: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            # smooth gradients + noise: photo-like enough that decoders agree to a few levels
            h, w = 30 + 2 * (i % 4), 40 - 2 * (i % 3)
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([yy * 255 // h, xx * 255 // w, (yy + xx) * 127 // (h + w)], -1)
            pixels = np.clip(base + rng.integers(-8, 8, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"c{c}" / f"{i:02d}.jpg", quality=95)


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory) -> Path:
    src, root = tmp_path_factory.mktemp("jpegs"), tmp_path_factory.mktemp("parquet")
    _write_jpegs(src / "train", PER_CLASS, 0)
    _write_jpegs(src / "val", 3, 1)
    for split in ("train", "val"):
        imagefolder_to_parquet(str(src / split), str(root / split), rows_per_shard=24,
                               rows_per_group=8)
    return root


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    yield
    ray.shutdown()


def _columns(pieces) -> dict[str, np.ndarray]:
    return {k: np.array([getattr(p, k) for p in pieces])
            for k in ("path", "group", "start", "stop", "order_seed")}


@pytest.mark.parametrize("train", [False, True])
def test_device_decode_sees_the_same_images_as_cpu_decode(jpeg_root, train):
    """decode="gpu" ships bytes + crop draws; decoding them (torchvision's decode_jpeg, here on
    the CPU) gives the CPU path's labels, checksums and crops, pixels within decoder rounding."""
    index = shard_index(str(jpeg_root), "train")
    pieces = (train_pieces(index, 3, 0, 0, 1, BATCH) if train
              else eval_pieces(index, 0, 1))[:3]
    cpu = decode_pieces(_columns(pieces), SIZE, train, mix=True, decode="cpu")
    gpu = decode_pieces(_columns(pieces), SIZE, train, mix=True, decode="gpu")
    assert "image" not in gpu and gpu["jpeg"].dtype == object
    np.testing.assert_array_equal(cpu["label"], gpu["label"])
    np.testing.assert_array_equal(cpu["checksum"], gpu["checksum"])
    assert (gpu["crop"][:, 2] >= 0).all() == train  # train: drawn boxes; eval: none
    decoded = decode_on_device(gpu["jpeg"], gpu["crop"], SIZE, CPU)
    assert decoded.shape == cpu["image"].shape and decoded.dtype == torch.uint8
    diff = np.abs(decoded.numpy().astype(int) - cpu["image"].astype(int))
    assert diff.mean() < 4, diff.mean()  # same crops; PIL vs torchvision resize rounding
    other = decode_on_device(gpu["jpeg"], np.roll(gpu["crop"], 1, 0), SIZE, CPU)
    if train:  # the crop rows matter: shifted draws give other pixels
        assert np.abs(other.numpy().astype(int) - cpu["image"].astype(int)).mean() > diff.mean()


def test_bad_decode_and_host_copy_values_name_the_value():
    with pytest.raises(ValueError, match="'nvdec'"):
        check_decode("nvdec")
    with pytest.raises(ValueError, match="'pinned'"):
        check_host_copy("pinned")
    with pytest.raises(ValueError, match="'pinned'"):
        IngestConfig(SIZE, BATCH, host_copy="pinned")
    with pytest.raises(ValueError, match="prefetch_batches"):
        IngestConfig(SIZE, BATCH, prefetch_batches=-1)


@pytest.mark.parametrize("mode", ["ring", "ray_pin", "pageable"])
def test_host_copy_modes_deliver_the_same_tensors(mode):
    copy = HostCopy(mode, CPU)
    assert copy.ring is None  # no CUDA: every mode a plain copy
    batch = {"image": torch.arange(24, dtype=torch.uint8).view(2, 2, 2, 3),
             "label": torch.tensor([1, 2])}
    out = copy(batch)
    assert all(torch.equal(out[k], batch[k]) for k in batch)
    assert copy.ray_options() == {"device": CPU, "pin_memory": False}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned ring needs CUDA")
def test_pinned_ring_copies_batches_intact_while_reusing_buffers():
    ring = PinnedRing(torch.device("cuda"), slots=2)
    batches = [{"x": torch.full((64, 64), i, dtype=torch.uint8)} for i in range(6)]
    outs = [ring(b)["x"] for b in batches]
    torch.cuda.synchronize()
    assert all(bool((o == i).all()) for i, o in enumerate(outs))


def _epoch_batches(source, rows):
    return [(x.clone(), y.clone()) for x, y in rows]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2)
                                    for (x1, y1), (x2, y2) in zip(a, b, strict=True))


def test_one_stream_per_fit_serves_the_epochs_and_evaluation_of_separate_streams(
        ray_cluster, jpeg_root):
    indexes = (shard_index(str(jpeg_root), "train"), shard_index(str(jpeg_root), "val"))
    cfg = IngestConfig(SIZE, BATCH, seed=5)
    apart = ParquetBatches(*indexes, cfg, CPU)
    per_epoch = [_epoch_batches(apart, apart.epoch(e, 0, 1)) for e in range(2)]
    checksums = []
    evaluation = _epoch_batches(apart, apart.evaluation(0, 1))
    assert apart.streams_started == 3
    together = ParquetBatches(*indexes, cfg, CPU)
    stream = together.fit(range(2), 0, 1, evaluate=True)
    for e in range(2):
        assert _same(_epoch_batches(together, stream.epoch(e)), per_epoch[e])
        checksums.append(int(together.checksum))
    assert _same(_epoch_batches(together, stream.evaluation()), evaluation)
    assert together.streams_started == 1
    assert len(per_epoch[0]) == 48 // BATCH and checksums[0] == checksums[1] != 0
    with pytest.raises(RuntimeError, match="in order"):
        next(together.fit(range(2), 0, 1).epoch(1))


def test_gpu_decode_stream_gives_the_cpu_streams_labels(ray_cluster, jpeg_root):
    indexes = (shard_index(str(jpeg_root), "train"), None)
    runs = {}
    for decode in ("cpu", "gpu"):
        source = ParquetBatches(*indexes, IngestConfig(SIZE, BATCH, seed=2, decode=decode), CPU)
        runs[decode] = (_epoch_batches(source, source.epoch(1, 0, 1)), int(source.checksum))
    (cpu, cpu_sum), (gpu, gpu_sum) = runs["cpu"], runs["gpu"]
    assert cpu_sum == gpu_sum and len(cpu) == len(gpu)
    for (x1, y1), (x2, y2) in zip(cpu, gpu, strict=True):
        assert torch.equal(y1, y2) and x1.shape == x2.shape
        assert (x1.int() - x2.int()).abs().float().mean() < 4


def test_calibration_batches_are_decoded_once_per_group(ray_cluster, jpeg_root):
    data = DataConfig("parquet", str(jpeg_root), SIZE, host_copy="pageable", prefetch_batches=1)
    setup = GroupSetup(data, TrainConfig(batch_size=BATCH), "",
                       parquet=_parquet_indexes(data, 1, 0.5))
    worker = Worker(setup, 0, 1, CPU)
    first = [(x.clone(), y.clone()) for x, y in worker.calibration(2)]
    again = list(worker.calibration(2))
    assert _same(first, again) and len(first) == 2
    source = worker.train_source().parquet
    assert source.streams_started == 1 and source.cfg.host_copy == "pageable"
    assert source.cfg.prefetch_batches == 1


def test_jpeg_decode_falls_back_for_other_formats():
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(buffer, format="PNG")
    crops = np.full((1, 5), -1, np.int64)
    out = decode_on_device([buffer.getvalue()], crops, SIZE, CPU)
    assert out.shape == (1, SIZE, SIZE, 3) and int(out.max()) == 0


def test_decode_ahead_thread_keeps_order_and_reraises():
    from ccpcsa.distributed.ingest import ahead

    items = [(torch.tensor([i]),) for i in range(7)]
    assert [int(t[0]) for (t,) in ahead(iter(items), CPU, 2)] == list(range(7))

    def failing():
        yield (torch.tensor([0]),)
        raise ValueError("bad jpeg 3")

    got = ahead(failing(), CPU, 2)
    assert int(next(got)[0]) == 0
    with pytest.raises(ValueError, match="bad jpeg 3"):
        next(got)


def test_search_settings_for_the_input_path_are_validated_and_reach_the_workers():
    from ccpcsa.search.config import ConfigError, config_from_dict
    from ccpcsa.search.trial import data_config

    cfg = config_from_dict({"decode": "gpu", "host_copy": "pageable", "prefetch_batches": 4})
    data = data_config(cfg)
    assert (data.decode, data.host_copy, data.prefetch_batches) == ("gpu", "pageable", 4)
    for bad, name in (({"decode": "nvjpeg"}, "'nvjpeg'"), ({"host_copy": "pinned"}, "'pinned'"),
                      ({"prefetch_batches": -1}, "prefetch_batches")):
        with pytest.raises(ConfigError, match=name):
            config_from_dict(bad)
