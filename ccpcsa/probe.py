"""One forward pass of a zero input with forward hooks attached: how the layout, FLOPs and
per-channel cost code observe a model's shapes without changing it."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def probe(model: nn.Module, input_shape: tuple[int, ...], hooks: Iterable[RemovableHandle]
          ) -> None:
    """Run `model` once on a zero batch of one (C, H, W) input on its device, in eval mode
    without gradients; then remove `hooks` (already registered) and restore the model's
    training mode, also when the forward pass raises."""
    hooks = list(hooks)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
