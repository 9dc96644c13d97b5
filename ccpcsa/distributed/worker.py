"""What every Ray Train worker runs: a loop that executes the driver's commands on one model it
keeps between them, so that a whole trial (every round's scoring, BatchNorm re-estimation,
fine-tune and evaluation) runs in one worker group (ccpcsa.distributed.RayRunner drives it).

Commands come from a coordinator actor, one at a time, and every worker runs each of them on
its own share of the data: `fit` (DDP epochs, checkpointed every epoch), `evaluate` (an even
split of the test set), `score` (channel statistics of its share of the calibration images,
summed over the workers before any score is computed) and `recalibrate` (BatchNorm statistics
of its share, averaged over the workers). The model comes from the coordinator (the driver's
surgery, or an earlier fit) through the object store; after a fit, rank 0 sends its weights
back the same way. A command that fails on bad input (a ValueError or a diverging loss) is
reported to the driver and the group waits for the next one; a worker that dies makes Ray
Train restart the group, which picks up the command in flight (a fit resumes from its last
epoch checkpoint) and the latest model.

Map-style datasets (digits, CIFAR, ImageFolder) are built once per group and sharded by the
same seeded sampler a single process uses; Parquet shards follow a seeded per-epoch plan and
stream through Ray Data, decoded in tasks on the cluster's free CPUs and delivered as uint8
pixels that are normalised on the device (ccpcsa.distributed.ingest).
"""

from __future__ import annotations

import io
import logging
import math
import re
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Subset

from ccpcsa import storage
from ccpcsa.bn import batch_norms, recalibrate_bn
from ccpcsa.checkpoint import model_from_payload
from ccpcsa.data import DataConfig, ShardIndex, build_datasets, dataset_info
from ccpcsa.distributed import loopback
from ccpcsa.distributed.ingest import FitStream, IngestConfig, ParquetBatches
from ccpcsa.syncbn import convert_batchnorm
from ccpcsa.train import (
    InputWait,
    TrainConfig,
    calibration_indices,
    count_correct,
    load_teacher,
    loader,
    log_epoch,
    make_optimizer,
    run_epoch,
    to_device,
    train_sampler,
)

log = logging.getLogger("ccpcsa.distributed.worker")

OPS = ("fit", "evaluate", "score", "recalibrate", "stop")
_CHECKSUM_MOD = (1 << 61) - 1
# Errors a command raises the same way on every worker (bad input, a diverging loss): reported
# to the driver, the group stays up. Anything else fails the group, which Ray Train restarts.
COMMAND_ERRORS = (ValueError, ArithmeticError)
# Parquet calibration batches (uint8, on the device) kept for the next round's scoring and
# BatchNorm re-estimation, which read the same rows: no decode, no Ray Data stream start-up.
CALIBRATION_CACHE_BYTES = 2 << 30


@dataclass(frozen=True)
class GroupSetup:
    """What every worker needs for the life of the group, as plain data."""

    data: DataConfig
    train: TrainConfig
    run_dir: str  # the Ray Train run's folder; each fit keeps its epoch checkpoints under it
    sync_bn: bool = False
    parquet: tuple[ShardIndex, ShardIndex] | None = None  # (train, val) row groups
    fits_by_label: bool = False  # fit folders named by label only: found again after a restart


@dataclass(frozen=True)
class Command:
    """One step the driver asks of the group (see the module docstring)."""

    seq: int
    op: str
    model: int = -1  # the version of the model it runs on (the coordinator holds it)
    epochs: int = 0  # fit
    lr: float = 0.0  # fit
    label: str = ""  # fit: names its log lines and checkpoint folder
    kind: str = ""  # score: the criterion
    batches: int = 0  # score, recalibrate: global calibration batches
    seed: int = 0  # score
    input_shape: tuple[int, int, int] | None = None  # score: to trace the channel groups


