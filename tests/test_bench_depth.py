"""benchmarks/fashion_depth.py's pieces, fast: the JSON lines survive a cut line, the budget,
Torch-Pruning's ratio really reaches the FLOPs asked for, and --render writes the section
with its table and verdicts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import fashion_depth as bench  # noqa: E402
from ccpcsa.flops import count_flops  # noqa: E402
from ccpcsa.models import build_model, get_spec  # noqa: E402


def _arm(model, seed, target, arm, accuracy, base=90.0, fraction=0.3):
    return {"kind": "arm", "model": model, "seed": seed, "target": target, "arm": arm,
            "accuracy": accuracy, "accuracy_rounds": accuracy - 2, "flops": 1,
            "flops_fraction": fraction, "baseline_accuracy": base, "rounds": 4,
            "epochs_total": 14, "seconds": 1.0, "train_subset": 0, "device": "cpu (test)",
            "command": "python benchmarks/fashion_depth.py --seeds 0,1"}


def test_lines_are_appended_and_a_cut_line_is_skipped(tmp_path):
    out = tmp_path / "r.jsonl"
    bench.write_line(str(out), _arm("resnet20", 0, "-70%", "ccpcsa", 89.0))
    with out.open("a") as f:
        f.write('{"kind": "arm", "mod')  # a kill mid-line
    bench.write_line(str(out), _arm("resnet20", 1, "-70%", "ccpcsa", 88.0))
    records = bench.read_lines(str(out))
    assert [r["seed"] for r in records] == [0, 1]
    assert ("resnet20", 1, "-70%", "ccpcsa", 0) in bench.done_keys(str(out))


def test_budget_stops_an_arm_that_would_not_fit():
    clock = bench.Clock(budget_s=10.0)
    assert clock.fits("ccpcsa")  # nothing measured yet
    clock.took["ccpcsa"] = 60.0
    assert not clock.fits("ccpcsa")
    assert bench.Clock(budget_s=0.0).fits("anything")


def test_torch_pruning_ratio_reaches_the_flops_asked_for():
    import copy

    import torch_pruning as tp

    shape = (3, 8, 8)
    model = build_model("resnet20", 10, with_bam=False, input_shape=shape).eval()
    base = count_flops(model, shape)
    classifier = get_spec("resnet20", shape).classifier(model)
    example = torch.zeros(1, *shape)
    ratio = bench.tp_ratio_for(model, example, classifier, 0.5, base, shape)
    pruned = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(
        pruned, example, importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio, iterative_steps=3,
        ignored_layers=[bench._same(pruned, model, classifier)])
    for _ in range(3):
        pruner.step()
    assert count_flops(pruned, shape) <= 0.5 * base
    assert count_flops(model, shape) == base  # the search prunes copies only


def test_render_writes_the_section_with_verdicts(tmp_path):
    out, doc = tmp_path / "r.jsonl", tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Another section\n\nkept\n")
    rows = [_arm("resnet56", s, "-70%", arm, acc) for s, arm, acc in
            [(0, "ccpcsa", 89.7), (1, "ccpcsa", 89.4), (0, "ccpcsa+kd", 89.9),
             (1, "ccpcsa+kd", 89.8), (0, "tp-magnitude", 89.0), (1, "tp-magnitude", 89.5)]]
    rows.append({"kind": "stage0", "model": "resnet56", "seed": 0, "seconds": 321.0,
                 "cached": False, "epochs": 30, "device": "cpu (test)"})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bench.main(["--render", "--out", str(out), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "kept" in text and bench.HEADING in text
    assert "| resnet56 | -70% | ccpcsa+kd | 2 | 89.85 ± 0.07 | -0.15 ± 0.07 | 0.300 | 2/2 |" \
        in text
    assert "| resnet56 | -70% | ccpcsa | 2 | 89.55 ± 0.21 | -0.45 ± 0.21 | 0.300 | 1/2 |" in text
    assert "resnet56 at -70 % (ccpcsa+kd): -0.15 points" in text and "met" in text
    assert "Stage 0 (30 baseline epochs): resnet56 seed 0 321s." in text
    assert "`python benchmarks/fashion_depth.py --seeds 0,1`" in text
