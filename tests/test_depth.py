"""Depth: a FLOPs target (ccpcsa.depth, the loop, the search space), the criterion as a searched
parameter, knowledge distillation, and the final fine-tune of frontier points (ccpcsa.search.final)
with its resume. Real models, real pruning, real training on the embedded digits."""

from __future__ import annotations

import math

import optuna
import pandas as pd
import pytest
import torch

from ccpcsa.data import DataConfig
from ccpcsa.depth import (
    TargetError,
    flops_at_caps,
    per_round_for,
    ratio_for_target,
    rounds_to_reach,
)
from ccpcsa.loop import LoopConfig, PrepareConfig, prepare, prune_loop
from ccpcsa.prune import PruneLimits
from ccpcsa.runners import make_runner
from ccpcsa.search.config import ConfigError, SearchConfig, config_from_dict
from ccpcsa.search.space import (
    IMPORTANCE_PARAM,
    M_PARAM,
    build_space,
    cap_bounds,
    decode,
    describe_model,
    m_bounds,
    trial_rounds,
    with_target,
)
from ccpcsa.train import TrainConfig, distillation_loss

SHAPE = (3, 8, 8)  # digits at 8 px (replicated to 3 channels): small and quick


@pytest.fixture(scope="module")
def plan():
    return ratio_for_target("resnet20", 10, SHAPE, 0.5)


def test_ratio_for_target_is_the_smallest_equal_cap_that_reaches_it(plan):
    assert plan.flops_at_ratio <= 0.5 * plan.baseline_flops
    assert 0 < plan.ratio < 0.95 and 0 < plan.channels < plan.total_channels
    # a clearly smaller cap everywhere does not reach the target
    flops, _, _ = flops_at_caps("resnet20", 10, SHAPE, PruneLimits(plan.ratio - 0.05))
    assert flops > 0.5 * plan.baseline_flops


def test_unreachable_target_is_refused_naming_it():
    with pytest.raises(TargetError, match="target_flops 0.01 cannot be reached"):
        ratio_for_target("resnet20", 10, SHAPE, 0.01, min_channels=8, max_ratio=0.5)
    with pytest.raises(TargetError, match="in \\(0, 1\\)"):
        ratio_for_target("resnet20", 10, SHAPE, 1.5)


def test_search_space_with_a_target_reaches_it_from_every_schedule(plan):
    cfg = SearchConfig(dataset="digits", image_size=8, target_flops=0.5, max_rounds=4)
    layout = with_target(describe_model("resnet20", 10, SHAPE), plan)
    low, high = cap_bounds(cfg, layout)
    assert low == pytest.approx(plan.ratio) and high == pytest.approx(0.9)
    m_low, m_high = m_bounds(cfg, layout)
    assert m_low == math.ceil(plan.channels / 4) and m_high > m_low
    space = build_space(cfg, layout)
    assert space[M_PARAM].low == m_low
    assert all(d.low >= plan.ratio for k, d in space.items() if k.startswith("cap_"))
    # the rounds a trial gets exhaust its caps at its pace
    assert trial_rounds(cfg, layout, m_low) == rounds_to_reach(layout.total_channels, 0.9,
                                                               m_low)
    # the lowest caps everywhere, pruned to the end, are at the target
    caps = {name: plan.ratio for name in layout.inner_stages}
    flops, _, _ = flops_at_caps("resnet20", 10, SHAPE,
                                PruneLimits(0.9, caps, {}, 4, plan.ratio))
    assert flops <= 0.5 * plan.baseline_flops


def test_loop_goes_past_the_tolerance_down_to_the_target(tmp_path, plan):
    data = DataConfig("digits", image_size=8, train_subset=256)
    runner = make_runner(data, TrainConfig(batch_size=32, seed=0), 1, str(tmp_path))
    prepared = prepare(PrepareConfig("resnet20", 10, SHAPE, baseline_epochs=1,
                                     attention_epochs=0, batch_size=32, train_subset=256),
                       runner, str(tmp_path / "stage0"))
    target = int(0.5 * prepared.baseline_flops)
    cfg = LoopConfig(groups_per_round=per_round_for(plan, 3), tolerance=0.0, max_rounds=20,
                     finetune_epochs=0, calibration_batches=1, bn_batches=1,
                     target_flops=target)
    # reference far above: every round is past the tolerance, and the loop still goes on
    result = prune_loop(prepared.load_attention_model(), "resnet20", SHAPE, 100.0, runner, cfg)
    assert result.stop_reason == "target"
    assert result.records[-1].flops <= target < result.records[-2].flops
    assert len(result.records) >= 3 and not any(r.within_tolerance for r in result.records)
    assert result.final_round == 0  # the model returned is still the last within tolerance


