"""BAM, the Bottleneck Attention Module (Park, Woo, Lee, Kweon 2018), and its insertion.

F' = F + F * sigmoid(M_c(F) + M_s(F)); M_c is a channel MLP on the pooled map, M_s a dilated
spatial branch ending in one channel that broadcasts over C.
"""

from __future__ import annotations

import torch
from torch import nn

REDUCTION = 16
DILATION = 4
MIN_HIDDEN = 4  # BAM's C/r collapses to 1 on narrow layers (MobileNetV2: C=16); keep a usable MLP


def hidden_width(channels: int, reduction: int = REDUCTION) -> int:
    return max(channels // reduction, MIN_HIDDEN)


class ChannelGate(nn.Module):
    """M_c: global average pool -> Linear C->C/r -> BN -> ReLU -> Linear C/r->C."""

    def __init__(self, channels: int, reduction: int = REDUCTION) -> None:
        super().__init__()
        hidden = hidden_width(channels, reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(self.relu(self.bn(self.fc1(pooled))))[:, :, None, None]


class SpatialGate(nn.Module):
    """M_s: 1x1 conv C->C/r, two 3x3 dilated convs (BN+ReLU each), 1x1 conv -> 1 channel."""

    def __init__(
        self, channels: int, reduction: int = REDUCTION, dilation: int = DILATION
    ) -> None:
        super().__init__()
        hidden = hidden_width(channels, reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.reduce_bn = nn.BatchNorm2d(hidden)
        self.dilated1 = nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.dilated2 = nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, 1, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.reduce_bn(self.reduce(x)))
        y = self.relu(self.bn1(self.dilated1(y)))
        y = self.relu(self.bn2(self.dilated2(y)))
        return self.project(y)


class BAM(nn.Module):
    def __init__(self, channels: int, reduction: int = REDUCTION) -> None:
        super().__init__()
        self.channel_gate = ChannelGate(channels, reduction)
        self.spatial_gate = SpatialGate(channels, reduction)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention map M(F), shape N x C x H x W."""
        return torch.sigmoid(self.channel_gate(x) + self.spatial_gate(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x * self.attention(x)

    @property
    def channels(self) -> int:
        return self.channel_gate.fc1.in_features


class WithBAM(nn.Module):
    """A stage followed by BAM on its output. Keeps the stage's own submodule names."""

    def __init__(self, stage: nn.Module, channels: int) -> None:
        super().__init__()
        self.stage = stage
        self.bam = BAM(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bam(self.stage(x))


def insert_bam(model: nn.Module, placements: dict[str, int]) -> nn.Module:
    """Wrap each named submodule (dotted path -> its output channels) with BAM, in place.
    The model keeps the placements (`ccpcsa_bam`), which its checkpoints record."""
    for path, channels in placements.items():
        parent, attr = _parent_of(model, path)
        child = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
        if isinstance(child, WithBAM):
            raise ValueError(f"BAM already inserted at {path!r}")
        wrapped = WithBAM(child, channels)
        if attr.isdigit():
            parent[int(attr)] = wrapped
        else:
            setattr(parent, attr, wrapped)
    model.ccpcsa_bam = {**getattr(model, "ccpcsa_bam", {}), **placements}
    return model


def strip_bam(model: nn.Module) -> nn.Module:
    """Remove every BAM (replace WithBAM by its stage), in place. Fine-tune afterwards."""
    for name, module in list(model.named_modules()):
        if isinstance(module, WithBAM):
            parent, attr = _parent_of(model, name)
            if attr.isdigit():
                parent[int(attr)] = module.stage
            else:
                setattr(parent, attr, module.stage)
    model.ccpcsa_bam = {}
    return model


def bam_modules(model: nn.Module) -> list[tuple[str, BAM]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BAM)]


def has_bam(model: nn.Module) -> bool:
    return any(isinstance(m, BAM) for m in model.modules())


def _parent_of(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, attr = path.split(".")
    parent = model
    for part in parents:
        parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
    return parent, attr
