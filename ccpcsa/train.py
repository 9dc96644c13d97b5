"""Train and evaluate in one process. SGD + cosine; bf16 autocast, channels_last and
cudnn.benchmark on CUDA; the loss is summed on the device and read once per epoch (no host sync
per step); DataLoader worker processes decode images beside the training thread."""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ccpcsa.bn import recalibrate_bn

log = logging.getLogger("ccpcsa.train")

MAX_AUTO_LOADER_WORKERS = 8


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    loader_workers: int | None = None  # None: one per spare CPU (see loader_workers_for)
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True  # CUDA only
    device: str | None = None  # None = cuda if available, else cpu
    seed: int = 0
    # knowledge distillation: a ccpcsa checkpoint (path or URI) of the teacher, usually the
    # unpruned model; the loss is (1 - w) x cross-entropy + w x T^2 x KL(teacher || student)
    # on logits softened by the temperature T (Hinton et al. 2015)
    teacher: str | None = None
    teacher_model: str | None = None  # the run's --model: the one MODULE:CALLABLE it may name
    distill_weight: float = 0.5
    distill_temperature: float = 4.0

    def validate(self) -> None:
        if self.batch_size < 2:
            raise ValueError(f"batch size must be >= 2, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distillation weight must be in [0, 1], got {self.distill_weight}")
        if not self.distill_temperature > 0:
            raise ValueError(f"distillation temperature must be > 0, got "
                             f"{self.distill_temperature}")


def pick_device(preferred: str | None = None) -> torch.device:
    if preferred:
        from ccpcsa.validation import device as check_device

        check_device(preferred)  # ValueError naming it: unknown, or CUDA not available
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, lr: float, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    # No weight decay on BN/bias: standard practice, and it keeps BN-scale importance honest.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, momentum=cfg.momentum, nesterov=True,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    return opt, sched


def autocast(device: torch.device, cfg: TrainConfig):
    if device.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def to_device(model: nn.Module, device: torch.device, cfg: TrainConfig) -> nn.Module:
    model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick kernels
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
    return model


def input_memory_format(device: torch.device, cfg: TrainConfig) -> torch.memory_format:
    return (torch.channels_last if device.type == "cuda" and cfg.channels_last
            else torch.contiguous_format)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                      weight: float, temperature: float, label_smoothing: float = 0.0
                      ) -> torch.Tensor:
    """(1 - weight) x cross-entropy + weight x T^2 x KL(softmax(teacher/T) || softmax(student/T));
    T^2 keeps the soft term's gradients on the scale of the hard one's."""
    hard = nn.functional.cross_entropy(student, labels, label_smoothing=label_smoothing)
    soft = nn.functional.kl_div(
        nn.functional.log_softmax(student.float() / temperature, dim=1),
        nn.functional.log_softmax(teacher.float() / temperature, dim=1),
        reduction="batchmean", log_target=True) * temperature ** 2
    return (1.0 - weight) * hard + weight * soft


