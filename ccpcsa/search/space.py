"""The search space: m (channels removed per round) and pruning ratios per stage (default, with
one more for the residual streams) or per layer, optionally the fine-tune lr and epochs.
Ranges scale with the model.

With a FLOPs target (--target-flops) every trial can reach it: the caps are searched from the
smallest all-equal ratio that reaches the target (ccpcsa.depth.ratio_for_target) upwards, m
from the channels that ratio removes spread over --max-rounds, and each trial gets as many
rounds as its m needs to exhaust its caps (trial_rounds).

Under the default `uniform` allocation the ratios ("caps") are the shape of the pruning: every
round moves every group the same part of the way to its ratio, and the criterion only ranks
channels within a group. So Optuna searches the per-stage / per-layer pruning ratios and m
sets the pace at which the loop walks towards them."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import optuna
import torch

from ccpcsa.depth import DepthPlan, rounds_to_reach
from ccpcsa.models import build_model, get_spec
from ccpcsa.prune import build_graph, find_groups
from ccpcsa.search.config import SearchConfig

M_PARAM = "groups_per_round"
RESIDUAL_PARAM = "cap_residual"
LR_PARAM = "finetune_lr"
EPOCHS_PARAM = "finetune_epochs"
IMPORTANCE_PARAM = "importance"  # searched when --importance lists several criteria


@dataclass(frozen=True)
class ModelLayout:
    """What the space needs to know about the model: its prunable groups and their stages."""

    total_channels: int
    stages: tuple[str, ...]
    layers: tuple[str, ...]
    widths: dict[str, int]  # original width of each group, which ratio caps refer to
    residual: tuple[str, ...] = ()  # groups that are residual streams
    inner_stages: tuple[str, ...] = ()  # stages with at least one group that is not one
    # with --target-flops (with_target): the smallest all-equal cap that reaches it and the
    # channels it removes; 0 = no target
    target_ratio: float = 0.0
    target_channels: int = 0


def describe_model(model_name: str, num_classes: int, input_shape: tuple[int, ...]
                   ) -> ModelLayout:
    spec = get_spec(model_name, input_shape)
    model = build_model(model_name, num_classes, with_bam=True, input_shape=input_shape)
    graph = build_graph(model, torch.zeros(1, *input_shape))
    groups = find_groups(model, graph, spec.classifier(model), spec.stage_of)
    stages = tuple(s for s in spec.stages if any(g.stage == s for g in groups))
    stages += tuple(sorted({g.stage for g in groups} - set(stages)))
    inner = tuple(s for s in stages if any(g.stage == s and not g.is_residual for g in groups))
    return ModelLayout(sum(g.width for g in groups), stages,
                       tuple(sorted(g.key for g in groups)), {g.key: g.width for g in groups},
                       tuple(sorted(g.key for g in groups if g.is_residual)), inner)


def with_target(layout: ModelLayout, plan: DepthPlan) -> ModelLayout:
    return replace(layout, target_ratio=plan.ratio, target_channels=plan.channels)


def cap_bounds(cfg: SearchConfig, layout: ModelLayout) -> tuple[float, float]:
    """The range every ratio cap is searched in: --cap-range, raised to the target's ratio."""
    low, high = (float(v) for v in cfg.cap_range)
    return max(low, layout.target_ratio), max(high, layout.target_ratio)


def m_bounds(cfg: SearchConfig, layout: ModelLayout) -> tuple[int, int]:
    """--m-range; else, with a target, from the channels it takes over --max-rounds to twice
    that pace; else 0.5 %-4 % of the prunable channels."""
    if cfg.m_range:
        return int(cfg.m_range[0]), int(cfg.m_range[1])
    if layout.target_channels:
        low = max(1, math.ceil(layout.target_channels / cfg.max_rounds))
        return low, max(low + 1, math.ceil(2 * layout.target_channels / cfg.max_rounds))
    low, high = default_m_range(layout.total_channels)
    return low, high


def trial_rounds(cfg: SearchConfig, layout: ModelLayout, groups_per_round: int) -> int:
    """A trial's rounds: --max-rounds, or with a target as many as its m needs to prune every
    group to the highest cap it may have (the loop stops at the target before that)."""
    if not layout.target_channels:
        return cfg.max_rounds
    return max(cfg.max_rounds, rounds_to_reach(layout.total_channels,
                                               cap_bounds(cfg, layout)[1], groups_per_round))


