import copy

import pytest
import torch
from torch import nn

from ccpcsa.bn import RecalibrationError, recalibrate_bn
from ccpcsa.data import DataConfig, build_datasets
from ccpcsa.loop import adaptive_bn_accuracy
from ccpcsa.models import build_model
from ccpcsa.train import LocalRunner, TrainConfig


def batches(count=3, seed=0, size=16):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, size, size, generator=gen) * 2 + 1,
             torch.randint(0, 10, (8,), generator=gen)) for _ in range(count)]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_only_bn_buffers_change_and_equal_the_batch_statistics():
    model = build_model("resnet20", 10, with_bam=True).eval()  # BAM brings a BatchNorm1d
    params = {n: p.clone() for n, p in model.named_parameters()}
    before = state(model)
    data = batches()
    recalibrate_bn(model, data)
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.rsplit(".", 1)[1] in ("running_mean", "running_var",
                                                   "num_batches_tracked") for k in changed)
    assert any("channel_gate.bn" in k for k in changed)  # BAM's BatchNorm1d too
    # the stem BN's statistics are the plain average of the per-batch statistics
    with torch.no_grad():
        outs = [model.conv1(x) for x, _ in data]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.transpose(0, 1).flatten(1).var(1) for o in outs]).mean(0)
    torch.testing.assert_close(model.bn1.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.bn1.running_var, var, rtol=1e-4, atol=1e-5)
    assert int(model.bn1.num_batches_tracked) == len(data)


def test_deterministic_and_restores_momentum_and_mode():
    model = build_model("resnet20", 10, with_bam=True)
    model.bn1.momentum = 0.3
    model.train()
    model.layer1.eval()  # a mixed mode is restored module by module
    first = state(recalibrate_bn(model, batches(seed=1)))
    assert model.bn1.momentum == 0.3
    assert all(m.momentum == 0.1 for m in model.modules()
               if isinstance(m, nn.BatchNorm2d) and m is not model.bn1)
    assert model.training and model.bn1.training and not model.layer1.training
    assert not model.layer1.stage[0].bn1.training
    again = state(recalibrate_bn(model, [x for x, _ in batches(seed=1)]))  # bare tensors too
    for k, v in first.items():
        assert torch.equal(v, again[k]), k


def test_no_batches_is_an_error_and_leaves_the_model_alone():
    model = build_model("resnet20", 10)
    recalibrate_bn(model, batches())
    before = state(model)
    with pytest.raises(RecalibrationError, match="at least one batch"):
        recalibrate_bn(model, [])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.bn1.momentum == 0.1


def test_adaptive_bn_evaluation_changes_only_bn_buffers_and_is_seeded():
    """The screening proxy: BN re-estimated on seeded training batches, then top-1 on the
    test split. The weights are untouched; the same seed gives the same statistics and the
    same accuracy, another seed other statistics."""
    train, test = build_datasets(DataConfig("digits", image_size=8))
    calibration = build_datasets(DataConfig("digits", image_size=8, augment=False))[0]
    torch.manual_seed(0)
    model = build_model("resnet20", 10, with_bam=True)

    def proxy(seed):
        runner = LocalRunner(train, test, TrainConfig(batch_size=32, seed=seed), calibration)
        copied = copy.deepcopy(model)
        weights = {n: p.clone() for n, p in copied.named_parameters()}
        copied, accuracy = adaptive_bn_accuracy(copied, runner, 3)
        for name, p in copied.named_parameters():
            assert torch.equal(p, weights[name]), name
        return state(copied), accuracy

    first, accuracy = proxy(seed=1)
    again, accuracy_again = proxy(seed=1)
    other, _ = proxy(seed=2)
    assert accuracy == accuracy_again and 0.0 <= accuracy <= 100.0
    assert all(torch.equal(v, again[k]) for k, v in first.items())
    before = state(model)
    changed = {k for k, v in first.items() if not torch.equal(v, before[k])}
    assert changed and all(k.rsplit(".", 1)[1] in ("running_mean", "running_var",
                                                   "num_batches_tracked") for k in changed)
    assert not torch.equal(first["bn1.running_mean"], other["bn1.running_mean"])
