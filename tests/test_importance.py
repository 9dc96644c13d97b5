import threading

import pytest
import torch

from ccpcsa.importance import (
    IMPORTANCES,
    CorrelationStats,
    ImportanceError,
    MeanStats,
    compute_scores,
    correlation_scores,
    merge_over_workers,
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


class ThreadSum:
    """all_reduce(sum) among threads standing in for data-parallel workers (the real one, over
    Ray Train workers and gloo, is in test_distributed.py)."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world)
        self.parts: dict[int, list[torch.Tensor]] = {}

    def reducer(self, rank: int):
        def reduce(tensors: list[torch.Tensor]) -> None:
            self.parts[rank] = [t.clone() for t in tensors]
            self.barrier.wait()
            totals = [sum(ts) for ts in zip(*self.parts.values(), strict=True)]
            self.barrier.wait()
            for t, total in zip(tensors, totals, strict=True):
                t.copy_(total)

        return reduce


def test_statistics_summed_over_workers_equal_one_stream():
    """Two workers, each streaming its own samples with its own shift (very different means),
    merged: the correlation and scores of all the samples, and the pooled attention mean."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(48, 10, 3, 3, generator=gen) * 2
    x[:, 3] = 0.8 * x[:, 7] + 0.05 * x[:, 1]
    x[:24] += 40.0  # worker 0's first batch (its shift) is far from worker 1's
    shares = [x[:24], x[24:]]
    stats = [CorrelationStats(10) for _ in shares]
    means = [MeanStats(10) for _ in shares]
    summed = ThreadSum(2)

    def work(rank: int) -> None:
        for chunk in shares[rank].split(5):
            stats[rank].update(chunk)
            means[rank].update(chunk.abs())
        merge_over_workers([stats[rank]], [means[rank]], summed.reducer(rank))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank in range(2):
        assert stats[rank].n == 48 * 9 and means[rank].n == 48 * 9
        for kind in ("ccpcsa", "maxcorr", "dedup"):
            torch.testing.assert_close(stats[rank].scores(kind), correlation_scores(x, kind),
                                       atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(means[rank].mean(),
                                   x.abs().transpose(0, 1).reshape(10, -1).double().mean(1))


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
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = compute_scores(kind, model, groups, batches, seed=3)
    assert set(scores) == {g.key for g in groups}
    for g in groups:
        assert scores[g.key].shape == (g.width,)
        assert torch.isfinite(scores[g.key]).all()
    # scoring leaves the model as it was: weights, BN statistics, no gradients left behind
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    again = compute_scores(kind, model, groups, batches, seed=3)
    for key, s in scores.items():
        torch.testing.assert_close(again[key], s)


def test_data_driven_criterion_needs_batches():
    model = build_model("resnet20", 10, with_bam=True)
    spec = get_spec("resnet20")
    graph = build_graph(model, torch.zeros(1, 3, 16, 16))
    groups = find_groups(model, graph, spec.classifier(model), spec.stage_of)
    with pytest.raises(ImportanceError, match="calibration batch"):
        compute_scores("ccpcsa", model, groups, [])
    with pytest.raises(ImportanceError, match="unknown importance"):
        compute_scores("magic", model, groups, [])


def resnet20_groups(model):
    spec = get_spec("resnet20")
    graph = build_graph(model, torch.zeros(1, 3, 16, 16))
    return {g.key: g for g in find_groups(model, graph, spec.classifier(model), spec.stage_of)}


def test_streams_are_read_where_the_network_reads_them_after_attention():
    model = build_model("resnet20", 10, with_bam=True).eval()
    groups = resnet20_groups(model)
    stream = groups["conv1"]  # layer1's residual stream, with BAM at its end
    assert stream.is_residual and stream.bams
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        reads = [model.relu(model.bn1(model.conv1(x)))]
        for block in model.layer1.stage:
            reads.append(block(reads[-1]))
        reads[-1] = model.layer1.bam(reads[-1])  # layer2 reads the attention-weighted output
    pooled = torch.cat([r.transpose(0, 1).reshape(16, -1) for r in reads], 1)
    expected = pooled.abs().mean(1)
    scores = compute_scores("strength", model, [stream], [x])["conv1"]
    torch.testing.assert_close(scores, expected / expected.mean(), rtol=1e-5, atol=1e-6)
    stats = CorrelationStats()
    stats.update(pooled.T[:, :, None, None])  # the same samples, as N x C x 1 x 1
    torch.testing.assert_close(compute_scores("ccpcsa", model, [stream], [x])["conv1"],
                               stats.scores() / stats.scores().mean(), rtol=1e-4, atol=1e-5)


def test_a_dead_channel_scores_zero():
    model = build_model("resnet20", 10, with_bam=True).eval()
    bn = model.layer1.stage[0].bn1
    with torch.no_grad():
        bn.weight[3], bn.bias[3] = 0.0, -1.0  # after the ReLU, channel 3 is always 0
    group = resnet20_groups(model)["layer1.stage.0.conv1"]
    batches = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    for kind in ("ccpcsa", "strength", "maxcorr", "dedup", "attention"):
        scores = compute_scores(kind, model, [group], batches)[group.key]
        assert scores[3] == 0.0 and (scores[torch.arange(16) != 3] > 0).all(), kind


@pytest.mark.parametrize("kind", ["ccpcsa", "strength", "maxcorr", "dedup"])
def test_streaming_equals_one_shot_for_every_variant(kind):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(30, 12, 4, 4, generator=gen) + 5
    x[:, 4] = 0.7 * x[:, 9] + 0.01 * x[:, 0]  # a near-duplicate pair
    x[:, 6] = 2.0  # constant
    stats = CorrelationStats()
    for chunk in x.split(8):
        stats.update(chunk)
    torch.testing.assert_close(stats.scores(kind), correlation_scores(x, kind),
                               atol=1e-5, rtol=1e-5)
    assert stats.scores(kind)[6] == 0.0


def test_dedup_drops_the_weaker_twin_and_maxcorr_both():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 8, 5, 5, generator=gen)
    x[:, 5] = 0.5 * x[:, 2] + 0.01 * torch.randn(64, 5, 5, generator=gen)  # weaker twin of 2
    dedup, maxcorr = correlation_scores(x, "dedup"), correlation_scores(x, "maxcorr")
    strength = correlation_scores(x, "strength")
    assert int(dedup.argmin()) == 5 and dedup[5] < 0.05 * strength[5]
    torch.testing.assert_close(dedup[torch.arange(8) != 5], strength[torch.arange(8) != 5])
    assert maxcorr[[2, 5]].max() < 0.05 * strength[[2, 5]].min()


def test_torch_pruning_baselines():
    model = build_model("resnet20", 10, with_bam=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.1, 1.0)
    groups = list(resnet20_groups(model).values())
    inner = next(g for g in groups if g.key == "layer2.stage.1.conv1")
    gamma = model.layer2.stage[1].bn1.weight.detach().abs()
    bn_scale = compute_scores("bn_scale", model, groups)[inner.key]
    torch.testing.assert_close(bn_scale, gamma / gamma.mean())
    lamp = compute_scores("lamp", model, groups)
    # LAMP keeps its own normaliser (the strongest channel of each group scores 1)
    assert all(float(s.max()) == pytest.approx(1.0, abs=1e-4) for s in lamp.values())
    first = compute_scores("random", model, groups, seed=1)
    assert all(torch.equal(first[k], v)
               for k, v in compute_scores("random", model, groups, seed=1).items())
    assert not torch.equal(first[inner.key],
                           compute_scores("random", model, groups, seed=2)[inner.key])
    with pytest.raises(ImportanceError, match="labels"):
        compute_scores("taylor", model, groups, [torch.randn(4, 3, 16, 16)])