def search_rounds(cfg: SearchConfig, layout: ModelLayout) -> int:
    """The most rounds any trial of the search may run (what early stopping counts to)."""
    return trial_rounds(cfg, layout, m_bounds(cfg, layout)[0])


def searched_caps(cfg: SearchConfig, layout: ModelLayout) -> tuple[str, ...]:
    """The names that get a ratio parameter: every group (per layer), else every stage, or
    with a residual cap every stage that has groups besides its residual stream."""
    if cfg.per_layer:
        return layout.layers
    return layout.inner_stages if _residual_param(cfg, layout) else layout.stages


def _residual_param(cfg: SearchConfig, layout: ModelLayout) -> bool:
    return cfg.search_residual_cap and not cfg.per_layer and bool(layout.residual)


def default_m_range(total_channels: int) -> list[int]:
    """From 0.5 % to 4 % of the prunable channels per round."""
    low = max(1, round(0.005 * total_channels))
    return [low, max(low + 1, round(0.04 * total_channels))]


def cap_param(name: str) -> str:
    return "cap_" + name.replace(".", "_")


def build_space(cfg: SearchConfig, layout: ModelLayout) -> dict[str, Any]:
    m_low, m_high = m_bounds(cfg, layout)
    space: dict[str, Any] = {
        M_PARAM: optuna.distributions.IntDistribution(int(m_low), int(m_high),
                                                      log=m_high >= 8 * m_low),
    }
    cap_low, cap_high = cap_bounds(cfg, layout)
    for name in searched_caps(cfg, layout):
        space[cap_param(name)] = optuna.distributions.FloatDistribution(cap_low, cap_high)
    if _residual_param(cfg, layout):
        space[RESIDUAL_PARAM] = optuna.distributions.FloatDistribution(cap_low, cap_high)
    if len(cfg.importances) > 1:
        space[IMPORTANCE_PARAM] = optuna.distributions.CategoricalDistribution(cfg.importances)
    if cfg.search_finetune:
        lr_low, lr_high = cfg.lr_range
        space[LR_PARAM] = optuna.distributions.FloatDistribution(lr_low, lr_high, log=True)
        space[EPOCHS_PARAM] = optuna.distributions.IntDistribution(*map(int, cfg.epochs_range))
    return space


@dataclass(frozen=True)
class Schedule:
    """One trial's pruning schedule, decoded from its parameters."""

    groups_per_round: int
    stage_caps: dict[str, float]
    layer_caps: dict[str, float]
    finetune_lr: float
    finetune_epochs: int
    residual_cap: float | None = None
    importance: str = ""  # the channel criterion


def decode(params: dict[str, Any], cfg: SearchConfig, layout: ModelLayout) -> Schedule:
    names = searched_caps(cfg, layout)
    caps = {name: float(params[cap_param(name)]) for name in names if cap_param(name) in params}
    residual = params.get(RESIDUAL_PARAM) if _residual_param(cfg, layout) else None
    return Schedule(
        groups_per_round=int(params[M_PARAM]),
        stage_caps={} if cfg.per_layer else caps,
        layer_caps=caps if cfg.per_layer else {},
        finetune_lr=float(params.get(LR_PARAM, cfg.finetune_lr)),
        finetune_epochs=int(params.get(EPOCHS_PARAM, cfg.epochs)),
        residual_cap=None if residual is None else float(residual),
        importance=str(params.get(IMPORTANCE_PARAM, cfg.importances[0])),
    )


def uniform_params(cfg: SearchConfig, layout: ModelLayout, m: int, cap: float
                   ) -> dict[str, Any]:
    """The paper's kind of schedule: one m, the same cap everywhere."""
    params = {M_PARAM: m, **{cap_param(name): cap for name in searched_caps(cfg, layout)}}
    if _residual_param(cfg, layout):
        params[RESIDUAL_PARAM] = cap
    if len(cfg.importances) > 1:
        params[IMPORTANCE_PARAM] = cfg.importances[0]
    return params
