"""The public pruning step: a Pruner owns one model's dependency graph and channel groups and
runs trace -> score -> select -> remove on them.

The graph is traced once per round: on first use, and again only after a removal changed the
model (or another model object is handed over). The widths after a removal are read from the
pruned layers themselves, so recording them needs no second trace.

    pruner = Pruner(model, "resnet20", (3, 32, 32), limits=PruneLimits(0.7))
    step = pruner.step(importance_scorer("l1"), count=16)  # one round
    pruner.prune_to(pruner.flops() // 2, importance_scorer("l1"), count=16)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from ccpcsa.flops import count_flops, count_params
from ccpcsa.importance import compute_scores
from ccpcsa.models import ModelSpec, get_spec
from ccpcsa.prune import (
    ChannelGroup,
    PruneError,
    PruneLimits,
    channel_macs,
    group_widths,
    remove_channels,
    select_channels,
    trace_groups,
)

Scores = Mapping[str, torch.Tensor]  # {group key: one score per channel of its width}
# Scores the groups of a model, e.g. importance_scorer(kind) or a runner's score()
Scorer = Callable[[nn.Module, list[ChannelGroup]], Scores]


def importance_scorer(kind: str, batches: Iterable = (), seed: int = 0) -> Scorer:
    """A Scorer computing importance.compute_scores(kind) on `batches` (see there)."""
    return lambda model, groups: compute_scores(kind, model, groups, batches, seed=seed)


@dataclass(frozen=True)
class Step:
    """What one pruning step did."""

    removed: int  # channels removed (0: every group is at its cap or floor)
    chosen: dict[str, list[int]]  # {group key: channel indices removed}, as the groups were
    widths: dict[str, int]  # every group's width after the step
    seconds_trace: float  # tracing the graph for this step (0 when it was already traced)
    seconds_score: float
    seconds_remove: float  # selection and removal


class Pruner:
    """One model's pruning state: its dependency graph, channel groups, the limits and
    allocation policy of select_channels, and the original widths the caps refer to. The
    model is pruned in place; a trace leaves it in eval mode (Torch-Pruning's tracer)."""

    def __init__(self, model: nn.Module, spec: ModelSpec | str, input_shape: tuple[int, ...],
                 *, limits: PruneLimits | None = None, allocation: str = "uniform",
                 round_to: int = 1, original_widths: Mapping[str, int] | None = None) -> None:
        self._model = model
        self.spec = get_spec(spec, input_shape) if isinstance(spec, str) else spec
        self.input_shape = tuple(input_shape)
        self.limits = limits or PruneLimits()
        self.allocation = allocation
        self.round_to = round_to
        self._original = dict(original_widths) if original_widths is not None else None
        self._graph: tp.DependencyGraph | None = None
        self._groups: list[ChannelGroup] = []
        self._widths: dict[str, int] | None = None
        self._costs: dict[str, float] | None = None

    # ------------------------------------------------------------------ state

    @property
    def model(self) -> nn.Module:
        return self._model

    @model.setter
    def model(self, model: nn.Module) -> None:
        """Hand over the model to prune next (e.g. what a runner's fit returned); another
        object than the current one is traced again on next use."""
        if model is not self._model:
            self._model = model
            self._graph, self._widths, self._costs = None, None, None

    @property
    def graph(self) -> tp.DependencyGraph:
        self._trace()
        assert self._graph is not None
        return self._graph

    @property
    def groups(self) -> list[ChannelGroup]:
        """The prunable channel groups of the model as it is now (traced if need be)."""
        self._trace()
        return self._groups

    @property
    def original_widths(self) -> dict[str, int]:
        """The widths the ratio caps refer to: given, else those of the first trace."""
        if self._original is None:
            self._trace()
        assert self._original is not None
        return self._original

    def widths(self) -> dict[str, int]:
        """Every group's width now (no trace after a removal: read from the pruned layers)."""
        if self._widths is None:
            self._trace()
        assert self._widths is not None
        return dict(self._widths)

    def flops(self) -> int:
        """MACs of one sample (flops.count_flops)."""
        return count_flops(self._model, self.input_shape)

    def params(self) -> int:
        return count_params(self._model)

    def channel_costs(self) -> dict[str, float]:
        """MACs one channel of each group costs (prune.channel_macs), kept until a removal."""
        groups = self.groups
        if self._costs is None:
            self._costs = channel_macs(self._model, groups, self.input_shape)
        return self._costs

    # ------------------------------------------------------------------ pruning

    def select(self, scores: Scores, count: int) -> dict[str, list[int]]:
        """Which channels a step of `count` removes (prune.select_channels with this
        pruner's limits, allocation, round_to and original widths); nothing is removed."""
        costs = self.channel_costs() if self.allocation == "flops" else None
        return select_channels(self.groups, dict(scores), count, self.limits,
                               self.original_widths, self.allocation, costs, self.round_to)

    def remove(self, chosen: Mapping[str, list[int]]) -> int:
        """Physically remove `chosen` ({group key: channel indices}, as select returns);
        returns how many channels went. The groups are traced again on next use."""
        if not chosen:
            return 0
        removed = remove_channels(self.graph, self._groups, dict(chosen))
        # the graph still maps the (now narrower) layers: their widths need no new trace
        self._widths = {g.key: self._graph.get_out_channels(g.root) for g in self._groups}
        self._graph, self._costs = None, None
        return removed

    def step(self, scores: Scores | Scorer, count: int) -> Step:
        """One round: score the groups (a Scorer is called on the model and its groups),
        select `count` channels and remove them."""
        start = time.perf_counter()
        traced = self._graph is not None
        groups = self.groups
        seconds_trace = 0.0 if traced else time.perf_counter() - start
        if callable(scores):
            scores = scores(self._model, groups)
        scored = time.perf_counter()
        chosen = self.select(scores, count)
        removed = self.remove(chosen)
        return Step(removed, chosen, self.widths(), seconds_trace,
                    scored - start - seconds_trace, time.perf_counter() - scored)

    def prune_to(self, flops: float, scorer: Scorer, count: int,
                 max_steps: int | None = None) -> list[Step]:
        """Steps of `count` channels, each scored anew, until the model has at most `flops`
        MACs (none if it already has); PruneError when the limits stop it first (or after
        max_steps)."""
        steps: list[Step] = []
        while self.flops() > flops:
            if max_steps is not None and len(steps) >= max_steps:
                raise PruneError(f"{flops:.0f} FLOPs not reached in {max_steps} steps")
            step = self.step(scorer, count)
            if not step.removed:
                raise PruneError(f"cannot reach {flops:.0f} FLOPs: every group is at its cap "
                                 f"or floor ({self.flops()} FLOPs)")
            steps.append(step)
        return steps

    # ------------------------------------------------------------------ tracing

    def _trace(self) -> None:
        if self._graph is not None:
            return
        device = next(self._model.parameters()).device
        self._graph, self._groups = trace_groups(self._model, self.spec, self.input_shape,
                                                 device)
        self._widths = group_widths(self._groups)
        if self._original is None:
            self._original = dict(self._widths)


__all__ = ["Pruner", "Scorer", "Scores", "Step", "importance_scorer"]
