"""Where the loop trains: the Runner interface and the factory that picks one process
(train.LocalRunner) or Ray Train workers (distributed.RayRunner). Sits above both modules."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Protocol

import torch
from torch import nn

from ccpcsa.data import DataConfig, build_datasets
from ccpcsa.train import LocalRunner, TrainConfig


class Runner(Protocol):
    """Where training happens: train.LocalRunner (one process) or distributed.RayRunner."""

    def fit(self, model: nn.Module, epochs: int, lr: float, label: str = "train") -> nn.Module:
        ...

    def evaluate(self, model: nn.Module) -> float:
        ...

    def calibration_batches(self, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`count` full batches of (images, labels), unaugmented, drawn at random (seeded)
        across the whole training split: what channels are scored on."""
        ...

    def recalibrate_bn(self, model: nn.Module, batches: int) -> nn.Module:
        """Re-estimate every BatchNorm's running statistics on `batches` calibration batches
        (no weight update; momentum and train/eval mode restored); returns the model."""
        ...


def make_runner(data: DataConfig, cfg: TrainConfig, workers: int, storage_path: str, *,
                gpus_per_worker: float | None = None, cpus_per_worker: float = 1.0,
                sync_bn: bool = False) -> Runner:
    """The loop's training backend: this process for one worker (no Ray), else Ray Train over
    `workers` (runs under `storage_path`). Channels are scored and BatchNorm is re-estimated on
    unaugmented training data."""
    if workers == 1:
        train_set, test_set = build_datasets(data)
        calibration_set = build_datasets(replace(data, augment=False))[0]
        return LocalRunner(train_set, test_set, cfg, calibration_set)
    from ccpcsa.distributed import RayRunner

    return RayRunner(data, cfg, workers, storage_path, gpus_per_worker=gpus_per_worker,
                     cpus_per_worker=cpus_per_worker, sync_bn=sync_bn)
