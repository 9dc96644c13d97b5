"""The Runner interface: where the loop trains (one process: train.LocalRunner; one group of Ray
Train workers: distributed.RayRunner). The loop depends on this interface only; runners.py
picks an implementation."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ccpcsa.prune import ChannelGroup


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
