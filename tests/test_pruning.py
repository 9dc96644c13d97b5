"""Every registered model: BAM inserted, channels physically removed, FLOPs measured two ways."""

import io
import statistics

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ccpcsa.attention import BAM, bam_modules, has_bam, strip_bam
from ccpcsa.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from ccpcsa.flops import count_flops, count_params
from ccpcsa.models import MODELS, ModelError, build_model, get_spec
from ccpcsa.prune import (
    ALLOCATIONS,
    PruneError,
    PruneLimits,
    build_graph,
    channel_macs,
    find_groups,
    group_widths,
    remove_channels,
    select_channels,
)

SHAPE = (3, 32, 32)


def groups_of(model, name):
    spec = get_spec(name)
    graph = build_graph(model, torch.zeros(1, *SHAPE))
    return graph, find_groups(model, graph, spec.classifier(model), spec.stage_of)


def prune_random(model, name, fraction, seed=0):
    graph, groups = groups_of(model, name)
    gen = torch.Generator().manual_seed(seed)
    scores = {g.key: torch.rand(g.width, generator=gen) for g in groups}
    count = int(fraction * sum(g.width for g in groups))
    chosen = select_channels(groups, scores, count, PruneLimits(), group_widths(groups))
    return remove_channels(graph, groups, chosen)


def independent_macs(model):
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *SHAPE))
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("name", list(MODELS))
def test_prune_every_model(name, tmp_path):
    model = build_model(name, 10, with_bam=True)
    assert len(bam_modules(model)) == len(get_spec(name).bam_placements)
    flops0, params0 = count_flops(model, SHAPE), count_params(model)
    assert flops0 == pytest.approx(independent_macs(model), rel=0.01)
    previous = flops0
    for step, fraction in enumerate((0.2, 0.3)):
        removed = prune_random(model, name, fraction, seed=step)
        assert removed > 0
        out = model.eval()(torch.randn(2, *SHAPE))
        assert out.shape == (2, 10)
        flops = count_flops(model, SHAPE)
        assert flops < previous
        assert flops == pytest.approx(independent_macs(model), rel=0.01)
        previous = flops
    assert count_params(model) < params0
    # the pruned architecture survives a weights_only round trip through the checkpoint format
    path = str(tmp_path / "m.pt")
    save_checkpoint(model, CheckpointInfo(name, 10, True, SHAPE), path)
    rebuilt = load_checkpoint(path)
    x = torch.randn(2, *SHAPE)
    torch.testing.assert_close(rebuilt(x), model.eval()(x))
    assert count_flops(rebuilt, SHAPE) == previous


