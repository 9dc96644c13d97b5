"""`python -m ccpcsa export`: each installed format round-trips to the checkpoint's outputs,
read back by its own runtime (torch.jit, torch.export, onnxruntime), not by ccpcsa."""

import importlib.util
import os

import pytest
import torch

from ccpcsa import load_checkpoint
from ccpcsa.__main__ import main
from ccpcsa.attention import has_bam, strip_bam
from ccpcsa.checkpoint import CheckpointInfo, save_checkpoint
from ccpcsa.export import ATOL, RTOL
from ccpcsa.models import build_model, get_spec
from ccpcsa.prune import PruneLimits, build_graph, find_groups, remove_channels, select_channels

SHAPE = (3, 16, 16)
HAS_ONNX = all(importlib.util.find_spec(p) for p in ("onnx", "onnxscript", "onnxruntime"))
FORMATS = ["torchscript", "exported",
           pytest.param("onnx", marks=pytest.mark.skipif(not HAS_ONNX, reason="no onnx extra"))]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A pruned resnet20 with BAM, its BN statistics and BAM weights not at their init."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, with_bam=True)
    spec = get_spec("resnet20")
    graph = build_graph(model, torch.zeros(1, *SHAPE))
    groups = find_groups(model, graph, spec.classifier(model), spec.stage_of)
    scores = {g.key: torch.rand(g.width) for g in groups}
    remove_channels(graph, groups, select_channels(groups, scores, 40, PruneLimits(),
                                                   {g.key: g.width for g in groups}))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *SHAPE))
    path = tmp_path_factory.mktemp("ckpt") / "pruned.pt"
    save_checkpoint(model, CheckpointInfo("resnet20", 10, True, SHAPE), str(path))
    return str(path)


def run_exported(fmt: str, path: str, x: torch.Tensor) -> torch.Tensor:
    if fmt == "torchscript":
        return torch.jit.load(path)(x)
    if fmt == "exported":
        return torch.export.load(path).module()(x)
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_round_trip(fmt, checkpoint, tmp_path, capsys):
    out = tmp_path / f"model.{fmt}"
    assert main(["export", checkpoint, "--format", fmt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ": OK" in printed and f"{ATOL:g}" in printed
    reference = load_checkpoint(checkpoint)
    for batch in (1, 5):  # the batch dimension is dynamic
        x = torch.randn(batch, *SHAPE)
        with torch.no_grad():
            torch.testing.assert_close(run_exported(fmt, str(out), x).detach(), reference(x),
                                       atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_strip_bam_matches_the_stripped_model(fmt, checkpoint, tmp_path, capsys):
    out = tmp_path / "nobam"
    assert main(["export", checkpoint, "--format", fmt, "--out", str(out),
                 "--strip-bam"]) == 0
    printed = capsys.readouterr().out
    assert "BAM stripped" in printed and "accuracy differ" in printed
    with_bam = load_checkpoint(checkpoint)
    stripped = strip_bam(load_checkpoint(checkpoint))
    assert has_bam(with_bam) and not has_bam(stripped)
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        got = run_exported(fmt, str(out), x).detach()
        torch.testing.assert_close(got, stripped(x), atol=ATOL, rtol=RTOL)
        assert not torch.allclose(got, with_bam(x), atol=1e-3)  # BAM really is gone


def test_export_default_path_and_bad_inputs(checkpoint, tmp_path, capsys, monkeypatch):
    assert main(["export", checkpoint, "--format", "exported"]) == 0
    assert os.path.exists(checkpoint[:-len(".pt")] + ".pt2") and capsys.readouterr().out
    assert main(["export", str(tmp_path / "missing.pt"), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot read checkpoint" in err and len(err.splitlines()) == 1
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real_find_spec(name))
    assert main(["export", checkpoint, "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'ccpcsa[onnx]'" in err and "onnxscript" in err
    assert len(err.splitlines()) == 1
