"""FLOPs as multiply-accumulates (the pruning literature's convention) and parameter counts.

Counted: every Conv2d and Linear (BAM's included), one MAC per weight use per output element;
biases, BN, activations, pooling and additions are not counted (ResNet-50 at 224x224: 4.09 G).
"""

from __future__ import annotations

import torch
from torch import nn

from ccpcsa.probe import probe


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs of one forward pass of a single sample of shape (C, H, W)."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    probe(model, input_shape, hooks)
    return int(total)


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