def test_resnet50_residual_groups_shrink_through_bam_and_train():
    model = build_model("resnet50", 10, with_bam=True)
    before = [model.layer1.stage[-1].bn3.num_features, model.layer2.stage[-1].bn3.num_features,
              model.layer3.stage[-1].bn3.num_features]
    prune_random(model, "resnet50", 0.4)
    after = [model.layer1.stage[-1].bn3.num_features, model.layer2.stage[-1].bn3.num_features,
             model.layer3.stage[-1].bn3.num_features]
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)
    # BAM's interfaces followed the residual stream it sits on
    for (_, bam), width in zip(bam_modules(model), after, strict=True):
        assert bam.channels == width == bam.spatial_gate.reduce.in_channels
        assert bam.channel_gate.fc2.out_features == width
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, *SHAPE), torch.randint(0, 10, (4,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert model(x).shape == (4, 10)


def test_caps_and_floor_are_respected():
    model = build_model("resnet20", 10, with_bam=True)
    _, groups = groups_of(model, "resnet20")
    original = group_widths(groups)
    limits = PruneLimits(max_ratio=0.5, stage_caps={"layer3": 0.25}, min_channels=12)
    scores = {g.key: torch.rand(g.width) for g in groups}
    chosen = select_channels(groups, scores, 10_000, limits, original)
    for g in groups:
        left = g.width - len(chosen.get(g.key, []))
        assert left >= 12 or left == g.width
        assert left >= original[g.key] * (1 - limits.cap_for(g)) - 1e-9
    assert any(g.stage == "layer3" and len(chosen.get(g.key, [])) == 16 for g in groups)


def test_selection_takes_the_globally_lowest():
    model = build_model("resnet20", 10, with_bam=True)
    _, groups = groups_of(model, "resnet20")
    scores = {g.key: torch.ones(g.width) for g in groups}
    target = groups[3]
    scores[target.key][[2, 5]] = 0.01
    chosen = select_channels(groups, scores, 2, PruneLimits(), group_widths(groups), "global")
    assert chosen == {target.key: [2, 5]}


@pytest.mark.parametrize("limits", [PruneLimits(max_ratio=1.0), PruneLimits(max_ratio=-0.1),
                                    PruneLimits(stage_caps={"layer1": 1.5}),
                                    PruneLimits(min_channels=0)])
def test_bad_limits(limits):
    with pytest.raises(PruneError, match="cap|min_channels"):
        limits.validate()


def test_unknown_model_lists_choices():
    with pytest.raises(ModelError, match="resnet20"):
        build_model("resnet21", 10)


def test_strip_bam_restores_plain_model():
    model = build_model("resnet18", 10, with_bam=True)
    assert has_bam(model)
    strip_bam(model)
    assert not has_bam(model)
    plain = build_model("resnet18", 10)
    assert count_params(model) == count_params(plain)
    assert not any(isinstance(m, BAM) for m in model.modules())


def test_checkpoint_is_weights_only_data(tmp_path):
    model = build_model("mobilenet_v2", 5, with_bam=True)
    prune_random(model, "mobilenet_v2", 0.3)
    path = tmp_path / "c.pt"
    save_checkpoint(model, CheckpointInfo("mobilenet_v2", 5, True, SHAPE, "digits",
                                          {"accuracy": 1.0}), str(path))
    payload = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
    assert payload["model"] == "mobilenet_v2" and payload["input_shape"] == list(SHAPE)
    assert load_checkpoint(str(path))(torch.randn(1, *SHAPE)).shape == (1, 5)


def prune_rounds(model, name, rounds, m, limits, allocation="uniform", seed=0):
    """`rounds` rounds of selection + surgery on random scores; the original widths."""
    original = group_widths(groups_of(model, name)[1])
    gen = torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        graph, groups = groups_of(model, name)
        scores = {g.key: torch.rand(g.width, generator=gen) for g in groups}
        chosen = select_channels(groups, scores, m, limits, original, allocation)
        assert sum(len(v) for v in chosen.values()) == m
        remove_channels(graph, groups, chosen)
    return original, group_widths(groups_of(model, name)[1])


def test_uniform_allocation_keeps_the_same_ratio_in_every_layer():
    model = build_model("resnet20", 10, with_bam=True)
    original, widths = prune_rounds(model, "resnet20", 3, 29, PruneLimits())
    removed = sum(original.values()) - sum(widths.values())
    assert removed == 3 * 29
    fraction = removed / sum(original.values())
    for key, width in original.items():
        # cumulative targets: each group within one channel of the common fraction
        assert abs((width - widths[key]) - fraction * width) <= 1.0, (key, width, widths[key])


def test_uniform_allocation_walks_towards_the_caps():
    model = build_model("resnet20", 10, with_bam=True)
    limits = PruneLimits(max_ratio=0.8, stage_caps={"layer1": 0.4}, residual_cap=0.2,
                         min_channels=1)
    _, groups = groups_of(model, "resnet20")
    residual = {g.key for g in groups if g.is_residual}
    assert len(residual) == 3  # one stream per stage of the CIFAR ResNet
    stage = {g.key: g.stage for g in groups}
    original, widths = prune_rounds(model, "resnet20", 2, 60, limits)
    ratios = {k: (original[k] - widths[k]) / original[k] for k in original}
    inner2 = [r for k, r in ratios.items() if stage[k] == "layer2" and k not in residual]
    inner1 = [r for k, r in ratios.items() if stage[k] == "layer1" and k not in residual]
    t = statistics.fmean(inner2) / 0.8  # progress towards the caps
    assert 0.3 < t < 1.0
    for k, r in ratios.items():
        cap = 0.2 if k in residual else 0.4 if stage[k] == "layer1" else 0.8
        assert abs(r - t * cap) <= 1.0 / original[k] + 1e-9, (k, r, t * cap)
    assert statistics.fmean(inner1) < statistics.fmean(inner2)


def test_uniform_allocation_removes_the_lowest_scores_within_a_group():
    model = build_model("resnet20", 10, with_bam=True)
    _, groups = groups_of(model, "resnet20")
    scores = {g.key: torch.arange(g.width, 0, -1, dtype=torch.float) for g in groups}
    chosen = select_channels(groups, scores, 48, PruneLimits(), group_widths(groups))
    for g in groups:
        picked = chosen.get(g.key, [])
        assert picked == list(range(g.width - len(picked), g.width))  # the last = lowest


def test_channel_macs_is_what_removing_one_channel_saves():
    model = build_model("resnet20", 10, with_bam=True)
    _, groups = groups_of(model, "resnet20")
    costs = channel_macs(model, groups, SHAPE)
    before = count_flops(model, SHAPE)
    for g in groups[:4] + groups[-1:]:  # the residual streams (through BAM) and inner layers
        copy = build_model("resnet20", 10, with_bam=True)
        copy.load_state_dict(model.state_dict())
        graph, copied = groups_of(copy, "resnet20")
        remove_channels(graph, copied, {g.key: [0]})
        assert costs[g.key] == pytest.approx(before - count_flops(copy, SHAPE)), g.key


def test_flops_allocation_removes_the_costliest_channels_first():
    model = build_model("resnet20", 10, with_bam=True)
    _, groups = groups_of(model, "resnet20")
    costs = channel_macs(model, groups, SHAPE)
    scores = {g.key: torch.ones(g.width) for g in groups}
    chosen = select_channels(groups, scores, 3, PruneLimits(), group_widths(groups), "flops",
                             costs)
    assert list(chosen) == [max(costs, key=costs.get)]
    with pytest.raises(PruneError, match="channel cost"):
        select_channels(groups, scores, 3, PruneLimits(), group_widths(groups), "flops")
    with pytest.raises(PruneError, match="unknown allocation"):
        select_channels(groups, scores, 3, PruneLimits(), group_widths(groups), "magic")


@pytest.mark.parametrize("allocation, round_to", [*((a, 8) for a in ALLOCATIONS),
                                                  ("uniform", 5), ("global", 5)])
def test_pruned_widths_are_multiples_of_round_to(allocation, round_to):
    """Round after round until nothing is prunable: every width a group was pruned to is a
    multiple of round_to, never below its cap or floor; each round removes at least m channels
    (while the limits allow) and less than one step more. resnet20's widths are 16/32/64: with
    5, the first step of a group is its width modulo 5; layer1's cap (0.4: keep >= 10 of 16)
    rounds up to 16 with 8, so layer1 is never pruned then."""
    model = build_model("resnet20", 10, with_bam=True)
    limits = PruneLimits(max_ratio=0.8, stage_caps={"layer1": 0.4}, min_channels=5)
    _, groups = groups_of(model, "resnet20")
    original = group_widths(groups)
    floors = {g.key: limits.min_width(g, original[g.key]) for g in groups}
    gen = torch.Generator().manual_seed(round_to)
    m, rounds = 48, 0
    while True:
        graph, groups = groups_of(model, "resnet20")
        room = sum(max(0, g.width - -(-floors[g.key] // round_to) * round_to) for g in groups)
        scores = {g.key: torch.rand(g.width, generator=gen) for g in groups}
        costs = channel_macs(model, groups, SHAPE) if allocation == "flops" else None
        chosen = select_channels(groups, scores, m, limits, original, allocation, costs,
                                 round_to)
        if not chosen:
            assert room == 0
            break
        removed = remove_channels(graph, groups, chosen)
        rounds += 1
        assert m <= removed < m + round_to if room >= m else removed == room, (removed, room)
        widths = group_widths(groups_of(model, "resnet20")[1])
        for key, width in widths.items():
            assert width == original[key] or width % round_to == 0, (key, width)
            assert width >= floors[key], (key, width, floors[key])
    assert rounds >= 3
    pruned = {k for k, w in widths.items() if w != original[k]}
    layer1 = {g.key for g in groups if g.stage == "layer1"}
    assert pruned and (pruned.isdisjoint(layer1) if round_to == 8 else layer1 & pruned)
    x = torch.randn(2, *SHAPE)
    assert model(x).shape == (2, 10) and count_flops(model, SHAPE) == independent_macs(model)
    with pytest.raises(PruneError, match="round-to must be an integer >= 1, got 0"):
        select_channels(groups, scores, m, limits, original, allocation, costs, 0)
