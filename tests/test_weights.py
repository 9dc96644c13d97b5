"""--weights: a user's trained model replaces step 1's training; bad weights are one line."""

import json

import pyarrow.parquet as pq
import pytest
import torch
import torchvision

from ccpcsa import load_checkpoint
from ccpcsa.__main__ import main
from ccpcsa.checkpoint import read_payload
from ccpcsa.data import DataConfig, build_datasets
from ccpcsa.loop import PrepareConfig, prepare
from ccpcsa.models import CifarResNet
from ccpcsa.train import LocalRunner, TrainConfig, evaluate, fit

SHAPE = (3, 16, 16)


class CountingRunner(LocalRunner):
    fits: list[tuple[str, int]]

    def fit(self, model, epochs, lr, label="train"):
        self.fits = [*getattr(self, "fits", []), (label, epochs)]
        return super().fit(model, epochs, lr, label)


@pytest.fixture(scope="module")
def digits():
    return build_datasets(DataConfig("digits"))


@pytest.fixture(scope="module")
def trained_state(digits, tmp_path_factory):
    """A plain state_dict (torchvision's format: no wrapper, no ccpcsa metadata) of a
    resnet20 trained outside ccpcsa's loop, and its accuracy measured here."""
    train, test = digits
    torch.manual_seed(3)
    model = fit(CifarResNet(20, 10), train, TrainConfig(batch_size=64), epochs=1, lr=0.05)
    path = tmp_path_factory.mktemp("weights") / "resnet20_digits.pth"
    torch.save(model.state_dict(), path)
    return path, evaluate(model, test, TrainConfig(batch_size=64))


def test_weights_replace_step1_and_set_the_reference(trained_state, digits, tmp_path, capsys):
    path, _ = trained_state
    out = tmp_path / "run"
    code = main(["prune", "--model", "resnet20", "--weights", str(path), "--attention-epochs",
                 "1", "--max-rounds", "1", "--epochs", "0", "-m", "4", "--tolerance", "100",
                 "--latency-batch", "2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    # the loaded model, evaluated independently: a fresh torchvision-style model, the file's
    # tensors, the digits test split
    model = CifarResNet(20, 10)
    model.load_state_dict(torch.load(path, weights_only=True))
    measured = evaluate(model, digits[1], TrainConfig(batch_size=64))
    assert f"reference (baseline) {measured:.2f}%" in printed, printed
    baseline = read_payload(str(out / "prepared" / "baseline.pt"))
    assert baseline["metrics"]["accuracy"] == pytest.approx(measured)
    given = torch.load(path, weights_only=True)
    for key, tensor in given.items():  # step 1 did not train: the weights are the file's
        assert torch.equal(baseline["state_dict"][key], tensor), key
    assert baseline["extra"]["weights_sha256"]
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["baseline_epochs"] == 0 and config["weights"] == str(path)
    # prune's final model has its measured latency, on the device it ran on
    rows = pq.read_table(out / "rounds.parquet").to_pylist()
    final = rows[-1]
    assert final["latency_ms"] > 0 and final["latency_batch_ms"] > 0
    assert final["latency_batch"] == 2 and final["latency_device"].startswith("cpu: ")
    assert all(r["latency_ms"] is None for r in rows[:-1])
    assert "measured speed-up / FLOPs reduction" in printed
    assert read_payload(str(out / "final.pt"))["metrics"]["latency_ms"] == final["latency_ms"]


def test_weights_hash_keys_the_stage0_cache(trained_state, digits, tmp_path):
    path, accuracy = trained_state
    train, test = digits
    runner = CountingRunner(train, test, TrainConfig(batch_size=64))
    cfg = PrepareConfig("resnet20", 10, SHAPE, baseline_epochs=0, attention_epochs=0,
                        weights=str(path))
    cache = str(tmp_path / "cache")
    first = prepare(cfg, runner, cache)
    assert first.baseline_accuracy == pytest.approx(accuracy)
    assert ("baseline", 0) not in getattr(runner, "fits", [])  # evaluated, never trained
    assert prepare(cfg, runner, cache) == first  # same file: reused
    changed = tmp_path / "changed.pth"  # same path, other content: not reused
    state = torch.load(path, weights_only=True)
    state["fc.bias"] = state["fc.bias"] + 100 * torch.eye(10)[0]  # predicts class 0
    torch.save(state, changed)
    path_cfg = PrepareConfig("resnet20", 10, SHAPE, baseline_epochs=0, attention_epochs=0,
                             weights=str(changed))
    other = prepare(path_cfg, runner, cache)
    assert other.baseline_accuracy != pytest.approx(first.baseline_accuracy)
    assert load_checkpoint(other.baseline_checkpoint).fc.bias[0] > 50


def test_training_checkpoint_and_ddp_prefix_are_accepted(trained_state, tmp_path, capsys):
    path, _ = trained_state
    state = torch.load(path, weights_only=True)
    wrapped = tmp_path / "train_ckpt.pt"
    torch.save({"epoch": 7, "model": {f"module.{k}": v for k, v in state.items()},
                "optimizer_lr": 0.1}, wrapped)
    code = main(["prune", "--model", "resnet20", "--weights", str(wrapped),
                 "--attention-epochs", "0", "--max-rounds", "1", "--epochs", "0",
                 "--latency-batch", "0", "--tolerance", "100", "--out", str(tmp_path / "r")])
    assert code == 0, capsys.readouterr().err


def _one_line_error(argv, capsys) -> str:
    code = main(["prune", *argv, "--max-rounds", "1", "--latency-batch", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_missing_file_says_where_it_looked(tmp_path, capsys):
    err = _one_line_error(["--weights", "nowhere/w.pth", "--out", str(tmp_path / "o")], capsys)
    assert "weights file not found" in err and "nowhere/w.pth" in err
    assert not (tmp_path / "o" / "prepared").exists()


def test_torchvision_weights_name_is_read_from_the_hub_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    argv = ["--model", "resnet18", "--weights", "ResNet18_Weights.IMAGENET1K_V1",
            "--out", str(tmp_path / "o")]
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    err = _one_line_error(argv, capsys)
    assert "never downloads" in err and str(cached) in err
    # put torchvision's file format there (ImageNet's 1000 classes): it is found, and refused
    # for its classifier size, which the digits' 10 classes do not match
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), cached)
    err = _one_line_error(argv, capsys)
    assert "1000 classes" in err and "fc.weight" in err and "digits has 10" in err


def test_weights_of_another_architecture(tmp_path, capsys):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), path)
    err = _one_line_error(["--model", "resnet18", "--weights", str(path), "--out",
                           str(tmp_path / "o")], capsys)
    assert "do not fit --model resnet18" in err and "unexpected (e.g. layer1.2." in err


