"""ccpcsa.pruner.Pruner: the same channels as the loop removed before it existed, the graph
traced once per round, prune_to down to a FLOPs target counted independently."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import ccpcsa
import ccpcsa.prune
from ccpcsa.flops import count_flops
from ccpcsa.importance import compute_scores
from ccpcsa.loop import LoopConfig, prune_loop
from ccpcsa.models import build_model
from ccpcsa.prune import PruneError, PruneLimits, channel_groups, group_widths
from ccpcsa.pruner import Pruner, importance_scorer

SHAPE = (3, 16, 16)

# What the loop's prune_step removed before the Pruner replaced it (commit 593bfa2), run on
# resnet20 with BAM (torch.manual_seed(0)), calibration_batches(), PruneLimits(0.6), rounds
# seeded 1, 2, 3: (criterion, allocation, round_to, m) -> (chosen per round, widths after).
EXPECTED = {
    ("ccpcsa", "flops", 1, 10): (
        [
            {"layer1.stage.2.conv1": [11], "layer2.stage.0.conv1": [2, 14],
             "layer2.stage.0.downsample.0": [4], "layer2.stage.1.conv1": [12],
             "layer3.0.conv1": [27, 56], "layer3.1.conv1": [58], "layer3.2.conv1": [38, 58]},
            {"layer1.stage.1.conv1": [5, 9, 12], "layer2.stage.0.conv1": [17],
             "layer2.stage.1.conv1": [15, 26], "layer2.stage.2.conv1": [12, 25],
             "layer3.0.conv1": [6], "layer3.1.conv1": [52]},
            {"layer1.stage.0.conv1": [4], "layer1.stage.1.conv1": [5], "layer1.stage.2.conv1": [4],
             "layer2.stage.0.conv1": [17], "layer2.stage.1.conv1": [15, 23],
             "layer2.stage.2.conv1": [0], "layer3.0.conv1": [11], "layer3.0.downsample.0": [26],
             "layer3.1.conv1": [42]},
        ],
        {"conv1": 16, "layer1.stage.0.conv1": 15, "layer1.stage.1.conv1": 12,
         "layer1.stage.2.conv1": 14, "layer2.stage.0.conv1": 28, "layer2.stage.0.downsample.0": 31,
         "layer2.stage.1.conv1": 27, "layer2.stage.2.conv1": 29, "layer3.0.conv1": 60,
         "layer3.0.downsample.0": 63, "layer3.1.conv1": 61, "layer3.2.conv1": 62},
    ),
    ("l1", "uniform", 1, 12): (
        [
            {"layer2.stage.0.conv1": [14], "layer2.stage.0.downsample.0": [18],
             "layer2.stage.1.conv1": [22], "layer2.stage.2.conv1": [31], "layer3.0.conv1": [9, 53],
             "layer3.0.downsample.0": [22, 62], "layer3.1.conv1": [18, 43],
             "layer3.2.conv1": [37, 58]},
            {"conv1": [8], "layer1.stage.0.conv1": [8], "layer1.stage.1.conv1": [3],
             "layer1.stage.2.conv1": [6], "layer2.stage.0.conv1": [16],
             "layer2.stage.0.downsample.0": [15], "layer2.stage.1.conv1": [24],
             "layer2.stage.2.conv1": [4], "layer3.0.conv1": [13], "layer3.0.downsample.0": [55],
             "layer3.1.conv1": [31], "layer3.2.conv1": [8]},
            {"layer2.stage.0.conv1": [29], "layer2.stage.0.downsample.0": [20],
             "layer2.stage.1.conv1": [15], "layer2.stage.2.conv1": [5], "layer3.0.conv1": [6, 49],
             "layer3.0.downsample.0": [47, 58], "layer3.1.conv1": [25, 56],
             "layer3.2.conv1": [4, 26]},
        ],
        {"conv1": 15, "layer1.stage.0.conv1": 15, "layer1.stage.1.conv1": 15,
         "layer1.stage.2.conv1": 15, "layer2.stage.0.conv1": 29, "layer2.stage.0.downsample.0": 29,
         "layer2.stage.1.conv1": 29, "layer2.stage.2.conv1": 29, "layer3.0.conv1": 59,
         "layer3.0.downsample.0": 59, "layer3.1.conv1": 59, "layer3.2.conv1": 59},
    ),
    ("taylor", "global", 4, 16): (
        [
            {"layer2.stage.0.conv1": [2, 14, 19, 20],
             "layer3.0.conv1": [6, 12, 13, 26, 27, 53, 56, 62],
             "layer3.1.conv1": [26, 42, 58, 60]},
            {"layer1.stage.1.conv1": [5, 6, 9, 12], "layer2.stage.1.conv1": [5, 12, 16, 25],
             "layer3.0.conv1": [24, 47, 49, 50], "layer3.2.conv1": [29, 38, 50, 58]},
            {"layer1.stage.2.conv1": [3, 4, 11, 13], "layer2.stage.2.conv1": [12, 13, 21, 25],
             "layer3.0.conv1": [25, 33, 48, 51], "layer3.1.conv1": [0, 22, 31, 50]},
        ],
        {"conv1": 16, "layer1.stage.0.conv1": 16, "layer1.stage.1.conv1": 12,
         "layer1.stage.2.conv1": 12, "layer2.stage.0.conv1": 28, "layer2.stage.0.downsample.0": 32,
         "layer2.stage.1.conv1": 28, "layer2.stage.2.conv1": 28, "layer3.0.conv1": 48,
         "layer3.0.downsample.0": 64, "layer3.1.conv1": 56, "layer3.2.conv1": 60},
    ),
}


def calibration_batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, *SHAPE, generator=gen), torch.randint(0, 10, (8,), generator=gen))
            for _ in range(2)]


def resnet20():
    torch.manual_seed(0)
    return build_model("resnet20", 10, with_bam=True, input_shape=SHAPE)


class ScoringRunner:
    """A Runner that scores like LocalRunner on fixed batches and never trains."""

    uses_cuda = False

    def __init__(self):
        self.batches = calibration_batches()

    def fit(self, model, epochs, lr, label="train"):
        return model

    def evaluate(self, model):
        return 90.0

    def score(self, kind, model, groups, batches, seed):
        return compute_scores(kind, model, groups, self.batches[:batches], seed=seed)

    def recalibrate_bn(self, model, batches):
        return model


@pytest.fixture
def traces(monkeypatch):
    """Counts dependency-graph traces (every trace goes through prune.build_graph)."""
    calls = []
    real = ccpcsa.prune.build_graph

    def counting(model, example):
        calls.append(model)
        return real(model, example)

    monkeypatch.setattr(ccpcsa.prune, "build_graph", counting)
    return calls


def independent_macs(model):
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *SHAPE))
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("kind,allocation,round_to,m", list(EXPECTED))
def test_step_removes_the_channels_the_loop_removed(kind, allocation, round_to, m):
    chosen, widths = EXPECTED[(kind, allocation, round_to, m)]
    pruner = Pruner(resnet20(), "resnet20", SHAPE, limits=PruneLimits(0.6),
                    allocation=allocation, round_to=round_to)
    batches = calibration_batches()
    for seed, want in zip((1, 2, 3), chosen, strict=True):
        step = pruner.step(importance_scorer(kind, batches, seed), m)
        assert step.chosen == want
        assert step.removed == sum(map(len, want.values()))
    assert pruner.widths() == widths


@pytest.mark.parametrize("kind,allocation,round_to,m", list(EXPECTED)[:2])
def test_loop_traces_once_per_round_and_removes_the_same_channels(kind, allocation, round_to, m,
                                                                  traces):
    cfg = LoopConfig(groups_per_round=m, max_rounds=3, importance=kind, allocation=allocation,
                     round_to=round_to, calibration_batches=2, limits=PruneLimits(0.6))
    result = prune_loop(resnet20(), "resnet20", SHAPE, 90.0, ScoringRunner(), cfg)
    assert len(traces) == 3  # the trace of the starting model serves round 1
    chosen, widths = EXPECTED[(kind, allocation, round_to, m)]
    assert [r.removed for r in result.records] == [0, *(sum(map(len, c.values())) for c in chosen)]
    assert result.records[-1].widths == widths
    assert group_widths(channel_groups(result.model, "resnet20", SHAPE)[1]) == widths


def test_pruner_traces_only_after_a_removal_or_another_model(traces):
    assert ccpcsa.Pruner is Pruner
    model = resnet20()
    pruner = Pruner(model, "resnet20", SHAPE)
    original = pruner.widths()
    groups = pruner.groups
    pruner.channel_costs()
    pruner.model = model  # the same object: nothing to trace
    assert len(traces) == 1 and pruner.groups is groups
    pruner.step(importance_scorer("l1"), 8)
    assert len(traces) == 1  # scored and removed on the graph traced above
    assert pruner.widths() != original and len(traces) == 1  # read from the pruned layers
    pruner.step(importance_scorer("l1"), 8)
    assert len(traces) == 2
    pruner.model = resnet20()
    assert pruner.widths() == original and len(traces) == 3
    assert pruner.original_widths == original


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2"])
def test_widths_after_a_step_are_those_a_new_trace_finds(name):
    torch.manual_seed(0)
    model = build_model(name, 10, with_bam=True, input_shape=SHAPE)
    pruner = Pruner(model, name, SHAPE, round_to=4)
    before = sum(pruner.widths().values())
    for _ in range(2):
        step = pruner.step(importance_scorer("random"), 24)
        assert step.widths == group_widths(channel_groups(model, name, SHAPE)[1])
    assert sum(step.widths.values()) <= before - 48


def test_prune_to_stops_at_the_first_step_under_the_target():
    start = count_flops(resnet20(), SHAPE)
    target = 0.6 * start
    pruner = Pruner(resnet20(), "resnet20", SHAPE)
    steps = pruner.prune_to(target, importance_scorer("l1"), 16)
    assert steps and all(s.removed >= 16 for s in steps)
    assert independent_macs(pruner.model) <= target < start
    assert pruner.flops() == pytest.approx(independent_macs(pruner.model), rel=0.01)
    # one step fewer does not get there
    with pytest.raises(PruneError, match="not reached"):
        Pruner(resnet20(), "resnet20", SHAPE).prune_to(target, importance_scorer("l1"), 16,
                                                       max_steps=len(steps) - 1)
    assert pruner.prune_to(target, importance_scorer("l1"), 16) == []  # already there


def test_prune_to_says_when_the_caps_stop_it():
    pruner = Pruner(resnet20(), "resnet20", SHAPE, limits=PruneLimits(0.2))
    with pytest.raises(PruneError, match="cap or floor"):
        pruner.prune_to(0.5 * pruner.flops(), importance_scorer("l1"), 64)
    assert all(w >= 0.8 * pruner.original_widths[k] for k, w in pruner.widths().items())