def worker_loop(config: dict[str, Any]) -> None:
    """The train_loop_per_worker of the group: run commands until the driver says stop."""
    import ray
    import ray.train
    import ray.train.torch

    setup: GroupSetup = config["setup"]
    coordinator = config["coordinator"]
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if config.get("rendezvous"):  # a single-machine Ray: the group on 127.0.0.1 only
        generation = ray.get(coordinator.rendezvous.remote(ctx.get_world_rank()))
        loopback.join(config["rendezvous"], generation, ctx.get_world_rank(),
                      ctx.get_world_size(), device)
    worker = Worker(setup, ctx.get_world_rank(), ctx.get_world_size(), device)
    if worker.rank == 0:
        ray.get(coordinator.group_started.remote())
    done = -1
    while True:
        command: Command = ray.get(coordinator.next_command.remote(done))
        if command.op == "stop":
            if config.get("rendezvous"):
                loopback.leave()
            return
        started = time.perf_counter()
        if worker.version != command.model:
            version, (ref,) = ray.get(coordinator.model_ref.remote())
            if version != command.model:
                raise RuntimeError(f"command {command.seq} wants model {command.model}, the "
                                   f"coordinator holds {version}")
            worker.load(ray.get(ref), version)
        try:
            result = worker.run(command)
        except COMMAND_ERRORS as exc:
            worker.version = -1  # a fit may have stopped half-way: fetch the model again
            result = {"error": exc}
        result["seconds"] = time.perf_counter() - started
        if worker.rank == 0:
            ray.get(coordinator.finish.remote(command.seq, result))
            worker.clean_up()
        done = command.seq