def test_a_pickled_module_is_refused(tmp_path, capsys):
    path = tmp_path / "module.pt"
    torch.save(CifarResNet(20, 10), path)  # a whole module: needs unpickling code
    err = _one_line_error(["--weights", str(path), "--out", str(tmp_path / "o")], capsys)
    assert "weights_only=True" in err and "state_dict" in err


def test_a_pruned_ccpcsa_checkpoint_without_bam_is_a_starting_point(tmp_path, capsys):
    from ccpcsa.attention import bam_modules
    from ccpcsa.checkpoint import CheckpointInfo, save_checkpoint
    from ccpcsa.models import build_model, get_spec
    from ccpcsa.prune import PruneLimits, build_graph, find_groups, remove_channels, select_channels

    model = build_model("resnet20", 10)
    spec = get_spec("resnet20")
    graph = build_graph(model, torch.zeros(1, *SHAPE))
    groups = find_groups(model, graph, spec.classifier(model), spec.stage_of)
    scores = {g.key: torch.rand(g.width) for g in groups}
    remove_channels(graph, groups, select_channels(groups, scores, 100, PruneLimits(),
                                                   {g.key: g.width for g in groups}))
    pruned = tmp_path / "pruned_nobam.pt"
    save_checkpoint(model, CheckpointInfo("resnet20", 10, False, SHAPE), str(pruned))
    out = tmp_path / "run"
    code = main(["prune", "--model", "resnet20", "--weights", str(pruned), "--attention-epochs",
                 "0", "--max-rounds", "1", "--epochs", "0", "--tolerance", "100",
                 "--latency-batch", "0", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    attention = load_checkpoint(str(out / "prepared" / "attention.pt"))
    widths = [bam.channels for _, bam in bam_modules(attention)]
    # BAM sits on the pruned widths (layer1's and layer2's outputs), not the original 16/32
    assert widths == [model.layer1[-1].bn2.num_features, model.layer2[-1].bn2.num_features]
    assert widths != [16, 32]

    with_bam = tmp_path / "with_bam.pt"
    save_checkpoint(attention, CheckpointInfo("resnet20", 10, True, SHAPE), str(with_bam))
    err = _one_line_error(["--weights", str(with_bam), "--out", str(tmp_path / "o")], capsys)
    assert "holds a model with BAM" in err and "final_nobam.pt" in err
