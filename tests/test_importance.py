import pytest
import torch

from ccpcsa.importance import (
    IMPORTANCES,
    CorrelationStats,
    ImportanceError,
    compute_scores,
    correlation_scores,
)
from ccpcsa.models import build_model, get_spec
from ccpcsa.prune import build_graph, find_groups


def test_copied_channel_ranks_lowest():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, 6, 6, generator=gen)
    x[:, 5] = x[:, 2]  # channel 5 carries nothing channel 2 does not
    scores = correlation_scores(x)
    assert int(scores.argmin()) in (2, 5)
    others = [i for i in range(8) if i not in (2, 5)]
    assert scores[[2, 5]].max() < scores[others].min()


def test_streaming_equals_one_shot():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 16, 5, 5, generator=gen) * 3 + 50  # a large mean tests the shift
    x[:, 7] = 0.5 * x[:, 3] + 0.1 * x[:, 1]
    stats = CorrelationStats()
    for chunk in x.split(7):
        stats.update(chunk)
    torch.testing.assert_close(stats.scores(), correlation_scores(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.correlation().float(),
                               torch.corrcoef(x.transpose(0, 1).reshape(16, -1)),
                               atol=1e-5, rtol=1e-5)


def test_constant_channel_is_least_important():
    x = torch.randn(16, 4, 3, 3)
    x[:, 1] = 0.0
    stats = CorrelationStats()
    stats.update(x)
    assert int(stats.scores().argmin()) == 1


@pytest.mark.parametrize("kind", IMPORTANCES)
def test_every_criterion_scores_every_group(kind):
    model = build_model("resnet20", 10, with_bam=True)
    spec = get_spec("resnet20")
    graph = build_graph(model, torch.zeros(1, 3, 16, 16))
    groups = find_groups(model, graph, spec.classifier(model), spec.stage_of)
    batches = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    scores = compute_scores(kind, model, groups, batches, seed=3)
    assert set(scores) == {g.key for g in groups}
    for g in groups:
        assert scores[g.key].shape == (g.width,)
        assert torch.isfinite(scores[g.key]).all()


def test_data_driven_criterion_needs_batches():
    model = build_model("resnet20", 10, with_bam=True)
    spec = get_spec("resnet20")
    graph = build_graph(model, torch.zeros(1, 3, 16, 16))
    groups = find_groups(model, graph, spec.classifier(model), spec.stage_of)
    with pytest.raises(ImportanceError, match="calibration batch"):
        compute_scores("ccpcsa", model, groups, [])
    with pytest.raises(ImportanceError, match="unknown importance"):
        compute_scores("magic", model, groups, [])