class Worker:
    """One worker's model, data sources and commands."""

    def __init__(self, setup: GroupSetup, rank: int, world: int, device: torch.device) -> None:
        self.setup, self.rank, self.world, self.device = setup, rank, world, device
        self.cfg = setup.train
        self.model: nn.Module | None = None
        self.version = -1
        self._header: dict[str, Any] = {}  # the payload without its weights
        self._train: TrainSource | None = None
        self._test_batches = None
        self._calibration_set = None
        self._calibration_batches: dict[int, Any] = {}  # count -> loader (the same each round)
        self._finished: list[str] = []  # fit folders to delete once their result is posted

    # ------------------------------------------------------------------ the model

    def load(self, payload: dict[str, Any], version: int) -> None:
        # the driver's own model, sent through the object store (never read from a file)
        model = model_from_payload(payload, trust_model_code=True).train()
        if self.setup.sync_bn and self.world > 1:  # BatchNorm statistics of the global batch
            model = (nn.SyncBatchNorm.convert_sync_batchnorm(model)
                     if self.device.type == "cuda" else convert_batchnorm(model))
        self.model = to_device(model, self.device, self.cfg)
        self.version = version
        self._header = {k: v for k, v in payload.items() if k != "state_dict"}

    def payload(self) -> dict[str, Any]:
        assert self.model is not None
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return {**self._header, "state_dict": state}

    def run(self, command: Command) -> dict[str, Any]:
        if command.op not in OPS:
            raise ValueError(f"unknown command {command.op!r}")
        return getattr(self, command.op)(command)

    # ------------------------------------------------------------------ commands

    def fit(self, c: Command) -> dict[str, Any]:
        """Train `epochs` (resuming from this fit's newest epoch checkpoint after a restart),
        checkpoint each epoch, then evaluate; rank 0 returns the weights."""
        import ray.train.torch

        assert self.model is not None
        torch.manual_seed(self.cfg.seed * 1000 + self.rank)  # augmentation differs per worker
        model, source = self.model, self.train_source()
        run_dir = storage.join(self.setup.run_dir, slug(c.label) if self.setup.fits_by_label
                               else f"{c.seq:04d}-{slug(c.label)}")
        opt, sched = make_optimizer(model, self.cfg, c.lr,
                                    max(c.epochs * source.steps_per_epoch, 1))
        start_epoch = _restore(model, opt, sched, self.device, run_dir)
        teacher = load_teacher(self.cfg, self.device)  # distillation (TrainConfig.teacher)
        wrapped = (ray.train.torch.prepare_model(model, move_to_device=False)
                   if self.world > 1 else model)
        metrics: dict[str, Any] = {}
        stream = source.fit(range(start_epoch, c.epochs))  # Parquet: one Ray Data stream
        for epoch in range(start_epoch, c.epochs):
            started = time.perf_counter()
            batches = InputWait(source.epoch(epoch, stream))
            loss, seen = run_epoch(wrapped, batches, opt, sched, self.device, self.cfg,
                                   teacher=teacher)
            loss, seen, checksum = all_reduce([loss * seen, seen, source.checksum()],
                                              self.device)
            loss /= max(seen, 1)
            seconds = time.perf_counter() - started
            if not math.isfinite(loss):  # on every worker (the loss is summed): none goes on
                raise FloatingPointError(f"{c.label}: loss became {loss} in epoch {epoch + 1}")
            if self.rank == 0:
                log_epoch(f"{c.label} ({self.world} workers)", epoch, c.epochs, loss, int(seen),
                          seconds, batches.seconds)
                _save_epoch(run_dir, epoch + 1, {
                    "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "epoch": epoch + 1})
            metrics = {"last_samples": int(seen), "last_seconds": seconds, "loss": loss,
                       "last_input_wait_s": batches.seconds,
                       "last_sample_checksum": int(checksum) % _CHECKSUM_MOD}
        del wrapped
        sync_buffers(model, self.device)  # every worker holds what rank 0 sends back
        self.version = c.seq
        if self.rank == 0:
            self._finished.append(run_dir)
        correct, total = self.count_correct(stream)
        accuracy = 100.0 * correct / max(total, 1)
        return {"payload": self.payload() if self.rank == 0 else None, "accuracy": accuracy,
                "metrics": {**metrics, "epoch": c.epochs, "start_epoch": start_epoch,
                            "accuracy": accuracy, "evaluated": int(total)}}

    def evaluate(self, c: Command) -> dict[str, Any]:
        correct, total = self.count_correct()
        return {"accuracy": 100.0 * correct / max(total, 1), "evaluated": int(total)}

    def score(self, c: Command) -> dict[str, Any]:
        """Channel scores of the model over every worker's share of the calibration batches
        (the statistics or gradients are summed across workers first): the same on every
        worker, and the same as one process scoring all the batches."""
        from ccpcsa.importance import NEEDS_BATCHES, compute_scores
        from ccpcsa.prune import channel_groups

        assert self.model is not None and c.input_shape is not None
        _graph, groups = channel_groups(self.model, self._header["model"], c.input_shape)
        self.check_same_groups(groups)
        batches = self.calibration(c.batches) if c.kind in NEEDS_BATCHES else ()
        scores = compute_scores(c.kind, self.model, groups, batches, seed=c.seed,
                                reduce=self.sum_over_workers)
        return {"scores": {k: v.detach().cpu() for k, v in scores.items()}}

    def recalibrate(self, c: Command) -> dict[str, Any]:
        """BatchNorm statistics re-estimated on every worker's share of the calibration
        batches, averaged over the workers (with --sync-bn each batch is already normalised
        over the global batch, so the workers agree before the average)."""
        assert self.model is not None
        recalibrate_bn(self.model, self.calibration(c.batches), self.device)
        stats = [t for m in batch_norms(self.model) for t in (m.running_mean, m.running_var)]
        self.sum_over_workers(stats)
        for t in stats:
            t /= self.world
        self.version = c.seq
        return {"payload": self.payload() if self.rank == 0 else None}

    # ------------------------------------------------------------------ data

    def train_source(self) -> TrainSource:
        if self._train is None:
            self._train = TrainSource(self.setup, self.rank, self.world, self.device)
        return self._train

    def count_correct(self, stream: FitStream | None = None) -> tuple[int, int]:
        """Top-1 over the whole test split, each sample on exactly one worker (an even split:
        counts differ by at most one), summed over the workers. After a Parquet fit the val
        rows come from the end of the fit's own stream (no new stream start-up)."""
        assert self.model is not None
        if self.setup.parquet is not None:
            source = self.train_source().parquet
            assert source is not None
            rows = stream.evaluation() if stream is not None else source.evaluation(
                self.rank, self.world)
            batches = ((source.normalize(x), y) for x, y in rows)
        else:
            if self._test_batches is None:
                test_set = build_datasets(self.setup.data)[1]
                subset = Subset(test_set, range(self.rank, len(test_set), self.world))
                self._test_batches = loader(subset, self.cfg, train=False)
            batches = self._test_batches
        correct, seen = count_correct(self.model, batches, self.device, self.cfg)
        correct, seen = all_reduce([correct, seen], self.device)
        return int(correct), int(seen)

    def calibration(self, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This worker's share of `count` unaugmented global calibration batches: slice `rank`
        of each global batch one process draws (train.calibration_batches), or its share of
        the random Parquet rows, in per-worker batches, on the device."""
        global_batch = self.cfg.batch_size
        per_worker = global_batch // self.world
        if self.setup.parquet is not None:
            source = self.train_source().parquet
            assert source is not None
            if count not in self._calibration_batches:  # decoded once, reused every round
                uint8 = list(source.calibration(count * global_batch, per_worker, self.rank,
                                                self.world))
                if _nbytes(uint8) > CALIBRATION_CACHE_BYTES:
                    self._calibration_batches.clear()
                else:
                    self._calibration_batches = {count: uint8}
            else:
                uint8 = self._calibration_batches[count]
            for images, labels in uint8:
                yield source.normalize(images), labels
            return
        if count not in self._calibration_batches:
            if self._calibration_set is None:
                self._calibration_set = build_datasets(replace(self.setup.data,
                                                               augment=False))[0]
            drawn = calibration_indices(len(self._calibration_set), count, global_batch,
                                        self.cfg.seed)
            lo, hi = self.rank * per_worker, (self.rank + 1) * per_worker
            mine = [i for b in range(count) for i in drawn[b * global_batch:][lo:hi]]
            self._calibration_batches[count] = loader(Subset(self._calibration_set, mine),
                                                      self.cfg, train=False,
                                                      batch_size=per_worker)
        yield from self._calibration_batches[count]

    # ------------------------------------------------------------------ across workers

    def sum_over_workers(self, tensors: list[torch.Tensor]) -> None:
        collective(tensors, self.device, "sum")

    def check_same_groups(self, groups) -> None:
        """Every worker traced the same channel groups (the same architecture): compare a
        checksum of their names and widths with rank 0's."""
        text = ";".join(f"{g.key}:{g.width}" for g in groups)
        mine = torch.tensor([float(zlib.crc32(text.encode()))], dtype=torch.float64)
        reference = mine.clone()
        collective([reference], self.device, "broadcast")
        differs = (reference != mine).double()
        collective([differs], self.device, "sum")
        if float(differs):
            from ccpcsa.distributed import DistributedError

            raise DistributedError(f"{int(differs)} worker(s) see other channel groups than "
                                   "rank 0: the workers hold different architectures")

    def clean_up(self) -> None:
        """After rank 0 posted a fit's result: its epoch checkpoints are no longer needed."""
        for folder in self._finished:
            fs, path = storage.resolve(folder)
            try:
                fs.delete_dir(path)
            except (OSError, FileNotFoundError):
                log.warning("could not delete the finished fit's checkpoints in %s", folder)
        self._finished.clear()


class TrainSource:
    """A worker's training batches for any epoch: its sampler shard of a map-style dataset, or
    its part of the Parquet epoch plan (uint8 from Ray Data, normalised here on the device).
    Keeps an order-free checksum of the samples of the last epoch. Built once per group."""

    def __init__(self, setup: GroupSetup, rank: int, world: int, device: torch.device) -> None:
        self.rank, self.world = rank, world
        self.batch_size = setup.train.batch_size // world
        self._checksum = 0
        self.parquet = parquet_batches(setup, device, world) if setup.parquet else None
        if self.parquet is not None:
            self.steps_per_epoch = self.parquet.steps_per_epoch(world)
        else:
            self.dataset = build_datasets(setup.data)[0]
            self.sampler = train_sampler(self.dataset, setup.train, world, rank)
            self.loader = loader(self.dataset, setup.train, train=True, sampler=self.sampler,
                                 batch_size=self.batch_size)
            self.steps_per_epoch = len(self.loader)

    def fit(self, epochs: range) -> FitStream | None:
        """Parquet: one stream for the fit's epochs and its closing evaluation (with Ray Data's
        local shuffle buffer on, a stream per epoch instead: the buffer would mix epochs)."""
        if self.parquet is None or self.parquet.cfg.shuffle_buffer or not len(epochs):
            return None
        return self.parquet.fit(epochs, self.rank, self.world,
                                evaluate=self.parquet.val is not None)

    def epoch(self, epoch: int, stream: FitStream | None = None
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.parquet is not None:
            rows = (stream.epoch(epoch) if stream is not None
                    else self.parquet.epoch(epoch, self.rank, self.world))
            for images, labels in rows:
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


def _nbytes(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(x.numel() * x.element_size() + y.numel() * y.element_size() for x, y in batches)


def parquet_batches(setup: GroupSetup, device: torch.device, world: int) -> ParquetBatches:
    """The Parquet stream of a group: the epoch plans, decode tasks and device normalisation."""
    assert setup.parquet is not None
    cfg = IngestConfig(dataset_info(setup.data).image_size, setup.train.batch_size // world,
                       setup.train.seed, setup.data.augment,
                       prefetch_batches=setup.data.prefetch_batches,
                       host_copy=setup.data.host_copy, decode=setup.data.decode)
    return ParquetBatches(*setup.parquet, cfg, device)


# ------------------------------------------------------------------------------- collectives


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(values: list[float], device: torch.device) -> list[float]:
    """Sums of a few numbers over the workers (one collective)."""
    if not _distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    collective([tensor], device, "sum")
    return tensor.tolist()


def collective(tensors: list[torch.Tensor], device: torch.device, op: str) -> None:
    """Sum ("sum") or copy rank 0's values ("broadcast") of `tensors` over the workers, in
    place, in one call: flattened into one float64 buffer (exact for the counts and the sums
    of float32 values involved), on the device for NCCL, on the CPU for gloo."""
    if not _distributed() or not tensors:
        return
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = torch.cat([t.detach().reshape(-1).to(where, torch.float64) for t in tensors])
    if op == "sum":
        dist.all_reduce(flat)
    elif op == "broadcast":
        dist.broadcast(flat, src=0)
    else:
        raise ValueError(f"unknown collective {op!r}")
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def sync_buffers(model: nn.Module, device: torch.device) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every worker: DDP keeps parameters
    equal, but each worker's last forward updated its own statistics."""
    collective(list(model.buffers()), device, "broadcast")


# ------------------------------------------------------------------------------- checkpoints


def _save_epoch(run_dir: str, epoch: int, state: dict[str, Any]) -> None:
    """Rank 0 persists the epoch's state to storage; the one before the previous is deleted."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(storage.join(run_dir, f"epoch-{epoch:04d}.pt"), buffer.getvalue())
    fs, old = storage.resolve(storage.join(run_dir, f"epoch-{epoch - 2:04d}.pt"))
    try:
        fs.delete_file(old)
    except (OSError, FileNotFoundError):
        pass


def _restore(model: nn.Module, opt, sched, device: torch.device, run_dir: str) -> int:
    """After a restart: load the newest epoch checkpoint of this fit; returns the epoch to
    run next (0 when there is none)."""
    state = _latest_epoch_state(run_dir, device)
    if state is None:
        return 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    log.warning("resuming training from the checkpoint of epoch %d", state["epoch"])
    return int(state["epoch"])


def _latest_epoch_state(run_dir: str, device: torch.device) -> dict[str, Any] | None:
    """The newest readable epoch checkpoint under the fit's folder (one cut short by the
    failure is skipped for the one before it)."""
    import pyarrow.fs as pafs

    fs, base = storage.resolve(run_dir)
    try:
        entries = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError:
        return None
    files = sorted((e.path for e in entries if re.fullmatch(r"epoch-\d+\.pt", e.base_name)),
                   reverse=True)
    for path in files:
        try:
            with fs.open_input_stream(path) as f:
                return torch.load(io.BytesIO(f.read()), map_location=device, weights_only=True)
        except Exception:  # cut short by the failure: try an older one
            continue
    return None


def slug(label: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]+", "-", label).strip("-") or "fit"
