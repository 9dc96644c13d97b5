"""Dependency-aware physical channel removal, built on Torch-Pruning's DependencyGraph.

BAM's spatial branch ends in a one-channel map broadcast over C, which stops Torch-Pruning's
tracer from coupling the residual stream through it (shared/design.md, "Known pitfall"). BAM is
therefore registered as a customised layer: it is one node whose input and output channels are
coupled, and its pruner removes the same channels from the channel MLP's input and output and
from the spatial branch's first conv, so the residual group shrinks through it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from ccpcsa.attention import BAM


class PruneError(ValueError):
    pass


class BAMPruner(tp.pruner.BasePruningFunc):
    """Prunes BAM's C-wide interfaces; its hidden (C/r) width is left as trained."""

    def prune_out_channels(self, layer: BAM, idxs: Sequence[int]) -> BAM:
        idxs = sorted(set(idxs))
        tp.prune_linear_in_channels(layer.channel_gate.fc1, idxs)
        tp.prune_linear_out_channels(layer.channel_gate.fc2, idxs)
        tp.prune_conv_in_channels(layer.spatial_gate.reduce, idxs)
        return layer

    prune_in_channels = prune_out_channels  # in and out are the same channels: coupled

    def get_out_channels(self, layer: BAM) -> int:
        return layer.channels

    def get_in_channels(self, layer: BAM) -> int:
        return layer.channels


@dataclass
class ChannelGroup:
    """Channels that must be removed together, indexed like the root layer's outputs."""

    key: str  # name of the root layer (the first layer of the group in trace order)
    stage: str
    width: int
    root: nn.Module
    producers: list[tuple[str, nn.Module]]  # Conv2d / Linear whose outputs are these channels
    norms: list[tuple[str, nn.Module]]  # BatchNorm over these channels
    bams: list[tuple[str, BAM]]  # BAM modules whose input/output are these channels


@dataclass(frozen=True)
class PruneLimits:
    """How far each group may shrink: a removal-ratio cap (default, per stage, per layer)
    relative to its original width, and an absolute floor of channels."""

    max_ratio: float = 0.9
    stage_caps: dict[str, float] = field(default_factory=dict)
    layer_caps: dict[str, float] = field(default_factory=dict)
    min_channels: int = 4

    def validate(self) -> None:
        for where, value in [("max_ratio", self.max_ratio), *self.stage_caps.items(),
                             *self.layer_caps.items()]:
            if not 0.0 <= value < 1.0:
                raise PruneError(f"ratio cap {where}={value} is outside [0, 1)")
        if self.min_channels < 1:
            raise PruneError(f"min_channels must be >= 1, got {self.min_channels}")

    def cap_for(self, group: ChannelGroup) -> float:
        if group.key in self.layer_caps:
            return self.layer_caps[group.key]
        return self.stage_caps.get(group.stage, self.max_ratio)

    def min_width(self, group: ChannelGroup, original_width: int) -> int:
        keep = math.ceil(original_width * (1.0 - self.cap_for(group)) - 1e-9)
        return max(keep, min(self.min_channels, original_width))


def build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    return tp.DependencyGraph().build_dependency(
        model, example_inputs, customized_pruners={BAM: BAMPruner()}, verbose=False
    )


def find_groups(
    model: nn.Module,
    graph: tp.DependencyGraph,
    classifier: nn.Module,
    stage_of,
) -> list[ChannelGroup]:
    """Every prunable channel group; the classifier's outputs (the classes) are never pruned."""
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for group in graph.get_all_groups(ignored_layers=[classifier], root_module_types=(
            nn.Conv2d, nn.Linear)):
        root = group[0].dep.target.module
        width = graph.get_out_channels(root)
        producers, norms, bams = [], [], []
        for dep, idxs in group:
            module = dep.target.module
            if module not in names or len(idxs) != width:
                continue
            if not graph.is_out_channel_pruning_fn(dep.handler):
                continue
            entry = (names[module], module)
            if isinstance(module, BAM):
                bams.append(entry)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                norms.append(entry)
            elif isinstance(module, (nn.Conv2d, nn.Linear)) and _prunes_outputs(dep, graph):
                producers.append(entry)
        key = names[root]
        stage = _majority_stage([n for n, _ in producers] or [key], stage_of)
        groups.append(ChannelGroup(key, stage, width, root, producers, norms, bams))
    return groups


def _majority_stage(names: list[str], stage_of) -> str:
    # A residual stream's root may sit in the stem (CIFAR ResNet conv1 feeds layer1's adds):
    # the stage is where most of its producing layers are.
    stages = [stage_of(n) for n in names]
    return max(dict.fromkeys(stages), key=stages.count)


def _prunes_outputs(dep, graph: tp.DependencyGraph) -> bool:
    pruner = graph.get_pruner_of_module(dep.target.module)
    return dep.handler == pruner.prune_out_channels


def group_widths(groups: list[ChannelGroup]) -> dict[str, int]:
    return {g.key: g.width for g in groups}


def select_channels(
    groups: list[ChannelGroup],
    scores: dict[str, torch.Tensor],
    count: int,
    limits: PruneLimits,
    original_widths: dict[str, int],
) -> dict[str, list[int]]:
    """The `count` globally lowest-scoring channels whose removal respects every group's limit.

    Scores are normalised per group (divided by the group mean) before the global ranking so
    that layers with large activations are not protected by their scale alone.
    """
    if count < 1:
        raise PruneError(f"groups per round must be >= 1, got {count}")
    candidates: list[tuple[float, str, int]] = []
    budget: dict[str, int] = {}
    for g in groups:
        original = original_widths.get(g.key, g.width)
        budget[g.key] = max(0, g.width - limits.min_width(g, original))
        if budget[g.key] == 0:
            continue
        s = scores[g.key].detach().double().cpu()
        if s.shape != (g.width,):
            raise PruneError(f"score of {g.key} has shape {tuple(s.shape)}, want ({g.width},)")
        s = s / (s.abs().mean() + 1e-12)
        candidates += [(float(v), g.key, i) for i, v in enumerate(s)]
    candidates.sort()
    chosen: dict[str, list[int]] = {}
    taken = 0
    for _score, key, idx in candidates:
        if taken == count:
            break
        if len(chosen.get(key, [])) < budget[key]:
            chosen.setdefault(key, []).append(idx)
            taken += 1
    return chosen


def remove_channels(
    graph: tp.DependencyGraph, groups: list[ChannelGroup], chosen: dict[str, list[int]]
) -> int:
    """Physically remove the chosen channels, group by group; returns how many were removed."""
    by_key = {g.key: g for g in groups}
    removed = 0
    for key, idxs in chosen.items():
        root = by_key[key].root
        pruner = graph.get_pruner_of_module(root)
        group = graph.get_pruning_group(root, pruner.prune_out_channels, sorted(idxs))
        if not graph.check_pruning_group(group):
            raise PruneError(f"removing {len(idxs)} channels would empty layer {key}")
        group.prune()
        removed += len(idxs)
    return removed