def test_distillation_loss_mixes_cross_entropy_and_softened_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(16, 10, requires_grad=True), torch.randn(16, 10)
    labels = torch.randint(0, 10, (16,))
    ce = torch.nn.functional.cross_entropy(student, labels)
    assert float(distillation_loss(student, teacher, labels, 0.0, 4.0)) == pytest.approx(
        float(ce))
    # the soft term alone: T^2 x KL(teacher || student) at temperature T, zero for a copy
    soft = distillation_loss(student, teacher, labels, 1.0, 2.0)
    p_t = torch.softmax(teacher / 2.0, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student / 2.0, 1))).sum(1).mean() * 4.0
    assert float(soft) == pytest.approx(float(kl), rel=1e-5)
    assert float(distillation_loss(teacher, teacher, labels, 1.0, 3.0)) == pytest.approx(
        0.0, abs=1e-6)
    mixed = distillation_loss(student, teacher, labels, 0.3, 2.0)
    assert float(mixed) == pytest.approx(0.7 * float(ce) + 0.3 * float(soft), rel=1e-5)
    mixed.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_bad_distillation_settings_are_refused():
    with pytest.raises(ValueError, match="distillation weight"):
        TrainConfig(distill_weight=1.5).validate()
    with pytest.raises(ConfigError, match="distill needs final_epochs"):
        config_from_dict({"distill": True})
    with pytest.raises(ConfigError, match="distill_temperature"):
        config_from_dict({"distill_temperature": 0})


def test_importance_list_is_a_categorical_parameter():
    cfg = config_from_dict({"importance": "l1, ccpcsa,taylor", "image_size": 8})
    assert cfg.importances == ("l1", "ccpcsa", "taylor")
    layout = describe_model("resnet20", 10, SHAPE)
    space = build_space(cfg, layout)
    dist = space[IMPORTANCE_PARAM]
    assert isinstance(dist, optuna.distributions.CategoricalDistribution)
    assert tuple(dist.choices) == ("l1", "ccpcsa", "taylor")
    params = {name: d.low if hasattr(d, "low") else "taylor" for name, d in space.items()}
    assert decode(params, cfg, layout).importance == "taylor"
    one = config_from_dict({"importance": "ccpcsa"})
    assert IMPORTANCE_PARAM not in build_space(one, layout)
    assert decode({M_PARAM: 3}, one, layout).importance == "ccpcsa"
    with pytest.raises(ConfigError, match="unknown importance 'nope'"):
        config_from_dict({"importance": "l1,nope"})
    with pytest.raises(ConfigError, match="twice"):
        config_from_dict({"importance": "l1,l1"})


def test_frontier_table_names_the_criterion_and_the_tolerance():
    from ccpcsa.search.pareto import format_table, mark_frontier

    points = pd.DataFrame([
        {"trial_id": "a", "round": 1, "accuracy": 99.0, "flops": 80, "params": 8,
         "importance": "l1", "within_tolerance": True},
        {"trial_id": "b", "round": 3, "accuracy": 97.0, "flops": 40, "params": 4,
         "importance": "ccpcsa", "within_tolerance": False}])
    table = format_table(mark_frontier(points, {"accuracy": 99.0, "flops": 100, "params": 10}),
                         {"accuracy": 99.0, "flops": 100, "params": 10})
    header, _, first, second = table.splitlines()
    assert "criterion" in header and "tolerance" in header
    assert "ccpcsa" in first and "past" in first and "60.0" in first
    assert "l1" in second and "within" in second


def test_prune_refuses_a_target_its_caps_cannot_reach(tmp_path, capsys):
    from ccpcsa.__main__ import main

    code = main(["prune", "--dataset", "digits", "--image-size", "8", "--out",
                 str(tmp_path / "out"), "--target-flops", "0.2", "--max-ratio", "0.3"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--target-flops 0.2 cannot be reached" in err and "--max-ratio" in err
    assert main(["prune", "--dataset", "digits", "--out", str(tmp_path / "o2"),
                 "--distill"]) == 2
    assert "distill needs final_epochs >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_train_workers_distil_from_the_teacher(tmp_path):
    """Distillation where Ray Train workers fine-tune: with weight 1 the loss is the softened
    KL to the teacher alone, far below the ~2.3 cross-entropy of an untrained model; without
    a teacher it is that cross-entropy."""
    import ray

    from ccpcsa.checkpoint import CheckpointInfo, save_checkpoint
    from ccpcsa.distributed import RayRunner
    from ccpcsa.models import build_model

    teacher = build_model("resnet20", 10, with_bam=False, input_shape=SHAPE)
    path = str(tmp_path / "teacher.pt")
    save_checkpoint(teacher, CheckpointInfo("resnet20", 10, False, SHAPE, "digits"), path)
    data = DataConfig("digits", image_size=8)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        losses = {}
        for name, cfg in (("kd", TrainConfig(batch_size=32, teacher=path, distill_weight=1.0)),
                          ("ce", TrainConfig(batch_size=32))):
            with RayRunner(data, cfg, 2, str(tmp_path / name)) as runner:
                runner.fit(build_model("resnet20", 10, with_bam=True, input_shape=SHAPE), 1,
                           0.01, label=name)
                losses[name] = runner.last_metrics["loss"]
    finally:
        ray.shutdown()
    assert losses["kd"] < 0.5 and losses["ce"] > 1.0, losses
