"""Ray Train: the loop's training and evaluation, data-parallel over N workers (TorchTrainer).

The model travels to the workers as a checkpoint payload (architecture name + state dict, no
pickled module), so a model that pruning has just reshaped is rebuilt exactly on every worker.
Map-style datasets (digits, CIFAR, ImageFolder) are sharded by the same seeded sampler a single
process uses; Parquet shards follow a seeded per-epoch plan and stream through Ray Data, decoded
and augmented in tasks on the cluster's free CPUs and delivered to the workers as uint8 pixels
that are normalised on the device (ccpcsa.ingest). Every epoch is checkpointed through
`ray.train.report`; a worker that dies is replaced and training resumes from the last epoch's
checkpoint (FailureConfig).
"""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from ccpcsa import storage
from ccpcsa.bn import recalibrate_bn
from ccpcsa.checkpoint import CheckpointInfo, model_from_payload, to_payload
from ccpcsa.data import (
    DataConfig,
    ShardIndex,
    build_datasets,
    check_parquet_splits,
    dataset_info,
    parquet_split_dir,
    shard_index,
    warn_if_class_sorted,
)
from ccpcsa.ingest import DECODE_CPUS, IngestConfig, ParquetBatches
from ccpcsa.syncbn import convert_batchnorm
from ccpcsa.train import (
    TrainConfig,
    calibration_batches,
    count_correct,
    loader,
    log_epoch,
    make_optimizer,
    run_epoch,
    to_device,
    train_sampler,
)

log = logging.getLogger("ccpcsa.distributed")

STATE_FILE = "train_state.pt"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-machine mode
KILL_ENV = "CCPCSA_KILL_WORKER"  # test hook "RANK:EPOCH:BATCH:MARKER": SIGKILL once, mid-epoch
_CHECKSUM_MOD = (1 << 61) - 1


class DistributedError(ValueError):
    pass


@dataclass(frozen=True)
class WorkerJob:
    """Everything a worker needs, as plain data."""

    payload: dict[str, Any]  # the model: checkpoint payload (architecture + weights)
    data: DataConfig
    train: TrainConfig
    epochs: int
    lr: float
    label: str
    sync_bn: bool = False
    kill: str = ""
    run_dir: str = ""  # where this run's checkpoints are persisted (storage path / name)
    parquet: tuple[ShardIndex, ShardIndex] | None = None  # (train, val) row groups


def parquet_batches(job: WorkerJob, device: torch.device, world: int) -> ParquetBatches:
    """The Parquet stream of a job: the epoch plans, decode tasks and device normalisation."""
    assert job.parquet is not None
    cfg = IngestConfig(dataset_info(job.data).image_size, job.train.batch_size // world,
                       job.train.seed, job.data.augment)
    return ParquetBatches(*job.parquet, cfg, device)


