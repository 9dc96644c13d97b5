"""A FLOPs target (--target-flops): what pruning it takes to keep only a fraction of the
baseline's FLOPs, measured by pruning a fresh copy of the model physically, not estimated.

ratio_for_target() finds the smallest ratio that, given to every channel group as its cap,
prunes the model (with BAM, the floor and --round-to applied) to at most the target. Any
schedule whose caps are all at least that ratio can reach the target: under the uniform
allocation every group walks towards its own cap, so the model at the end of the walk has at
most the FLOPs of the all-equal one. rounds_to_reach() is how many rounds of m channels
exhaust the caps, so such a schedule gets there within its rounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ccpcsa.flops import count_flops
from ccpcsa.models import build_model
from ccpcsa.prune import PruneLimits
from ccpcsa.pruner import Pruner

ALL_CHANNELS = 10**12  # a round "count" that takes everything the caps allow


class TargetError(ValueError):
    pass


@dataclass(frozen=True)
class DepthPlan:
    """What a FLOPs target asks of the model."""

    target: float  # fraction of the baseline's FLOPs to keep
    baseline_flops: int  # the model without BAM, unpruned
    ratio: float  # smallest cap, the same for every group, that reaches the target
    channels: int  # channels that uniform pruning at `ratio` removes
    total_channels: int  # prunable channels of the unpruned model
    flops_at_ratio: int  # FLOPs (with BAM) after pruning every group to `ratio`

    @property
    def target_flops(self) -> int:
        return int(self.target * self.baseline_flops)


def check_target(target: float, name: str = "target_flops") -> None:
    if isinstance(target, bool) or not isinstance(target, int | float) or not (
            math.isfinite(target) and 0.0 < target < 1.0):
        raise TargetError(f"{name} must be a fraction of the baseline's FLOPs to keep, in "
                          f"(0, 1) (e.g. 0.33 for -67 %), got {target!r}")


def unpruned_flops(model_name: str, num_classes: int, input_shape: tuple[int, int, int]) -> int:
    model = build_model(model_name, num_classes, with_bam=False, input_shape=input_shape)
    return count_flops(model, input_shape)


def flops_at_caps(model_name: str, num_classes: int, input_shape: tuple[int, int, int],
                  limits: PruneLimits, round_to: int = 1) -> tuple[int, int, int]:
    """(FLOPs, channels removed, prunable channels) of the model with BAM once every group is
    pruned as far as `limits` allow."""
    model = build_model(model_name, num_classes, with_bam=True, input_shape=input_shape).eval()
    pruner = Pruner(model, model_name, input_shape, limits=limits, round_to=round_to)
    total = sum(pruner.widths().values())
    zeros = {g.key: torch.zeros(g.width) for g in pruner.groups}
    removed = pruner.step(zeros, ALL_CHANNELS).removed
    return pruner.flops(), removed, total


def ratio_for_target(model_name: str, num_classes: int, input_shape: tuple[int, int, int],
                     target: float, min_channels: int = 4, round_to: int = 1,
                     max_ratio: float = 0.95, steps: int = 10) -> DepthPlan:
    """The smallest all-equal cap (to 1/2**steps of max_ratio) that prunes the model to at
    most `target` x the baseline's FLOPs; TargetError when even max_ratio does not."""
    check_target(target)
    baseline = unpruned_flops(model_name, num_classes, input_shape)
    goal = target * baseline

    def at(ratio: float) -> tuple[int, int, int]:
        return flops_at_caps(model_name, num_classes, input_shape,
                             PruneLimits(ratio, min_channels=min_channels), round_to)

    flops, removed, total = at(max_ratio)
    if flops > goal:
        raise TargetError(
            f"target_flops {target} cannot be reached: pruning {model_name} to a ratio of "
            f"{max_ratio} everywhere (floor {min_channels} channels) keeps "
            f"{flops / baseline:.3f} of its FLOPs; ask for a larger fraction or a higher cap")
    low, high, best = 0.0, max_ratio, (flops, removed)
    for _ in range(steps):
        mid = (low + high) / 2
        flops_mid, removed_mid, _ = at(mid)
        if flops_mid <= goal:
            high, best = mid, (flops_mid, removed_mid)
        else:
            low = mid
    return DepthPlan(target, baseline, high, best[1], total, best[0])


def rounds_to_reach(total_channels: int, max_cap: float, per_round: int) -> int:
    """Rounds of `per_round` channels that remove every channel caps of at most `max_cap`
    allow (each round removes at least per_round while any is left), plus one."""
    return math.ceil(total_channels * max_cap / max(per_round, 1)) + 1


def per_round_for(plan: DepthPlan, rounds: int) -> int:
    """m that reaches the target's channels in about `rounds` rounds."""
    return max(1, math.ceil(plan.channels / max(rounds, 1)))
