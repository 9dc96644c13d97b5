"""Models outside the registry: torchvision classification CNNs by name and a user's own
factory, pruned end to end by `python -m ccpcsa prune` on the embedded digits, their FLOPs
re-counted independently from the saved checkpoints; and architectures that cannot be pruned
consistently refused in one line naming the layer."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from ccpcsa import load_checkpoint
from ccpcsa.__main__ import main
from ccpcsa.attention import bam_modules
from ccpcsa.checkpoint import CheckpointError, read_payload
from ccpcsa.data import DataConfig, build_datasets
from ccpcsa.models import build_model, get_spec
from ccpcsa.prune import PruneLimits, build_graph, find_groups, select_channels
from ccpcsa.search.pareto import read_frontier
from ccpcsa.train import TrainConfig, evaluate

REPO = Path(__file__).resolve().parents[1]

# every family with its smallest size here; ConvNeXt's stride-4 stem and 2x2 downsamplers
# need 32 pixels to keep a resolution per stage
FAMILIES = [
    ("torchvision:efficientnet_b0", 16),  # depthwise convs, squeeze-excitation, SiLU
    ("torchvision:regnet_y_400mf", 16),  # grouped convs (pruned per conv group) + SE
    ("torchvision:densenet121", 32),  # concatenations (its pools need 32 pixels)
    ("torchvision:convnext_tiny", 32),  # LayerNorm2d, channels-last Linear, layer scale
]


def independent_macs(model, shape) -> float:
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *shape))
    return counter.get_total_flops() / 2


def prune_cli(model: str, out, size: int, epochs: int = 0, extra=()) -> list[dict]:
    code = main(["prune", "--model", model, "--image-size", str(size), "--baseline-epochs",
                 "0", "--attention-epochs", "0", "--epochs", str(epochs), "--max-rounds", "1",
                 "-m", "24", "--tolerance", "100", "--batch-size", "128",
                 "--calibration-batches", "1", "--latency-batch", "0", "--out", str(out),
                 *extra])
    assert code == 0
    return pq.read_table(out / "rounds.parquet").to_pylist()


@pytest.mark.parametrize("name, size", FAMILIES)
def test_torchvision_family_prunes_end_to_end(name, size, tmp_path):
    rows = prune_cli(name, tmp_path / "run", size)
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["removed"] > 0
    shape = (3, size, size)
    final = load_checkpoint(str(tmp_path / "run" / "final.pt"))  # rebuilt from the file
    payload = read_payload(str(tmp_path / "run" / "final.pt"))
    assert payload["model"] == name and payload["bam_placements"]
    assert len(bam_modules(final)) == len(get_spec(name, shape).bam_placements)
    macs = independent_macs(final, shape)
    assert macs == pytest.approx(payload["metrics"]["flops"], rel=1e-6)
    unpruned = read_payload(str(tmp_path / "run" / "prepared" / "attention.pt"))
    assert macs < unpruned["metrics"]["flops"]
    assert final(torch.randn(2, *shape)).shape == (2, 10)


def test_grouped_convs_shrink_per_conv_group():
    name, shape = "torchvision:regnet_y_400mf", (3, 16, 16)
    spec = get_spec(name, shape)
    model = build_model(name, 10, with_bam=True, input_shape=shape)
    graph = build_graph(model, torch.zeros(1, *shape))
    groups = find_groups(model, graph, spec.classifier(model), spec.stage_of)
    grouped = [g for g in groups if g.interleave > 1]
    assert grouped
    g = grouped[0]
    per = g.width // g.interleave
    scores = {x.key: torch.ones(x.width) for x in groups}
    scores[g.key][[1, per + 1]] = 0.0  # the 2nd channel of the first two conv groups
    chosen = select_channels(groups, scores, 1, PruneLimits(), {x.key: x.width for x in groups},
                             allocation="global")
    # one unit = the 2nd channel of every conv group
    assert chosen == {g.key: [1 + j * per for j in range(g.interleave)]}


USER_MODULE = '''
from torch import nn


def build(num_classes):
    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
    return nn.Sequential(block(3, 16, 1), block(16, 16, 1), block(16, 32, 2), block(32, 32, 1),
                         block(32, 64, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, num_classes))


def channel_shuffle(num_classes):
    class Shuffle(nn.Module):
        def forward(self, x):
            n, c, h, w = x.shape
            return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), Shuffle(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userpkg.nets"
    for name in ("userpkg.nets", "userpkg"):
        sys.modules.pop(name, None)


def test_user_factory_prunes_trains_and_reloads(user_module, tmp_path):
    name = f"{user_module}:build"
    shape = (3, 16, 16)
    spec = get_spec(name, shape)
    # BAM after the last block at 16x16 and at 8x8; stages named by resolution
    assert spec.bam_placements == {"1": 16, "3": 32}
    assert spec.stages == ("res16", "res8", "res4", "head")
    rows = prune_cli(name, tmp_path / "run", 16, epochs=1,
                     extra=["--stage-cap", "res4=0.25"])
    with pytest.raises(CheckpointError, match="trust-model-code"):  # user code: opt in
        load_checkpoint(str(tmp_path / "run" / "final.pt"))
    final = load_checkpoint(str(tmp_path / "run" / "final.pt"), trust_model_code=True)
    assert read_payload(str(tmp_path / "run" / "final.pt"))["model"] == name
    assert independent_macs(final, shape) == pytest.approx(rows[1]["flops"], rel=1e-6)
    assert rows[1]["flops"] < rows[0]["flops"]


def test_unprunable_user_model_is_one_line_naming_the_layer(user_module, tmp_path, capsys):
    code = main(["prune", "--model", f"{user_module}:channel_shuffle", "--out",
                 str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "cannot be pruned" in err and f"{user_module}:channel_shuffle" in err
    assert "layer 4 fails" in err  # the channel shuffle
    assert not (tmp_path / "o" / "prepared").exists()


@pytest.mark.parametrize("model, message", [
    ("torchvision:fasterrcnn_resnet50_fpn", "not a torchvision classification model"),
    ("torchvision:vit_b_16", "found no place for BAM"),
    ("no_such_module_xyz:build", "cannot import 'no_such_module_xyz'"),
    ("resnet34", "torchvision:NAME"),
])
def test_bad_model_names_are_one_line(model, message, tmp_path, capsys):
    code = main(["prune", "--model", model, "--image-size", "224" if "vit" in model else "16",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_search_prunes_a_torchvision_model_from_given_weights(tmp_path):
    """search/run.py on Ray: stage 0 loads the weights on a Ray worker (no step-1 training),
    trials rebuild the traced model from its checkpoints, the frontier reloads."""
    weights = tmp_path / "mbv3.pth"
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    torch.save(model.state_dict(), weights)
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "search/run.py", "--model", "torchvision:mobilenet_v3_small",
         "--weights", str(weights), "--attention-epochs", "0", "--max-rounds", "1",
         "--epochs", "0", "--num-samples", "1", "--tolerance", "100", "--batch-size", "128",
         "--calibration-batches", "1", "--latency-batch", "0", "--storage", str(runs),
         "--name", "tv"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    frame, baseline = read_frontier(str(runs / "tv"))
    evaluated = evaluate(model, build_datasets(DataConfig("digits"))[1], TrainConfig(128))
    assert baseline["accuracy"] == pytest.approx(evaluated)
    assert (frame["round"] == 1).any()
    for path in frame.loc[frame["pareto"], "frontier_checkpoint"]:
        rebuilt = load_checkpoint(path)
        assert rebuilt.ccpcsa_model == "torchvision:mobilenet_v3_small"
        assert independent_macs(rebuilt, (3, 16, 16)) == pytest.approx(
            frame.loc[frame["frontier_checkpoint"] == path, "flops"].item(), rel=1e-6)
