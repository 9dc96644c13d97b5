"""Measured latency (ccpcsa.latency) and the report's accuracy-vs-latency view."""

import pandas as pd
import pytest
import torch
from PIL import Image

from ccpcsa.latency import measure_latency
from ccpcsa.models import build_model
from ccpcsa.search import report
from ccpcsa.search.pareto import format_table, write_frontier

BASELINE = {"accuracy": 95.0, "flops": 10_000_000, "params": 270_000, "latency_ms": 4.0,
            "latency_batch_ms": 20.0}


def test_measure_latency_reports_medians_and_leaves_the_model_as_it_was():
    model = build_model("resnet20", 10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = measure_latency(model, (3, 16, 16), "cpu", batch=4, warmup=1, repeats=3)
    assert result.device.startswith("cpu: ") and "threads" in result.device
    assert result.batch1_ms > 0 and result.batch_ms > 0
    assert (result.batch, result.repeats) == (4, 3)
    assert set(result.columns()) == {"latency_ms", "latency_batch_ms", "latency_batch",
                                     "latency_repeats", "latency_device"}
    assert model.training  # restored; BN statistics untouched (eval mode while timing)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[key]), key
    with pytest.raises(ValueError, match="batch >= 1"):
        measure_latency(model, (3, 16, 16), "cpu", batch=0)


def frontier_with_latency() -> pd.DataFrame:
    return pd.DataFrame({
        "trial_id": ["stage0", "t1", "t1", "t2"], "round": [0, 1, 2, 1],
        "accuracy": [96.0, 95.5, 94.0, 93.0], "flops": [10.1e6, 8e6, 6e6, 7e6],
        "params": [271_000, 200_000, 150_000, 180_000],
        "checkpoint": ["a.pt", "b.pt", "c.pt", "d.pt"],
        "latency_ms": [4.1, 3.5, 3.6, None], "latency_batch_ms": [21.0, 17.0, 14.0, None],
        "latency_batch": [8, 8, 8, None], "latency_device": ["cpu: X, 2 threads"] * 3 + [None],
    })


def test_report_x_latency_draws_both_axes(tmp_path, capsys):
    write_frontier(frontier_with_latency(), str(tmp_path), BASELINE)
    assert report.main([str(tmp_path), "--x", "latency"]) == 0
    printed = capsys.readouterr().out
    assert "ms b1" in printed and "ms b8" in printed and "3.50" in printed
    png = tmp_path / "frontier_latency.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1]  # two panels


def test_report_x_latency_without_measurements_is_one_line(tmp_path, capsys):
    frame = frontier_with_latency().drop(columns=["latency_ms", "latency_batch_ms",
                                                  "latency_batch", "latency_device"])
    write_frontier(frame, str(tmp_path), BASELINE)
    assert report.main([str(tmp_path), "--x", "latency"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no latency measured" in err and len(err.splitlines()) == 1
    assert "ms b1" not in format_table(frame, BASELINE)
