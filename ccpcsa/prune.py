"""Dependency-aware physical channel removal, built on Torch-Pruning's DependencyGraph.

BAM's spatial branch ends in a one-channel map broadcast over C, which stops Torch-Pruning's
tracer from coupling the residual stream through it (docs/design.md, "Notes behind the code").
BAM is therefore registered as a customised layer: it is one node whose input and output
channels are coupled, and its pruner removes the same channels from the channel MLP's input and
output and from the spatial branch's first conv, so the residual group shrinks through it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch_pruning as tp
from torch import nn

from ccpcsa.attention import BAM
from ccpcsa.models import get_spec
from ccpcsa.probe import probe


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
    # Conv2d / Linear whose inputs are exactly these channels (what the network reads of them)
    consumers: list[tuple[str, nn.Module]] = field(default_factory=list)
    pruning_group: tp.Group | None = None  # Torch-Pruning's full-width group (importances)

    @property
    def is_residual(self) -> bool:
        """Channels summed from several layers (a residual stream), not one layer's output
        (a depthwise conv passing a layer's channels through does not count)."""
        return sum(not _is_depthwise(m) for _, m in self.producers) > 1
    # > 1 when a grouped convolution (RegNet, ResNeXt) reads or writes these channels: they
    # are removed `interleave` at a time, the same position in each of its conv groups
    interleave: int = 1


@dataclass(frozen=True)
class PruneLimits:
    """How far each group may shrink: a removal-ratio cap relative to its original width (per
    layer, else for residual streams, else per stage, else the default) and an absolute floor
    of channels. Under `uniform` allocation the caps are also the pruning ratios the rounds
    walk towards: every group reaches its cap in the same round."""

    max_ratio: float = 0.9
    stage_caps: dict[str, float] = field(default_factory=dict)
    layer_caps: dict[str, float] = field(default_factory=dict)
    min_channels: int = 4
    residual_cap: float | None = None  # for every residual-stream group, over its stage's cap

    def validate(self) -> None:
        residual = [] if self.residual_cap is None else [("residual_cap", self.residual_cap)]
        for where, value in [("max_ratio", self.max_ratio), *self.stage_caps.items(),
                             *self.layer_caps.items(), *residual]:
            if not 0.0 <= value < 1.0:
                raise PruneError(f"ratio cap {where}={value} is outside [0, 1)")
        if self.min_channels < 1:
            raise PruneError(f"min_channels must be >= 1, got {self.min_channels}")

    def cap_for(self, group: ChannelGroup) -> float:
        if group.key in self.layer_caps:
            return self.layer_caps[group.key]
        if self.residual_cap is not None and group.is_residual:
            return self.residual_cap
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
        producers, norms, bams, consumers = [], [], [], []
        interleave = 1
        for dep, idxs in group:
            module = dep.target.module
            if isinstance(module, nn.Conv2d) and 1 < module.groups < module.in_channels:
                interleave = math.lcm(interleave, module.groups)
            if module not in names or len(idxs) != width:
                continue
            entry = (names[module], module)
            if (isinstance(module, (nn.Conv2d, nn.Linear))
                    and graph.is_in_channel_pruning_fn(dep.handler)
                    and _in_width(module) == width):
                consumers.append(entry)
            if not graph.is_out_channel_pruning_fn(dep.handler):
                continue
            if graph.get_out_channels(module) != width:
                continue  # sees these channels as a slice of a concatenation (DenseNet)
            if isinstance(module, BAM):
                bams.append(entry)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                norms.append(entry)
            elif isinstance(module, (nn.Conv2d, nn.Linear)) and _prunes_outputs(dep, graph):
                producers.append(entry)
        key = names[root]
        if width % interleave:
            continue  # cannot shrink evenly across its conv groups: left whole
        stage = _majority_stage([n for n, _ in producers] or [key], stage_of)
        groups.append(ChannelGroup(key, stage, width, root, producers, norms, bams, consumers,
                                   group, interleave))
    return groups


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and 1 < module.groups == module.in_channels


def _in_width(module: nn.Module) -> int:
    return module.in_channels if isinstance(module, nn.Conv2d) else module.in_features


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


ALLOCATIONS = ("uniform", "global", "flops")


def select_channels(
    groups: list[ChannelGroup],
    scores: dict[str, torch.Tensor],
    count: int,
    limits: PruneLimits,
    original_widths: dict[str, int],
    allocation: str = "uniform",
    costs: dict[str, float] | None = None,
    round_to: int = 1,
) -> dict[str, list[int]]:
    """Which `count` channels to remove this round, as {group key: channel indices}.

    Allocation (how many channels each group gives) is its own decision; the scores only rank
    channels within a group, except under the global policies:
    - uniform: every group's cumulative removed fraction of its original width grows at the
      same rate relative to its cap (the same fraction everywhere when the caps are equal),
      so the caps are the per-layer pruning ratios the rounds walk towards; a group held by
      its floor leaves its share to the others. The default (docs/design.md, "Allocation": global
      ranking strips residual streams and loses to random selection).
    - global: the `count` lowest scores over all groups (scores as compute_scores returns
      them, mean-normalised per group), within each group's limit.
    - flops: global ranking of score / cost, where cost is the MACs one channel of the group
      costs relative to the mean group (`costs`, from channel_macs): the least importance
      per FLOP saved goes first.

    round_to: every width a group is pruned to is a multiple of it (8 keeps tensor cores
    busy), never below its floor (the floor rounds up to a multiple; a group that cannot
    reach a smaller multiple is left alone). A group then gives channels in steps (its width
    modulo round_to first, then round_to at a time; under the global policies a step is
    ranked by its channels' mean score), so a round removes at least `count` channels (fewer
    only when the limits allow no more) and at most one step more than `count` - 1.
    """
    if count < 1:
        raise PruneError(f"groups per round must be >= 1, got {count}")
    if allocation not in ALLOCATIONS:
        raise PruneError(f"unknown allocation {allocation!r}; choose one of: "
                         f"{', '.join(ALLOCATIONS)}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise PruneError(f"round-to must be an integer >= 1, got {round_to!r}")
    if any(g.interleave > 1 for g in groups):
        return _select_interleaved(groups, scores, count, limits, original_widths, allocation,
                                   costs, round_to)
    budget: dict[str, int] = {}
    first: dict[str, int] = {}  # the first step: down to the next multiple of round_to
    ranked: dict[str, torch.Tensor] = {}
    for g in groups:
        original = original_widths.get(g.key, g.width)
        floor = -(-limits.min_width(g, original) // round_to) * round_to
        budget[g.key] = max(0, g.width - floor)
        first[g.key] = g.width % round_to or round_to
        s = scores[g.key].detach().double().cpu()
        if s.shape != (g.width,):
            raise PruneError(f"score of {g.key} has shape {tuple(s.shape)}, want ({g.width},)")
        ranked[g.key] = s
    if allocation == "uniform":
        shares = _uniform_shares(groups, count, limits, original_widths, budget, ranked,
                                 first, round_to)
        return {key: sorted(torch.argsort(ranked[key], stable=True)[:n].tolist())
                for key, n in shares.items() if n > 0}
    if allocation == "flops":
        if costs is None or any(g.key not in costs for g in groups):
            raise PruneError("flops allocation needs every group's channel cost (channel_macs)")
        mean_cost = sum(costs[g.key] for g in groups) / max(len(groups), 1)
        ranked = {k: s / (costs[k] / mean_cost) for k, s in ranked.items()}
    steps = []  # (mean score of the step's channels, group, position, channel indices)
    for key, s in ranked.items():
        order = torch.argsort(s, stable=True).tolist()
        pos, size, last = 0, first[key], float("-inf")
        while pos + size <= budget[key]:
            idxs = order[pos:pos + size]
            last = max(last, float(s[idxs].mean()))  # a group's steps are taken in order
            steps.append((last, key, pos, idxs))
            pos, size = pos + size, round_to
    chosen: dict[str, list[int]] = {}
    taken = 0
    for _score, key, _pos, idxs in sorted(steps, key=lambda step: step[:3]):
        if taken >= count:
            break
        chosen.setdefault(key, []).extend(idxs)
        taken += len(idxs)
    return {key: sorted(idxs) for key, idxs in chosen.items()}


def _uniform_shares(groups: list[ChannelGroup], count: int, limits: PruneLimits,
                    original_widths: dict[str, int], budget: dict[str, int],
                    scores: dict[str, torch.Tensor], first: dict[str, int], round_to: int
                    ) -> dict[str, int]:
    """Channels per group so that after this round every group has lost about t times its
    cap of its original width, t chosen so that the shares add up to `count` (or to all that
    the limits allow), each share a whole number of the group's steps (see select_channels).
    Cumulative, so rounding errors of one round are repaid in the next."""
    rate, removed = {}, {}
    for g in groups:
        original = original_widths.get(g.key, g.width)
        rate[g.key] = limits.cap_for(g) * original
        removed[g.key] = original - g.width

    def shares(t: float) -> dict[str, float]:
        return {k: min(max(t * rate[k] - removed[k], 0.0), budget[k]) for k in rate}

    total = min(count, sum(budget.values()))
    if total == 0:
        return {}
    low, high = 0.0, 1.0
    while sum(shares(high).values()) < total:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if sum(shares(mid).values()) < total else (low, mid)
    exact = shares(high)

    def round_down(k: str) -> int:  # the largest whole number of steps within the share
        if exact[k] < first[k]:
            return 0
        return min(first[k] + int((exact[k] - first[k]) // round_to) * round_to, budget[k])

    whole = {k: round_down(k) for k in exact}
    # Channels left over go one step at a time to the group owed the largest fraction of its
    # next step; ties go to the group whose weakest channel is the least important relative
    # to its group (the criterion breaks them).
    weakest = {k: float(s.min() / (s.abs().mean() + 1e-12)) if len(s) else 0.0
               for k, s in scores.items()}
    while sum(whole.values()) < total:
        step = {k: first[k] if whole[k] == 0 else round_to for k in whole
                if whole[k] + (first[k] if whole[k] == 0 else round_to) <= budget[k]}
        if not step:
            break
        k = min(step, key=lambda k: (-(exact[k] - whole[k]) / step[k], weakest[k], k))
        whole[k] += step[k]
    return whole


def channel_macs(model: nn.Module, groups: list[ChannelGroup],
                 input_shape: tuple[int, ...]) -> dict[str, float]:
    """MACs (as flops.py counts them) that one channel of each group costs, i.e. what removing
    it saves: its producing layers' filters, its consumers' input slices and BAM's slices."""
    out_numel: dict[nn.Module, int] = {}

    def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        out_numel[module] = output.numel()

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    probe(model, input_shape, hooks)
    return {g.key: float(sum(_slice_macs(m, role, out_numel.get(m, 0), g.width)
                             for m, role in _layer_roles(g).items())) for g in groups}


def _layer_roles(group: ChannelGroup) -> dict[nn.Module, str]:
    """Each Conv2d / Linear the group's channels pass through: "out" (they are its outputs)
    or "in" (they are its inputs). A depthwise conv's inputs are its outputs: counted once."""
    graph = group.pruning_group._DG if group.pruning_group is not None else None
    roles: dict[nn.Module, str] = {}
    for dep, _idxs in group.pruning_group or []:
        module = dep.target.module
        if isinstance(module, BAM):
            roles[module.channel_gate.fc1] = "in"
            roles[module.channel_gate.fc2] = "out"
            roles[module.spatial_gate.reduce] = "in"
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            if graph.is_out_channel_pruning_fn(dep.handler):
                roles[module] = "out"
            elif graph.is_in_channel_pruning_fn(dep.handler):
                roles.setdefault(module, "in")
    return roles


def _slice_macs(module: nn.Module, role: str, out_numel: int, width: int) -> float:
    if isinstance(module, nn.Conv2d):
        kernel = module.kernel_size[0] * module.kernel_size[1]
        if role == "out":
            return out_numel / module.out_channels * module.in_channels / module.groups * kernel
        return out_numel * kernel / module.groups * module.in_channels / width
    if role == "out":
        return out_numel / module.out_features * module.in_features
    return out_numel * module.in_features / width


def _select_interleaved(groups, scores, count, limits, original_widths, allocation, costs,
                        round_to=1):
    """select_channels on a view where an interleaved group's k-th channel of every conv
    group is one unit (scored by their mean); each chosen unit removes all of them (so
    round_to applies to the width of each conv group)."""
    folded, folded_scores, folded_widths = [], {}, {}
    for g in groups:
        per = g.width // g.interleave
        folded.append(replace(g, width=per, interleave=1))
        folded_scores[g.key] = scores[g.key].reshape(g.interleave, per).mean(0)
        folded_widths[g.key] = original_widths.get(g.key, g.width) // g.interleave
    by_key = {g.key: g for g in groups}
    unit_costs = None if costs is None else {
        k: v * by_key[k].interleave for k, v in costs.items() if k in by_key}
    chosen = select_channels(folded, folded_scores, count, limits, folded_widths, allocation,
                             unit_costs, round_to)
    by_key = {g.key: g for g in groups}
    return {key: sorted(i + j * (by_key[key].width // by_key[key].interleave)
                        for i in idxs for j in range(by_key[key].interleave))
            for key, idxs in chosen.items()}


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


def channel_groups(model: nn.Module, model_name: str, input_shape: tuple[int, int, int]):
    """(dependency graph, prunable channel groups) of a model, traced on its device."""
    spec = get_spec(model_name, input_shape)
    return trace_groups(model, spec, input_shape, next(model.parameters()).device)


def trace_groups(model: nn.Module, spec, input_shape, device):
    """(dependency graph, prunable channel groups) of a model with its ModelSpec, traced on
    `device` with one zero input."""
    example = torch.zeros(1, *input_shape, device=device)
    graph = build_graph(model, example)
    return graph, find_groups(model, graph, spec.classifier(model), spec.stage_of)