class RayRunner:
    """The loop's training backend on N Ray Train workers (see train.LocalRunner for one)."""

    def __init__(self, data: DataConfig, train: TrainConfig, num_workers: int,
                 storage_path: str, *, gpus_per_worker: float | None = None,
                 cpus_per_worker: float = 1.0, sync_bn: bool = False, max_failures: int = 2
                 ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise DistributedError(f"workers must be an integer >= 1, got {num_workers!r}")
        if train.batch_size % num_workers or train.batch_size // num_workers < 2:
            raise DistributedError(
                f"batch size {train.batch_size} must split into {num_workers} equal per-worker "
                "batches of at least 2")
        if not cpus_per_worker > 0:
            raise DistributedError(f"cpus per worker must be > 0, got {cpus_per_worker}")
        if max_failures < 0:
            raise DistributedError(f"max failures must be >= 0, got {max_failures}")
        self.data, self.train_cfg, self.num_workers = data, train, num_workers
        self.cpus_per_worker, self.sync_bn, self.max_failures = (
            cpus_per_worker, sync_bn, max_failures)
        self.storage_path = storage_path if storage.is_uri(storage_path) else os.path.abspath(
            storage_path)
        storage.check_writable(self.storage_path)
        info = dataset_info(data)  # a bad dataset fails here, before any worker starts
        self.input_shape = (info.channels, info.image_size, info.image_size)
        self.gpus_per_worker = check_cluster(num_workers, gpus_per_worker, cpus_per_worker)
        self._parquet = _parquet_indexes(data, num_workers, cpus_per_worker)
        self._calibration: Dataset | None = None
        self._evaluated: tuple[tuple, float] | None = None
        self.last_result = None  # the ray.train.Result of the latest run, for inspection

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def fit(self, model: nn.Module, epochs: int, lr: float, label: str = "train") -> nn.Module:
        """Train `model` in place on N workers, then evaluate it there (the accuracy is kept
        for evaluate(), which the loop calls next)."""
        if epochs <= 0:
            return model
        state, accuracy = self._run(model, epochs, lr, label)
        model.load_state_dict(state)
        self._evaluated = (fingerprint(model), accuracy)
        return model

    def evaluate(self, model: nn.Module) -> float:
        if self._evaluated is not None and self._evaluated[0] == fingerprint(model):
            return self._evaluated[1]
        _state, accuracy = self._run(model, 0, self.train_cfg.lr, "evaluate")
        self._evaluated = (fingerprint(model), accuracy)
        return accuracy

    def calibration_batches(self, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Unaugmented training batches of (images, labels) for scoring and BatchNorm
        re-estimation, on the driver (where scoring runs for now): for Parquet, row groups
        drawn at random across the split; else seeded random samples of the whole split."""
        if self.data.name == "parquet":
            return self.parquet_calibration(count)
        if self._calibration is None:
            self._calibration = build_datasets(replace(self.data, augment=False))[0]
        return calibration_batches(self._calibration, self.train_cfg, count)

    def parquet_calibration(self, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`count` global batches of (normalised float images, labels) drawn at random across
        the Parquet training split (the same every call), decoded by Ray Data tasks."""
        assert self._parquet is not None
        job = WorkerJob({}, self.data, self.train_cfg, 0, 0.0, "calibration",
                        parquet=self._parquet)
        source = parquet_batches(job, torch.device("cpu"), 1)
        batch = self.train_cfg.batch_size
        for images, labels in source.calibration(count * batch, batch):
            yield source.normalize(images), labels

    def recalibrate_bn(self, model: nn.Module, batches: int) -> nn.Module:
        """Re-estimate BatchNorm statistics on the driver, from `batches` of its calibration
        batches (the driver's GPU when it has one, else its CPU). For now: scoring and this
        recalibration are to move onto the Ray Train workers, where the data and GPUs are."""
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        recalibrate_bn(model, self.calibration_batches(batches), device)
        return model.cpu()

    def _run(self, model: nn.Module, epochs: int, lr: float, label: str
             ) -> tuple[dict[str, torch.Tensor], float]:
        from ray.train import (
            CheckpointConfig,
            FailureConfig,
            LoggingConfig,
            RunConfig,
            ScalingConfig,
        )
        from ray.train.torch import TorchTrainer

        info = _payload_info(model, self.input_shape)
        name = f"{_slug(label)}-{uuid.uuid4().hex[:8]}"
        job = WorkerJob(to_payload(model, info), self.data, self.train_cfg, epochs, lr, label,
                        self.sync_bn, os.environ.get(KILL_ENV, ""),
                        storage.join(self.storage_path, name), self._parquet)
        resources = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = self.gpus_per_worker
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={"job": job},
            scaling_config=ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(
                name=name, storage_path=self.storage_path,
                failure_config=FailureConfig(max_failures=self.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                logging_config=LoggingConfig(log_level="WARNING")),  # epochs: our own log
        )
        start = time.perf_counter()
        log.info("%s: %d epoch(s) on %d Ray Train worker(s)%s", label, epochs,
                 self.num_workers, " with GPUs" if self.use_gpu else "")
        result = trainer.fit()
        self.last_result = result
        with result.checkpoint.as_directory() as folder:
            final = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu",
                               weights_only=True)
        log.info("%s: done in %.1fs, accuracy %.2f%%", label, time.perf_counter() - start,
                 final["accuracy"])
        return final["model"], float(final["accuracy"])


def prefer_loopback() -> None:
    """Without RAY_ADDRESS we start a private single-machine Ray instance: bind it to
    127.0.0.1 (Ray otherwise resolves 127.0.0.1 to the host's address). Call before Ray is
    imported; a driver joining a real cluster (RAY_ADDRESS set) is left alone."""
    if not os.environ.get("RAY_ADDRESS") and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ENV, "0")


def connect_ray():
    """Join the cluster RAY_ADDRESS names, else start a local instance on 127.0.0.1."""
    prefer_loopback()
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            # the dashboard (on 127.0.0.1) also serves the state API Ray Train's cleanup uses
            ray.init(address="local", dashboard_host="127.0.0.1")
    return ray


def check_cluster(num_workers: int, gpus_per_worker: float | None, cpus_per_worker: float
                  ) -> float:
    """Connect to Ray and check the workers fit; returns the GPUs per worker (None = 1 when
    the cluster has GPUs, else 0)."""
    resources = connect_ray().cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus > 0 else 0.0
    if gpus_per_worker < 0:
        raise DistributedError(f"GPUs per worker must be >= 0, got {gpus_per_worker}")
    if num_workers * gpus_per_worker > gpus:
        raise DistributedError(
            f"{num_workers} workers x {gpus_per_worker:g} GPUs need "
            f"{num_workers * gpus_per_worker:g} GPUs but the Ray cluster has {gpus:g}")
    if num_workers * cpus_per_worker > cpus:
        raise DistributedError(
            f"{num_workers} workers x {cpus_per_worker:g} CPUs need "
            f"{num_workers * cpus_per_worker:g} CPUs but the Ray cluster has {cpus:g}")
    return float(gpus_per_worker)