def load_teacher(cfg: TrainConfig, device: torch.device) -> nn.Module | None:
    """The distillation teacher of cfg.teacher on `device`, in eval mode; None without one."""
    if not cfg.teacher:
        return None
    from ccpcsa.checkpoint import load_checkpoint

    teacher = load_checkpoint(cfg.teacher, user_model=cfg.teacher_model).eval()
    teacher = to_device(teacher, device, cfg)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def run_epoch(
    model: nn.Module,
    batches,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    cfg: TrainConfig,
    progress: str = "",
    teacher: nn.Module | None = None,
) -> tuple[float, int]:
    """One pass over `batches` of (x, y); returns (mean loss, samples seen). With a teacher
    the loss is distillation_loss against its logits."""
    model.train()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    memory_format = input_memory_format(device, cfg)
    total = torch.zeros((), dtype=torch.float64, device=device)  # read once, at the end
    count = 0
    for x, y in _progress(batches, progress):
        x = x.to(device, non_blocking=True, memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        with autocast(device, cfg):
            logits = model(x)
            if teacher is None:
                loss = loss_fn(logits, y)
            else:
                with torch.no_grad():
                    soft_targets = teacher(x)
                loss = distillation_loss(logits, soft_targets, y, cfg.distill_weight,
                                         cfg.distill_temperature, cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.detach() * len(y)
        count += len(y)
    return float(total) / max(count, 1), count


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, cfg: TrainConfig) -> float:
    """Top-1 accuracy in percent."""
    device = pick_device(cfg.device)
    to_device(model, device, cfg)
    correct, seen = count_correct(model, loader(dataset, cfg, train=False), device, cfg)
    return 100.0 * correct / max(seen, 1)


@torch.no_grad()
def count_correct(model: nn.Module, batches, device: torch.device, cfg: TrainConfig
                  ) -> tuple[int, int]:
    model.eval()
    memory_format = input_memory_format(device, cfg)
    correct = torch.zeros((), dtype=torch.int64, device=device)  # read once, at the end
    seen = 0
    for x, y in batches:
        x = x.to(device, non_blocking=True, memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        with autocast(device, cfg):
            pred = model(x).argmax(1)
        correct += (pred == y).sum()
        seen += len(y)
    return int(correct), seen


def loader(dataset: Dataset, cfg: TrainConfig, train: bool, sampler=None,
           batch_size: int | None = None) -> DataLoader:
    gen = torch.Generator().manual_seed(cfg.seed)
    workers = loader_workers_for(dataset, cfg)
    return DataLoader(
        dataset,
        batch_size=batch_size or cfg.batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train,  # BatchNorm1d in BAM's channel MLP cannot train on a batch of one
        num_workers=workers,
        pin_memory=pick_device(cfg.device).type == "cuda",
        persistent_workers=workers > 0,
        generator=gen,
    )


def loader_workers_for(dataset: Dataset, cfg: TrainConfig) -> int:
    """cfg.loader_workers if set; else one DataLoader process per CPU this process may use,
    minus the training thread (at most MAX_AUTO_LOADER_WORKERS), and none on one CPU or for
    data already in memory as tensors (digits: nothing to decode, and starting processes cost
    more than they save: 2 digits epochs took 2.1 s with 0 workers, 2.4 s with 1)."""
    if cfg.loader_workers is not None:
        return cfg.loader_workers
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    if not getattr(dataset, "needs_decoding", True):
        return 0
    return max(0, min(MAX_AUTO_LOADER_WORKERS, usable_cpus() - 1))


def usable_cpus() -> int:
    """CPUs this process is meant to use: OMP_NUM_THREADS where set (Ray sets it to a worker's
    reserved CPUs), else the CPUs it may run on."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)


def train_sampler(dataset: Dataset, cfg: TrainConfig, world_size: int = 1, rank: int = 0
                  ) -> DistributedSampler:
    """The seeded epoch order shared by one process and N workers: worker r of N takes every
    N-th index of the same permutation, so with a global batch B split as B/N per worker each
    step covers the same samples whatever N is (call set_epoch before each epoch)."""
    return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                              seed=cfg.seed, drop_last=True)


def fit(model: nn.Module, dataset: Dataset, cfg: TrainConfig, epochs: int, lr: float,
        label: str = "train") -> nn.Module:
    """Train in place for `epochs` with a fresh SGD + cosine schedule; returns the model."""
    if epochs <= 0:
        return model
    device = pick_device(cfg.device)
    to_device(model, device, cfg)
    sampler = train_sampler(dataset, cfg)
    batches = loader(dataset, cfg, train=True, sampler=sampler)
    opt, sched = make_optimizer(model, cfg, lr, epochs * len(batches))
    teacher = load_teacher(cfg, device)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        waited = InputWait(batches)
        loss, seen = run_epoch(model, waited, opt, sched, device, cfg,
                               progress=f"{label} epoch {epoch + 1}/{epochs}", teacher=teacher)
        log_epoch(label, epoch, epochs, loss, seen, time.perf_counter() - start, waited.seconds)
    return model


class InputWait:
    """Iterates `batches`, adding up the seconds spent waiting for the next one: the time the
    training loop (and so the device, once its queue drains) was starved of input."""

    def __init__(self, batches) -> None:
        self._source, self._batches = batches, iter(batches)
        self.seconds = 0.0

    def __iter__(self):
        return self

    def __len__(self) -> int:  # progress bars show a total when the source has one
        return len(self._source)

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self._batches)
        finally:
            self.seconds += time.perf_counter() - start


def log_epoch(label: str, epoch: int, epochs: int, loss: float, seen: int, seconds: float,
              input_wait: float | None = None) -> None:
    waited = (f", {input_wait:.1f}s waiting for input" if input_wait is not None else "")
    log.info("%s epoch %d/%d loss %.4f (%d samples, %.1fs, %.0f img/s%s)", label, epoch + 1,
             epochs, loss, seen, seconds, seen / max(seconds, 1e-9), waited)
    if not math.isfinite(loss):
        raise FloatingPointError(f"{label}: loss became {loss} in epoch {epoch + 1}")


def calibration_indices(size: int, count: int, batch_size: int, seed: int) -> list[int]:
    """`count` batches' worth of sample indices drawn at random from all `size` samples
    (seeded; without replacement until every sample has been drawn once)."""
    gen = torch.Generator().manual_seed(seed)
    need = count * batch_size
    order: list[int] = []
    while len(order) < need:
        order += torch.randperm(size, generator=gen).tolist()
    return order[:need]


def calibration_batches(dataset: Dataset, cfg: TrainConfig, count: int
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`count` full batches of (images, labels) drawn at random from the whole `dataset`,
    seeded by cfg.seed: what channels are scored and BatchNorm is re-estimated on. Pass an
    unaugmented dataset (runners.make_runner does)."""
    if count < 1:
        return iter(())
    indices = calibration_indices(len(dataset), count, cfg.batch_size, cfg.seed)
    return iter(loader(Subset(dataset, indices), cfg, train=False))


def _progress(batches, label: str):
    if not label or not sys.stderr.isatty():
        return batches
    from tqdm import tqdm

    return tqdm(batches, desc=label, leave=False, file=sys.stderr)


class LocalRunner:
    """The loop's training backend in one process (see distributed.RayRunner for N workers).
    Channels are scored and BatchNorm re-estimated on batches of `calibration_set` (default:
    the training set; pass it unaugmented)."""

    def __init__(self, train_set: Dataset, test_set: Dataset, cfg: TrainConfig,
                 calibration_set: Dataset | None = None) -> None:
        self.train_set, self.test_set, self.cfg = train_set, test_set, cfg
        self.calibration_set = train_set if calibration_set is None else calibration_set

    def fit(self, model: nn.Module, epochs: int, lr: float, label: str = "train") -> nn.Module:
        return fit(model, self.train_set, self.cfg, epochs, lr, label)

    def evaluate(self, model: nn.Module) -> float:
        return evaluate(model, self.test_set, self.cfg)

    @property
    def uses_cuda(self) -> bool:
        return pick_device(self.cfg.device).type == "cuda"

    def calibration_batches(self, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return calibration_batches(self.calibration_set, self.cfg, count)

    def score(self, kind: str, model: nn.Module, groups, batches: int, seed: int
              ) -> dict[str, torch.Tensor]:
        """importance.compute_scores on `batches` calibration batches, on the model's device."""
        from ccpcsa.importance import NEEDS_BATCHES, compute_scores

        calibration = self.calibration_batches(batches) if kind in NEEDS_BATCHES else ()
        return compute_scores(kind, model, groups, calibration, seed=seed)

    def recalibrate_bn(self, model: nn.Module, batches: int) -> nn.Module:
        """Re-estimate BatchNorm statistics on `batches` calibration batches (bn.py)."""
        device = pick_device(self.cfg.device)
        return recalibrate_bn(model, self.calibration_batches(batches), device)

    def close(self) -> None:
        """Nothing to release: one process."""
