"""Channel importance: CCPCSA's channel-correlation score and baselines, one interface.

CCPCSA score (our definition; the paper's formulas did not survive, see shared/paper-notes.md):
for a layer's attention-weighted output X (C x N*H*W), R is the Pearson correlation of its
channels, redundancy r_i = mean_{j!=i} |R_ij|, strength a_i = mean |X_i| / max_k mean |X_k|,
importance s_i = a_i * (1 - r_i). Statistics stream over batches in O(C^2) memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ccpcsa.attention import BAM
from ccpcsa.prune import ChannelGroup

IMPORTANCES = ("ccpcsa", "l1", "bn_scale", "attention", "random")
_CHUNK = 1 << 22  # elements per float64 block when accumulating (bounds transient memory)


class ImportanceError(ValueError):
    pass


class CorrelationStats:
    """Streaming sums for the channel correlation of one layer: n, sum(d), d d^T, sum|x|,
    with d = x - shift (the first batch's mean) so large means do not cancel precision."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.sum_d: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        flat = channels_first(x)
        channels = flat.shape[0]
        if self.shift is None:
            self.shift = flat.double().mean(1)
            self.sum_d = torch.zeros(channels, dtype=torch.float64, device=flat.device)
            self.outer = torch.zeros(channels, channels, dtype=torch.float64, device=flat.device)
            self.abs_sum = torch.zeros(channels, dtype=torch.float64, device=flat.device)
        step = max(1, _CHUNK // max(channels, 1))
        for start in range(0, flat.shape[1], step):
            block = flat[:, start:start + step].double()
            d = block - self.shift[:, None]
            self.sum_d += d.sum(1)
            self.outer += d @ d.T
            self.abs_sum += block.abs().sum(1)
        self.n += flat.shape[1]

    def correlation(self) -> torch.Tensor:
        if self.n < 2:
            raise ImportanceError("correlation needs at least 2 samples per channel")
        mean_d = self.sum_d / self.n
        cov = self.outer / self.n - torch.outer(mean_d, mean_d)
        std = cov.diagonal().clamp_min(0).sqrt()
        alive = std > 1e-12
        corr = cov / torch.outer(std, std).clamp_min(1e-24)
        return corr * torch.outer(alive, alive)  # a constant channel correlates with nothing

    def scores(self) -> torch.Tensor:
        corr = self.correlation().abs()
        channels = corr.shape[0]
        redundancy = (corr.sum(1) - corr.diagonal()) / max(channels - 1, 1)
        strength = self.abs_sum / self.n
        strength = strength / strength.max().clamp_min(1e-12)
        return (strength * (1.0 - redundancy)).float()


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """N x C x ... -> C x (N * ...)."""
    return x.detach().transpose(0, 1).reshape(x.shape[1], -1)


def correlation_scores(x: torch.Tensor) -> torch.Tensor:
    """One-shot CCPCSA scores of activations N x C x H x W (the reference for the streaming)."""
    flat = channels_first(x).double()
    corr = torch.corrcoef(flat).nan_to_num(0.0).abs()
    redundancy = (corr.sum(1) - corr.diagonal()) / (flat.shape[0] - 1)
    strength = flat.abs().mean(1)
    return (strength / strength.max() * (1.0 - redundancy)).float()


class MeanStats:
    """Streaming per-channel mean of a non-negative map (|activation| or attention)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        flat = channels_first(x).double()
        self.total = flat.sum(1) if self.total is None else self.total + flat.sum(1)
        self.n += flat.shape[1]

    def scores(self) -> torch.Tensor:
        return (self.total / max(self.n, 1)).float()


def measured_modules(group: ChannelGroup) -> list[tuple[str, nn.Module]]:
    """Where a group's channels are observed: the BAM output (attention-weighted) when the
    group passes through BAM; else its BN outputs; else its producing layers' outputs."""
    return list(group.bams) or list(group.norms) or list(group.producers)


def compute_scores(
    kind: str,
    model: nn.Module,
    groups: list[ChannelGroup],
    batches: Iterable[torch.Tensor] = (),
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Per-group channel scores (higher = more important), one tensor of group.width each."""
    if kind not in IMPORTANCES:
        choices = ", ".join(IMPORTANCES)
        raise ImportanceError(f"unknown importance {kind!r}; choose one of: {choices}")
    if kind == "random":
        gen = torch.Generator().manual_seed(seed)
        return {g.key: torch.rand(g.width, generator=gen) for g in groups}
    if kind == "l1":
        return {g.key: _member_mean([_filter_l1(m) for _, m in g.producers]) for g in groups}
    if kind == "bn_scale":
        return {
            g.key: _member_mean([m.weight.detach().abs() for _, m in g.norms if m.affine])
            if g.norms else _member_mean([_filter_l1(m) for _, m in g.producers])
            for g in groups
        }
    if kind == "ccpcsa":
        return _observe(model, groups, batches, CorrelationStats, _output_of)
    return _observe(model, groups, batches, MeanStats, _attention_of)


def _filter_l1(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach()
    return w.abs().reshape(w.shape[0], -1).sum(1)


def _member_mean(scores: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack([s.float().cpu() / (s.float().abs().mean().cpu() + 1e-12)
                           for s in scores])
    return stacked.mean(0)


def _output_of(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output


def _attention_of(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    # PCAS-style: the mean attention mask where BAM applies, mean |activation| elsewhere.
    if isinstance(module, BAM):
        return module.attention(inputs[0])
    return output.abs()


def _accumulate(stats, view):
    def hook(module, inputs, output):
        stats.update(view(module, inputs, output))

    return hook


def _observe(
    model: nn.Module,
    groups: list[ChannelGroup],
    batches: Iterable[torch.Tensor],
    make_stats: Callable[[], CorrelationStats | MeanStats],
    view: Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    stats: dict[int, CorrelationStats | MeanStats] = {}
    members: dict[str, list[int]] = {}
    hooks = []
    for g in groups:
        members[g.key] = []
        for _name, module in measured_modules(g):
            if id(module) not in stats:
                stats[id(module)] = make_stats()
                hooks.append(module.register_forward_hook(_accumulate(stats[id(module)], view)))
            members[g.key].append(id(module))
    device = next(model.parameters()).device
    was_training = model.training
    seen = 0
    try:
        model.eval()
        with torch.no_grad():
            for x in batches:
                model(x.to(device))
                seen += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ImportanceError("data-driven importance needs at least one calibration batch")
    per_module = {k: s.scores() for k, s in stats.items()}
    return {key: _member_mean([per_module[i] for i in ids]) for key, ids in members.items()}
