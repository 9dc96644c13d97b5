"""Where the loop trains: the Runner interface and the factory that picks one process
(train.LocalRunner) or Ray Train workers (distributed.RayRunner). Sits above both modules."""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import torch
from torch import nn

from ccpcsa.data import DataConfig, build_datasets
from ccpcsa.prune import ChannelGroup
from ccpcsa.train import LocalRunner, TrainConfig


class Runner(Protocol):
    """Where training happens: train.LocalRunner (one process) or distributed.RayRunner (one
    group of Ray Train workers, kept for the runner's life: close() it when done)."""

    @property
    def uses_cuda(self) -> bool:
        """Whether the model trains on CUDA (the default --round-to depends on it)."""
        ...

    def fit(self, model: nn.Module, epochs: int, lr: float, label: str = "train") -> nn.Module:
        ...

    def evaluate(self, model: nn.Module) -> float:
        ...

    def score(self, kind: str, model: nn.Module, groups: list[ChannelGroup], batches: int,
              seed: int) -> dict[str, torch.Tensor]:
        """importance.compute_scores of `groups` on `batches` full batches of (images, labels),
        unaugmented, drawn at random (seeded) across the whole training split, where the
        model trains (the workers' devices for Ray Train)."""
        ...

    def recalibrate_bn(self, model: nn.Module, batches: int) -> nn.Module:
        """Re-estimate every BatchNorm's running statistics on `batches` calibration batches
        (no weight update; momentum and train/eval mode restored); returns the model."""
        ...

    def close(self) -> None:
        """Release what the runner holds (Ray Train workers); a later call starts again."""
        ...


def make_runner(data: DataConfig, cfg: TrainConfig, workers: int, storage_path: str, *,
                gpus_per_worker: float | None = None, cpus_per_worker: float = 1.0,
                sync_bn: bool = False, max_failures: int = 2, placement: str = "STRICT_PACK",
                stable_fits: bool = False) -> Runner:
    """The loop's training backend: this process for one worker (no Ray), else one group of
    `workers` Ray Train workers (runs under `storage_path`) that trains, evaluates, scores
    channels and re-estimates BatchNorm. Channels are scored and BatchNorm is re-estimated on
    unaugmented training data. max_failures: restarts of the worker group after a worker
    or node is lost; placement and stable_fits: see RayRunner."""
    if workers == 1:
        train_set, test_set = build_datasets(data)
        calibration_set = build_datasets(replace(data, augment=False))[0]
        return LocalRunner(train_set, test_set, cfg, calibration_set)
    from ccpcsa.distributed import RayRunner

    return RayRunner(data, cfg, workers, storage_path, gpus_per_worker=gpus_per_worker,
                     cpus_per_worker=cpus_per_worker, sync_bn=sync_bn,
                     max_failures=max_failures, placement=placement, stable_fits=stable_fits)