def fingerprint(model: nn.Module) -> tuple:
    """Cheap identity of a model's weights: shapes and sums of every tensor."""
    with torch.no_grad():
        return tuple((k, tuple(v.shape), float(v.double().sum()))
                     for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------- the worker


def worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: train `epochs` (resuming from the latest checkpoint
    after a restart), checkpoint each epoch, then evaluate; rank 0 reports the weights."""
    import ray.train
    import ray.train.torch

    job: WorkerJob = config["job"]
    cfg = job.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed * 1000 + rank)  # augmentation draws differ per worker
    device = ray.train.torch.get_device()
    model = model_from_payload(job.payload).train()
    if job.sync_bn and world > 1:  # BatchNorm statistics of the global batch
        model = (nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda"
                 else convert_batchnorm(model))
    to_device(model, device, cfg)
    source = _TrainSource(job, rank, world, device)
    opt, sched = make_optimizer(model, cfg, job.lr, max(job.epochs * source.steps_per_epoch, 1))
    start_epoch = _restore(model, opt, sched, device, job.run_dir)
    wrapped = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, job.epochs):
        started = time.perf_counter()
        batches = _maybe_kill(source.epoch(epoch), job.kill, rank, epoch)
        loss, seen = run_epoch(wrapped, batches, opt, sched, device, cfg)
        loss, seen, checksum = _all_reduce([loss * seen, seen, source.checksum()], device)
        loss /= max(seen, 1)
        if rank == 0:
            log_epoch(f"{job.label} ({world} workers)", epoch, job.epochs, loss, int(seen),
                      time.perf_counter() - started)
        metrics = {"epoch": epoch + 1, "loss": loss, "samples": int(seen),
                   "seconds": time.perf_counter() - started,
                   "sample_checksum": int(checksum) % _CHECKSUM_MOD, "start_epoch": start_epoch}
        _report(metrics, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "epoch": epoch + 1}, rank)
    correct, total = _evaluate(model, job, rank, world, device)
    accuracy = 100.0 * correct / max(total, 1)
    last_epoch = {f"last_{k}": metrics[k] for k in ("samples", "sample_checksum", "seconds")
                  if k in metrics}
    _report({"epoch": job.epochs, "accuracy": accuracy, "evaluated": int(total),
             "start_epoch": start_epoch, **last_epoch},
            {"model": model.state_dict(), "accuracy": accuracy, "epoch": job.epochs}, rank)


class _TrainSource:
    """A worker's training batches for any epoch: its sampler shard of a map-style dataset, or
    its part of the Parquet epoch plan (uint8 from Ray Data, normalised here on the device).
    Keeps an order-free checksum of the samples of the last epoch."""

    def __init__(self, job: WorkerJob, rank: int, world: int, device: torch.device) -> None:
        self.job, self.rank, self.world = job, rank, world
        self.batch_size = job.train.batch_size // world
        self._checksum: int = 0
        self.parquet = parquet_batches(job, device, world) if job.parquet else None
        if self.parquet is not None:
            self.steps_per_epoch = self.parquet.steps_per_epoch(world)
        elif job.epochs > 0:
            self.dataset = build_datasets(job.data)[0]
            self.sampler = train_sampler(self.dataset, job.train, world, rank)
            self.loader = loader(self.dataset, job.train, train=True, sampler=self.sampler,
                                 batch_size=self.batch_size)
            self.steps_per_epoch = len(self.loader)
        else:
            self.steps_per_epoch = 0

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.parquet is not None:
            for images, labels in self.parquet.epoch(epoch, self.rank, self.world):
                yield self.parquet.normalize(images), labels
            return
        self.sampler.set_epoch(epoch)
        indices = list(self.sampler)
        used = len(indices) // self.batch_size * self.batch_size  # the loader drops the rest
        self._checksum = sum(i + 1 for i in indices[:used])
        yield from self.loader

    def checksum(self) -> int:
        if self.parquet is not None:
            return int(self.parquet.checksum)  # one host sync per epoch
        return self._checksum


def _evaluate(model: nn.Module, job: WorkerJob, rank: int, world: int, device: torch.device
              ) -> tuple[int, int]:
    """Top-1 over the whole test split, each sample on exactly one worker (an even split:
    counts differ by at most one), summed."""
    if job.parquet is not None:
        source = parquet_batches(job, device, world)
        batches = ((source.normalize(x), y) for x, y in source.evaluation(rank, world))
    else:
        test_set = build_datasets(job.data)[1]
        subset = torch.utils.data.Subset(test_set, range(rank, len(test_set), world))
        batches = loader(subset, job.train, train=False)
    correct, seen = count_correct(model, batches, device, job.train)
    correct, seen = _all_reduce([correct, seen], device)
    return int(correct), int(seen)


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    reduce_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=reduce_device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _report(metrics: dict[str, Any], state: dict[str, Any], rank: int) -> None:
    """Every worker reports (it is a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, os.path.join(folder, STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _restore(model: nn.Module, opt, sched, device: torch.device, run_dir: str) -> int:
    """After a worker failure: load the newest epoch checkpoint; returns the epoch to run."""
    state = _latest_epoch_state(run_dir, device)
    if state is None:
        return 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    log.warning("resuming training from the checkpoint of epoch %d", state["epoch"])
    return int(state["epoch"])


def _latest_epoch_state(run_dir: str, device: torch.device) -> dict[str, Any] | None:
    """The newest readable epoch checkpoint rank 0 persisted under the run folder. Read from
    storage rather than ray.train.get_checkpoint(): rank 0 writes each checkpoint before it
    goes on, but the controller may not have registered the last one when the group failed."""
    import pyarrow.fs as pafs

    fs, base = storage.resolve(run_dir)
    try:
        entries = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError:
        return None
    folders = sorted((e.path for e in entries if e.type == pafs.FileType.Directory
                      and e.base_name.startswith("checkpoint_")), reverse=True)  # newest first
    for folder in folders:
        try:
            with fs.open_input_stream(f"{folder}/{STATE_FILE}") as f:
                state = torch.load(io.BytesIO(f.read()), map_location=device, weights_only=True)
        except Exception:  # a checkpoint cut short by the failure: try an older one
            continue
        if "optimizer" in state:  # an epoch checkpoint, not the final evaluation's
            return state
    return None


def _maybe_kill(batches, kill: str, rank: int, epoch: int):
    """Test hook for fault tolerance: KILL_ENV="RANK:EPOCH:BATCH:MARKER" makes that worker
    SIGKILL itself at that batch, once (the marker file records that it happened)."""
    if not kill:
        yield from batches
        return
    want_rank, want_epoch, want_batch, marker = kill.split(":", 3)
    armed = (rank == int(want_rank) and epoch == int(want_epoch)
             and not os.path.exists(marker))
    for i, batch in enumerate(batches):
        if armed and i == int(want_batch):
            with open(marker, "w") as f:
                f.write(f"killed rank {rank} in epoch {epoch} at batch {i}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        yield batch


# ------------------------------------------------------------------------------- driver side


def _payload_info(model: nn.Module, input_shape: tuple[int, int, int]) -> CheckpointInfo:
    """How the workers rebuild `model`: its name (registry, torchvision:NAME or module:callable,
    which must import on every node), classes, BAM placements (to_payload records them) and
    input shape (a model outside the registry finds its classifier by tracing on it)."""
    from ccpcsa.attention import has_bam

    name = getattr(model, "ccpcsa_model", None)
    num_classes = getattr(model, "ccpcsa_num_classes", None)
    if name is None or num_classes is None:
        raise DistributedError("RayRunner needs a model made by ccpcsa (build_model or "
                               "load_checkpoint): it rebuilds the architecture by name")
    return CheckpointInfo(name, num_classes, has_bam(model), input_shape)


def _parquet_indexes(data: DataConfig, num_workers: int, cpus_per_worker: float
                     ) -> tuple[ShardIndex, ShardIndex] | None:
    """Parquet: the row groups of train/ and val/, read once per runner (not per run), after
    checking that the decode tasks have CPUs beside the workers."""
    if data.name != "parquet":
        return None
    cpus = connect_ray().cluster_resources().get("CPU", 0.0)
    spare = cpus - num_workers * cpus_per_worker
    if spare < DECODE_CPUS:
        raise DistributedError(
            f"Parquet images are decoded by Ray Data tasks ({DECODE_CPUS:g} CPU each) on CPUs "
            f"the workers leave free, but {num_workers} workers x {cpus_per_worker:g} CPUs "
            f"leave {max(spare, 0):g} of the cluster's {cpus:g}; lower --cpus-per-worker")
    root = str(data.root)
    check_parquet_splits(root)
    train, val = shard_index(root, "train"), shard_index(root, "val")
    warn_if_class_sorted(train, parquet_split_dir(root, "train"))
    return train, val


def _slug(label: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]+", "-", label).strip("-") or "fit"
