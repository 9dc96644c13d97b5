"""BatchNorm recalibration: re-estimate running statistics after surgery, no weight update.

Physically removing channels changes what every later BatchNorm sees, so its running mean and
variance are stale: a pruned model evaluated with them can lose tens of points that a few
forward passes give back (docs/design.md, "Notes behind the code": 34.7 -> 62.4 % at -50 % FLOPs).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class RecalibrationError(ValueError):
    pass


def batch_norms(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm (1d, 2d, sync, cross-worker) that keeps running statistics."""
    return [m for m in model.modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, device: torch.device | str | None = None
                   ) -> nn.Module:
    """Replace every BatchNorm's running mean/variance by their plain average over `batches`
    (tensors of images, or (images, labels) pairs); returns `model`, changed in place.

    Only the BatchNorm layers run in training mode (dropout and the like stay in eval mode);
    no gradient is computed and no parameter changes. Each BatchNorm's momentum and the
    model's train/eval mode are restored afterwards: a `momentum=None` left behind would turn
    every later update into a cumulative average, which cost a later fine-tune up to 12 points.
    """
    norms = batch_norms(model)
    if not norms:
        return model
    device = torch.device(device) if device is not None else next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    saved = [_running_stats(m) for m in norms]
    seen = 0
    try:
        model.to(device)
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: each batch weighs the same
            m.train()
        for batch in batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(images.to(device, non_blocking=True))
            seen += 1
        if seen == 0:
            raise RecalibrationError("BatchNorm recalibration needs at least one batch")
    except BaseException:
        for m, stats in zip(norms, saved, strict=True):  # leave the model as it was
            _load_running_stats(m, stats)
        raise
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        for m, training in modes.items():
            m.train(training)
    return model


def _running_stats(norm: _BatchNorm) -> list[torch.Tensor]:
    return [b.detach().clone() for b in (norm.running_mean, norm.running_var,
                                          norm.num_batches_tracked)]


def _load_running_stats(norm: _BatchNorm, stats: list[torch.Tensor]) -> None:
    for buffer, value in zip((norm.running_mean, norm.running_var, norm.num_batches_tracked),
                             stats, strict=True):
        buffer.copy_(value.to(buffer.device))
