"""Ray Train data-parallel training on a real local Ray cluster (CPU, gloo)."""

import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import ray
from PIL import Image

from ccpcsa.data import DataConfig, build_datasets, dataset_info, imagefolder_to_parquet
from ccpcsa.distributed import KILL_ENV, DistributedError, RayRunner, fingerprint
from ccpcsa.loop import LoopConfig, PrepareConfig, prepare, prune_loop
from ccpcsa.models import build_model
from ccpcsa.prune import PruneLimits
from ccpcsa.train import LocalRunner, TrainConfig

REPO = Path(__file__).resolve().parents[1]
DIGITS = DataConfig("digits", augment=False)  # no augmentation: 1 and N workers see equal data
TRAIN = TrainConfig(batch_size=64, seed=0)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def prepared_model(tmp_path_factory):
    """M' (trained baseline + BAM), made once in one process and shared by the comparisons."""
    info = dataset_info(DIGITS)
    train, test = build_datasets(DIGITS)
    cfg = PrepareConfig("resnet20", info.num_classes, (3, info.image_size, info.image_size),
                        baseline_epochs=3, attention_epochs=1)
    return cfg, prepare(cfg, LocalRunner(train, test, TRAIN), str(tmp_path_factory.mktemp("p")))


def _loop(runner, cfg, prepared):
    loop_cfg = LoopConfig(groups_per_round=12, tolerance=100.0, max_rounds=2,
                          finetune_epochs=1, finetune_lr=0.01, calibration_batches=2,
                          limits=PruneLimits(max_ratio=0.8))
    return prune_loop(prepared.load_attention_model(), cfg.model, cfg.input_shape,
                      prepared.baseline_accuracy, runner, loop_cfg,
                      initial_accuracy=prepared.attention_accuracy)


def test_two_workers_match_one_process(ray_cluster, prepared_model, tmp_path):
    """Same seed, same global batch (64 = 2 x 32), BatchNorm over the global batch: the same
    samples in the same steps. fp32 training amplifies reduction-order rounding (one process
    on 1 vs 2 torch threads already ends an epoch ~1e-2 apart in its weights), so later rounds
    may swap near-tied channels between layers; the first round is decided on the same model."""
    cfg, prepared = prepared_model
    train, test = build_datasets(DIGITS)
    local = _loop(LocalRunner(train, test, TRAIN), cfg, prepared)
    runner = RayRunner(DIGITS, TRAIN, 2, str(tmp_path / "ray"), sync_bn=True)
    ray_run = _loop(runner, cfg, prepared)
    assert len(ray_run.records) == len(local.records) == 3
    assert ray_run.records[1].widths == local.records[1].widths  # exactly the same pruning
    for ours, theirs in zip(ray_run.records, local.records, strict=True):
        assert ours.widths.keys() == theirs.widths.keys()
        assert sum(ours.widths.values()) == sum(theirs.widths.values())
        moved = sum(abs(ours.widths[k] - theirs.widths[k]) for k in ours.widths)
        assert moved <= 2 * ours.round, (ours.round, ours.widths, theirs.widths)
        assert abs(ours.flops - theirs.flops) <= 0.02 * theirs.flops
    assert abs(ray_run.records[-1].accuracy - local.records[-1].accuracy) <= 1.5
    assert local.records[-1].widths != local.records[0].widths  # something was pruned


def _write_images(root: Path, per_class: dict[str, int]) -> None:
    colours = {"red": (200, 30, 30), "blue": (30, 30, 200)}
    for cls, count in per_class.items():
        folder = root / cls
        folder.mkdir(parents=True)
        for i in range(count):
            img = Image.new("RGB", (12, 12), colours[cls])
            img.putpixel((i % 12, (3 * i) % 12), (i * 20 % 255, 255, 0))
            img.save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def parquet_root(tmp_path_factory):
    src, dst = tmp_path_factory.mktemp("folder"), tmp_path_factory.mktemp("shards")
    _write_images(src / "train", {"red": 12, "blue": 12})
    _write_images(src / "val", {"red": 4, "blue": 3})
    imagefolder_to_parquet(str(src / "train"), str(dst / "train"), rows_per_shard=5)
    imagefolder_to_parquet(str(src / "val"), str(dst / "val"), rows_per_shard=3)
    return src, dst


def test_parquet_shards_stream_through_ray_data(ray_cluster, parquet_root, tmp_path):
    src, dst = parquet_root
    data = DataConfig("parquet", str(dst), image_size=16)
    runner = RayRunner(data, TrainConfig(batch_size=8), 2, str(tmp_path / "ray"),
                       cpus_per_worker=0.5)  # leaves a CPU for Ray Data's read tasks
    model = build_model("resnet20", 2, with_bam=True)
    before = fingerprint(model)
    runner.fit(model, 1, 0.05, "parquet")
    metrics = runner.last_result.metrics
    files = sorted((src / "train").rglob("*.png"))
    expected = sum(zlib.crc32(f.read_bytes()) for f in files) % ((1 << 61) - 1)
    assert metrics["last_samples"] == len(files) == 24  # every sample once in the epoch
    assert metrics["last_sample_checksum"] == expected  # ... and no sample twice
    assert metrics["evaluated"] == 7  # the whole val split, each image on one worker
    assert fingerprint(model) != before  # the trained weights came back
    assert runner.evaluate(model) == metrics["accuracy"]
    images, labels = next(iter(runner.calibration_batches(1)))
    assert tuple(images.shape) == (8, 3, 16, 16) and tuple(labels.shape) == (8,)
    assert set(labels.tolist()) <= {0, 1}  # the two class folders


def test_killed_worker_is_replaced_and_resumes_from_checkpoint(ray_cluster, tmp_path,
                                                               monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_ENV, f"1:1:3:{marker}")  # rank 1, second epoch, fourth batch
    runner = RayRunner(DIGITS, TRAIN, 2, str(tmp_path / "ray"), max_failures=1)
    model = build_model("resnet20", 10, with_bam=False)
    runner.fit(model, 3, 0.05, "fault")
    metrics = runner.last_result.metrics
    assert "killed rank 1 in epoch 1" in marker.read_text()
    assert metrics["start_epoch"] == 1  # resumed after epoch 1's checkpoint: lost < 1 epoch
    assert metrics["epoch"] == 3
    assert metrics["accuracy"] > 50.0


def test_bad_input_fails_before_work(ray_cluster, tmp_path):
    with pytest.raises(DistributedError, match="workers must be an integer >= 1, got 0"):
        RayRunner(DIGITS, TRAIN, 0, str(tmp_path))
    with pytest.raises(DistributedError, match="need 2 GPUs but the Ray cluster has 0"):
        RayRunner(DIGITS, TRAIN, 2, str(tmp_path), gpus_per_worker=1)
    with pytest.raises(DistributedError, match="batch size 64 must split into 3"):
        RayRunner(DIGITS, TRAIN, 3, str(tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=re.escape(f"cannot write to {str(blocker / 'runs')!r}")):
        RayRunner(DIGITS, TRAIN, 2, str(blocker / "runs"))


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--workers", "2", "--gpus-per-worker", "1"], "need 2 GPUs but the Ray cluster has 0"),
])
def test_cli_bad_worker_flags_one_line_error(tmp_path, argv, message):
    proc = subprocess.run(
        [sys.executable, "-m", "ccpcsa", "prune", "--out", str(tmp_path / "out"), *argv],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "out" / "prepared").exists()  # nothing was trained
