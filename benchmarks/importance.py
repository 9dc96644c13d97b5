"""Benchmark: channel-importance criteria compared at equal FLOPs reduction.

For each model and seed, steps 1-2 of Algorithm 1 run once (baseline, then BAM inserted and
trained). From that same BAM model every criterion (CCPCSA, L1-norm, mean attention, random)
prunes iteratively: each step re-scores the current model and physically removes the lowest
channels, with no fine-tuning between steps, until the FLOPs reduction first reaches each target.
The snapshot taken at each target is evaluated (accuracy before fine-tuning), fine-tuned for the
same number of epochs with the same learning rate and data order, and evaluated again.

FLOPs are multiply-accumulates (ccpcsa.flops) and the reduction is measured against the
baseline model without BAM, as in the paper's tables; pruned models keep their BAM modules,
whose FLOPs are counted.

Because no fine-tuning happens between steps, the trajectory to 70 % passes through the
models at 30 % and 50 %: one trajectory per (model, seed, criterion) serves every target.

Usage: python benchmarks/importance.py [--models resnet20 resnet56] [--seeds 0 1 2]
       [--targets 30 50 70] [--finetune-epochs 3] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ccpcsa.data import DataConfig, build_datasets, dataset_info
from ccpcsa.flops import count_flops, count_params
from ccpcsa.importance import IMPORTANCES, compute_scores
from ccpcsa.loop import PrepareConfig, prepare
from ccpcsa.models import MODELS, get_spec
from ccpcsa.prune import (
    PruneLimits,
    build_graph,
    find_groups,
    group_widths,
    remove_channels,
    select_channels,
)
from ccpcsa.train import LocalRunner, TrainConfig, seed_everything

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/sections.py
import sections  # noqa: E402

SECTION = "## Importance criteria at equal FLOPs"
METHODS = ("ccpcsa", "l1", "attention", "random")
TEST_IMAGES = 360  # digits test split
OVERHEAD_TARGET = 5.0  # percent of one fine-tune epoch


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/importance.py",
        description="Compare channel-importance criteria at equal FLOPs reduction on the "
                    "embedded digits data: top-1 after equal fine-tuning (and right after "
                    "pruning), plus the time of scoring + surgery relative to one fine-tune "
                    "epoch. Writes the '" + SECTION + "' section of --out.")
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"],
                   help=f"architectures to benchmark, any of {', '.join(MODELS)} "
                        "(default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="seeds; each one trains its own baseline + BAM model, and fixes the "
                        "fine-tune data order shared by all methods (default: %(default)s)")
    p.add_argument("--targets", nargs="+", type=float, default=[30.0, 50.0, 70.0],
                   help="FLOPs reductions in percent of the baseline (no-BAM) model's MACs; "
                        "each method is stopped at the first step reaching each target "
                        "(default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help=f"importance criteria, any of {', '.join(IMPORTANCES)} "
                        "(default: %(default)s)")
    p.add_argument("--finetune-epochs", type=int, default=3,
                   help="fine-tune epochs after pruning to a target, identical for every "
                        "method (default: %(default)s)")
    p.add_argument("--finetune-lr", type=float, default=0.01,
                   help="SGD learning rate of that fine-tune, cosine-annealed "
                        "(default: %(default)s)")
    p.add_argument("--baseline-epochs", type=int, default=15,
                   help="step 1: epochs to train the model without BAM (default: %(default)s)")
    p.add_argument("--attention-epochs", type=int, default=5,
                   help="step 2: epochs to train the model with BAM (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.05,
                   help="SGD learning rate of steps 1-2 (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="batch size of training and calibration (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=16,
                   help="digits are resized to this side in pixels (default: %(default)s)")
    p.add_argument("--step-fraction", type=float, default=0.02,
                   help="m: channels removed per pruning step, as a fraction of the model's "
                        "original prunable channels; steps shrink near a target so that the "
                        "reduction reached overshoots it little (default: %(default)s)")
    p.add_argument("--calibration-batches", type=int, default=4,
                   help="training batches streamed to score channels each step (data-driven "
                        "criteria only) (default: %(default)s)")
    p.add_argument("--bn-batches", type=int, default=10,
                   help="the before-fine-tuning accuracy is also reported after re-estimating "
                        "BatchNorm statistics on this many training batches (no weight "
                        "update; on a copy, fine-tuning starts from the raw pruned model); "
                        "0 = skip (default: %(default)s)")
    p.add_argument("--overshoot", type=float, default=1.0,
                   help="a step that would pass a target by more than this many points of "
                        "FLOPs reduction is retried with half as many channels "
                        "(default: %(default)s)")
    p.add_argument("--cache-dir", default=None,
                   help="where the trained baseline + BAM models are kept and reused by a "
                        "later run with the same settings (default: a temporary folder, "
                        "deleted at the end)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write every raw measurement to this JSON file")
    p.add_argument("--out", default="docs/benchmarks.md",
                   help="markdown file whose '" + SECTION + "' section is written or replaced; "
                        "'-' prints it instead (default: %(default)s)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in args.models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    for kind in args.methods:
        if kind not in IMPORTANCES:
            parser.error(f"unknown method {kind!r}; choose from {', '.join(IMPORTANCES)}")
    if any(not 0 < t < 100 for t in args.targets):
        parser.error(f"--targets must be in (0, 100), got {args.targets}")
    args.targets = sorted(set(args.targets))
    if args.finetune_epochs < 0 or args.baseline_epochs < 0 or args.attention_epochs < 0:
        parser.error("epoch counts must be >= 0")
    if not 0 < args.step_fraction < 1:
        parser.error(f"--step-fraction must be in (0, 1), got {args.step_fraction}")
    if args.calibration_batches < 1:
        parser.error("--calibration-batches must be >= 1")
    if args.bn_batches < 0:
        parser.error("--bn-batches must be >= 0")
    if args.overshoot < 0:
        parser.error("--overshoot must be >= 0")
    return args


def command_line(args: argparse.Namespace) -> str:
    """The exact command, every setting spelled out."""
    parts = ["python", "benchmarks/importance.py",
             "--models", *args.models, "--seeds", *map(str, args.seeds),
             "--targets", *(f"{t:g}" for t in args.targets), "--methods", *args.methods,
             "--finetune-epochs", str(args.finetune_epochs),
             "--finetune-lr", f"{args.finetune_lr:g}",
             "--baseline-epochs", str(args.baseline_epochs),
             "--attention-epochs", str(args.attention_epochs), "--lr", f"{args.lr:g}",
             "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
             "--step-fraction", f"{args.step_fraction:g}",
             "--calibration-batches", str(args.calibration_batches),
             "--bn-batches", str(args.bn_batches), "--overshoot", f"{args.overshoot:g}",
             "--out", args.out]
    return shlex.join(parts)


# ---------------------------------------------------------------- measurements


@dataclass
class Snapshot:
    target: float
    model: nn.Module
    flops: int
    params: int
    steps: int


@dataclass
class Trajectory:
    snapshots: list[Snapshot] = field(default_factory=list)
    score_s: list[float] = field(default_factory=list)
    surgery_s: list[float] = field(default_factory=list)
    stop: str = "targets_reached"


def _graph_and_groups(model: nn.Module, spec, input_shape):
    device = next(model.parameters()).device
    graph = build_graph(model, torch.zeros(1, *input_shape, device=device))
    return graph, find_groups(model, graph, spec.classifier(model), spec.stage_of)


def prune_trajectory(model: nn.Module, model_name: str, input_shape, kind: str, seed: int,
                     targets: Sequence[float], baseline_flops: int, runner: LocalRunner,
                     step_fraction: float, calibration_batches: int,
                     overshoot: float = 1.0) -> Trajectory:
    """Prune `model` step by step (re-scoring each step, no fine-tuning) and keep a copy at
    the first step whose FLOPs reduction reaches each target.

    A step that would overshoot the next target by more than `overshoot` percentage points is
    retried on the same scores with half as many channels (down to one), so that every method
    lands on each target within about one point (a single residual-stream channel can still
    cost ~2 % of a CIFAR ResNet's MACs). Only the accepted attempt is timed.
    """
    spec = get_spec(model_name)
    limits = PruneLimits()
    seed_everything(seed)
    original = group_widths(_graph_and_groups(model, spec, input_shape)[1])
    base_m = max(1, round(step_fraction * sum(original.values())))
    flops = count_flops(model, input_shape)
    traj = Trajectory()
    pending = list(targets)
    step = 0
    while pending:
        step += 1
        # The groups are found again on the pruned candidate below; that build is the one
        # timed as surgery (the library's loop builds one graph per round).
        groups = _graph_and_groups(model, spec, input_shape)[1]
        t1 = time.perf_counter()
        scores = compute_scores(kind, model, groups,
                                runner.calibration_batches(calibration_batches),
                                seed=seed * 100_003 + step)
        score_s = time.perf_counter() - t1
        del groups
        floor = baseline_flops * (1 - (pending[0] + overshoot) / 100)
        m = base_m
        while True:
            candidate = copy.deepcopy(model)
            t2 = time.perf_counter()
            graph, groups = _graph_and_groups(candidate, spec, input_shape)
            chosen = select_channels(groups, scores, m, limits, original)
            removed = remove_channels(graph, groups, chosen) if chosen else 0
            surgery_s = time.perf_counter() - t2
            del graph, groups
            new_flops = count_flops(candidate, input_shape)
            if removed and new_flops < floor and m > 1:
                m = max(1, m // 2)  # overshoot: retry smaller on the same scores
                continue
            break
        traj.score_s.append(score_s)
        traj.surgery_s.append(surgery_s)  # the accepted attempt only
        if removed == 0:
            traj.stop = "nothing_prunable"
            break
        model, flops = candidate, new_flops
        while pending and flops <= baseline_flops * (1 - pending[0] / 100):
            traj.snapshots.append(Snapshot(pending.pop(0), copy.deepcopy(model), flops,
                                           count_params(model), step))
    return traj


def recalibrate_bn(model: nn.Module, runner: LocalRunner, batches: int) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics (cumulative average), no gradients."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    device = next(model.parameters()).device
    was_training = model.training
    model.train()
    with torch.no_grad():
        for x in runner.calibration_batches(batches):
            model(x.to(device))
    model.train(was_training)
    return model


def timed_fit(runner: LocalRunner, model: nn.Module, epochs: int, lr: float, seed: int,
              label: str) -> float:
    """Fine-tune with a fixed data order; returns seconds per epoch."""
    seed_everything(seed)
    start = time.perf_counter()
    runner.fit(model, epochs, lr, label=label)
    return (time.perf_counter() - start) / max(epochs, 1)


def run(args: argparse.Namespace) -> dict:
    data_cfg = DataConfig("digits", image_size=args.image_size)
    info = dataset_info(data_cfg)
    input_shape = (info.channels, info.image_size, info.image_size)
    train_set, test_set = build_datasets(data_cfg)
    results: dict = {"settings": vars(args).copy(), "prepared": [], "trajectories": [],
                     "points": []}
    temp = None
    cache_root = args.cache_dir
    if cache_root is None:
        temp = tempfile.TemporaryDirectory(prefix="ccpcsa-bench-")
        cache_root = temp.name
    started = time.perf_counter()
    try:
        for model_name in args.models:
            for seed in args.seeds:
                _run_model_seed(args, results, model_name, seed, input_shape, info.num_classes,
                                train_set, test_set, cache_root)
    finally:
        if temp is not None:
            temp.cleanup()
    results["seconds"] = time.perf_counter() - started
    return results


def _run_model_seed(args, results, model_name, seed, input_shape, num_classes, train_set,
                    test_set, cache_root) -> None:
    runner = LocalRunner(train_set, test_set, TrainConfig(batch_size=args.batch_size,
                                                          lr=args.lr, seed=seed))
    prep_cfg = PrepareConfig(model_name, num_classes, input_shape, "digits",
                             args.baseline_epochs, args.attention_epochs, args.lr, seed)
    t = time.perf_counter()
    prepared = prepare(prep_cfg, runner, os.path.join(cache_root, f"{model_name}-seed{seed}"))
    bam_model = prepared.load_attention_model()
    bam_flops = count_flops(bam_model, input_shape)
    # One epoch of the unpruned BAM model: the denominator of the first (heaviest) round.
    unpruned_epoch = timed_fit(runner, copy.deepcopy(bam_model), 1, args.finetune_lr, seed,
                               "timing")
    results["prepared"].append({
        "model": model_name, "seed": seed, "baseline_accuracy": prepared.baseline_accuracy,
        "baseline_flops": prepared.baseline_flops, "baseline_params": prepared.baseline_params,
        "bam_accuracy": prepared.attention_accuracy, "bam_flops": bam_flops,
        "bam_params": count_params(bam_model), "unpruned_epoch_s": unpruned_epoch})
    _say(f"[{model_name} seed {seed}] baseline {prepared.baseline_accuracy:.2f}%, with BAM "
         f"{prepared.attention_accuracy:.2f}% ({time.perf_counter() - t:.0f}s; one epoch "
         f"{unpruned_epoch:.2f}s)")
    for kind in args.methods:  # warm-up, so no method's first step pays for lazy init
        groups = _graph_and_groups(bam_model, get_spec(model_name), input_shape)[1]
        compute_scores(kind, bam_model, groups, runner.calibration_batches(1), seed=seed)
    for kind in args.methods:
        t = time.perf_counter()
        traj = prune_trajectory(copy.deepcopy(bam_model), model_name, input_shape, kind, seed,
                                args.targets, prepared.baseline_flops, runner,
                                args.step_fraction, args.calibration_batches, args.overshoot)
        epochs_s = []
        for snap in traj.snapshots:
            before = runner.evaluate(snap.model)
            seed_everything(seed)
            before_bn = (runner.evaluate(recalibrate_bn(copy.deepcopy(snap.model), runner,
                                                        args.bn_batches))
                         if args.bn_batches else None)
            epoch_s = timed_fit(runner, snap.model, args.finetune_epochs, args.finetune_lr,
                                seed, f"{kind} {snap.target:g}%")
            after = runner.evaluate(snap.model)
            epochs_s.append(epoch_s)
            point = {"model": model_name, "seed": seed, "method": kind,
                     "target": snap.target, "steps": snap.steps, "flops": snap.flops,
                     "params": snap.params,
                     "reduction": 100 * (1 - snap.flops / prepared.baseline_flops),
                     "reduction_vs_bam": 100 * (1 - snap.flops / bam_flops),
                     "params_reduction": 100 * (1 - snap.params / prepared.baseline_params),
                     "acc_before": before, "acc_before_bn": before_bn, "acc_after": after,
                     "finetune_epoch_s": epoch_s}
            results["points"].append(point)
            _say(f"[{model_name} seed {seed}] {kind:>9} target {snap.target:g}%: reached "
                 f"{point['reduction']:.1f}% after {snap.steps} steps, acc {before:.2f}% "
                 f"(BN re-estimated {_pct(before_bn)}) -> {after:.2f}% after "
                 f"{args.finetune_epochs} FT epochs")
        for target in args.targets[len(traj.snapshots):]:
            _say(f"[{model_name} seed {seed}] {kind:>9} target {target:g}%: NOT reached "
                 f"({traj.stop})")
        results["trajectories"].append({
            "model": model_name, "seed": seed, "method": kind, "steps": len(traj.score_s),
            "stop": traj.stop, "score_s": traj.score_s, "surgery_s": traj.surgery_s,
            "finetune_epoch_s": statistics.median(epochs_s) if epochs_s else None,
            "unpruned_epoch_s": unpruned_epoch, "seconds": time.perf_counter() - t})


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def _say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------- report


def _ms(values: Sequence[float], digits: int = 2) -> str:
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import torch_pruning

        tp_version = torch_pruning.__version__
    except (ImportError, AttributeError):
        tp_version = "unknown"
    return {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "torch_pruning": tp_version,
            "python": platform.python_version(),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def render(results: dict, args: argparse.Namespace, host: dict) -> str:
    lines = [SECTION, ""]
    lines += [
        "Each criterion prunes the same trained BAM model (per seed) step by step — every step "
        "re-scores the current model and physically removes the m lowest-ranked channels "
        f"(m = {args.step_fraction:.0%} of the original prunable channels, smaller near a "
        "target), with **no fine-tuning between steps** — and stops at the first step whose "
        "FLOPs reduction reaches the target. FLOPs are MACs, the reduction is relative to the "
        "**baseline model without BAM** (as in the paper's tables); the pruned models keep "
        "their BAM modules and those are counted. Each snapshot is then fine-tuned "
        f"{args.finetune_epochs} epochs (SGD lr {args.finetune_lr:g}, cosine, the same data "
        "order for every method) and evaluated on the 360-image digits test split. "
        f"Cells: top-1 % after fine-tuning, mean ± std over seeds {args.seeds} "
        "(in parentheses: right after pruning, before fine-tuning). Bold: best mean after "
        "fine-tuning in its column.",
        "",
    ]
    points = results["points"]
    for model_name in args.models:
        prep = [p for p in results["prepared"] if p["model"] == model_name]
        if not prep:
            continue
        lines += [f"### {model_name}", ""]
        lines.append(
            f"Baseline {_ms([p['baseline_accuracy'] for p in prep])} % top-1, "
            f"{prep[0]['baseline_flops'] / 1e6:.2f} M MACs, "
            f"{prep[0]['baseline_params'] / 1e6:.3f} M params; with BAM "
            f"{_ms([p['bam_accuracy'] for p in prep])} %, {prep[0]['bam_flops'] / 1e6:.2f} M "
            f"MACs, {prep[0]['bam_params'] / 1e6:.3f} M params (input 3×{args.image_size}×"
            f"{args.image_size}).")
        lines.append("")
        header = "| method | " + " | ".join(f"−{t:g} % FLOPs" for t in args.targets) + " |"
        rule = "|---" * (len(args.targets) + 1) + "|"
        lines += [header, rule]
        lines += _accuracy_rows(points, model_name, args, "acc_after", "acc_before")
        if any(p.get("acc_before_bn") is not None for p in points):
            lines += ["", f"Right after pruning, before fine-tuning, with BatchNorm statistics "
                      f"re-estimated on {args.bn_batches} training batches (no weight update; "
                      "this separates which channels were kept from the stale statistics "
                      "that drag the raw numbers in parentheses above down). Bold: best mean.",
                      "", header, rule]
            lines += _accuracy_rows(points, model_name, args, "acc_before_bn", None)
        lines += ["", "Achieved FLOPs reduction vs the baseline, mean (min–max) over seeds; "
                  "params reduction in brackets:", ""]
        lines += [header.replace("−", "target −"), "|---" * (len(args.targets) + 1) + "|"]
        for kind in args.methods:
            cells = []
            for t in args.targets:
                red = _values(points, model_name, kind, t, "reduction")
                par = _values(points, model_name, kind, t, "params_reduction")
                cells.append(f"{statistics.fmean(red):.1f} % ({min(red):.1f}–{max(red):.1f}) "
                             f"[{statistics.fmean(par):.1f} %]" if red else "n/a")
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _timing_table(results, args)
    lines += _summary(results, args)
    lines += [
        "### How it was run", "",
        "```", command_line(args), "```", "",
        f"Machine: {host['nproc']} CPU cores ({host['cpu']}), {host['device']}, torch "
        f"{host['torch']} ({host['torch_threads']} threads), torch-pruning "
        f"{host['torch_pruning']}, Python {host['python']}. Wall time of the whole run: "
        f"{results['seconds'] / 60:.1f} min.",
        "",
    ]
    return "\n".join(lines)


def _values(points, model_name, kind, target, key) -> list[float]:
    return [p[key] for p in points if p["model"] == model_name and p["method"] == kind
            and p["target"] == target and p.get(key) is not None]


def _accuracy_rows(points, model_name, args, key: str, paren: str | None) -> list[str]:
    """One row per method: mean ± std of `key` (best mean in bold), `paren` in brackets."""
    best = {}
    for t in args.targets:
        means = {k: statistics.fmean(v) for k in args.methods
                 if (v := _values(points, model_name, k, t, key))}
        best[t] = max(means, key=means.get) if means else None
    rows = []
    for kind in args.methods:
        cells = []
        for t in args.targets:
            values = _values(points, model_name, kind, t, key)
            if not values:
                cells.append("not reached")
                continue
            text = _ms(values)
            if best[t] == kind:
                text = f"**{text}**"
            if paren:
                text += f" ({_ms(_values(points, model_name, kind, t, paren))})"
            cells.append(text)
        rows.append(f"| {kind} | " + " | ".join(cells) + " |")
    return rows


def _timing_table(results: dict, args: argparse.Namespace) -> list[str]:
    lines = [
        "### Time of scoring + surgery vs one fine-tune epoch", "",
        "Per pruning step: scoring = `compute_scores` (calibration forward passes for the "
        f"data-driven criteria, {args.calibration_batches} batches of {args.batch_size}); "
        "surgery = dependency-graph build + `find_groups` + `select_channels` + "
        "`remove_channels`. FLOPs bookkeeping is excluded. Per seed the medians over the "
        "trajectory's steps are taken (the CPU was shared, medians resist the stalls); "
        "*step / epoch* divides the median step by the median fine-tune epoch of the "
        "pruned models of the same method and seed; *first step / unpruned epoch* divides "
        "the first (heaviest) step by one epoch of the unpruned BAM model. Target: "
        f"< {OVERHEAD_TARGET:g} %. Mean ± std over seeds.", "",
        "| model | method | steps to reach all targets | score ms / step | surgery ms / step "
        "| FT epoch s | step / epoch | first step / unpruned epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model_name in args.models:
        for kind in args.methods:
            trajs = [t for t in results["trajectories"]
                     if t["model"] == model_name and t["method"] == kind]
            if not trajs:
                continue
            steps = [t["steps"] for t in trajs]
            score = [1000 * statistics.median(t["score_s"]) for t in trajs]
            surgery = [1000 * statistics.median(t["surgery_s"]) for t in trajs]
            epoch = [t["finetune_epoch_s"] for t in trajs if t["finetune_epoch_s"]]
            step_ratio = [100 * statistics.median(a + b for a, b in zip(t["score_s"],
                                                                        t["surgery_s"],
                                                                        strict=True))
                          / t["finetune_epoch_s"] for t in trajs if t["finetune_epoch_s"]]
            first_ratio = [100 * (t["score_s"][0] + t["surgery_s"][0]) / t["unpruned_epoch_s"]
                           for t in trajs]
            lines.append(f"| {model_name} | {kind} | {_ms(steps, 1)} | {_ms(score, 0)} | "
                         f"{_ms(surgery, 0)} | {_ms(epoch)} | {_ms(step_ratio, 1)} % | "
                         f"{_ms(first_ratio, 1)} % |")
    lines.append("")
    return lines


def _summary(results: dict, args: argparse.Namespace) -> list[str]:
    """Generated from the numbers above, so a re-run cannot leave a stale conclusion."""
    noise = 100 / TEST_IMAGES
    lines = ["### What won", ""]
    points = results["points"]
    for model_name in args.models:
        parts = []
        for t in args.targets:
            ranked = sorted(((statistics.fmean(v), k) for k in args.methods
                             if (v := _values(points, model_name, k, t, "acc_after"))),
                            reverse=True)
            key = ("acc_before_bn" if _values(points, model_name, args.methods[0], t,
                                              "acc_before_bn") else "acc_before")
            ranked_before = sorted(((statistics.fmean(v), k) for k in args.methods
                                    if (v := _values(points, model_name, k, t, key))),
                                   reverse=True)
            if not ranked:
                continue
            (top, winner), rest = ranked[0], ranked[1:]
            if rest:
                gap = top - rest[0][0]
                verdict = ("a clear margin" if gap > 1.0 else
                           "within noise, ≤ 1 point")
                text = (f"−{t:g} %: {winner} {top:.2f} %, ahead of {rest[0][1]} by "
                        f"{gap:.2f} points ({verdict})")
            else:
                text = f"−{t:g} %: {winner} {top:.2f} %"
            if ranked_before:
                how = " (BN re-estimated)" if key == "acc_before_bn" else ""
                text += (f"; before fine-tuning{how} {ranked_before[0][1]} led "
                         f"({ranked_before[0][0]:.2f} %)")
            parts.append(text)
        if parts:
            lines.append(f"- **{model_name}** after fine-tuning — " + "; ".join(parts) + ".")
    lines += [
        "",
        f"Caveats: the digits test split has {TEST_IMAGES} images, so one image is "
        f"{noise:.2f} points and differences within about one point (or within the seed std) "
        "are noise. Digits are an easy 10-class task at 16×16 pixels, where even heavily "
        "pruned ResNets recover most accuracy in a few epochs, so the after-fine-tuning "
        "columns compress the differences between criteria; the before-fine-tuning numbers "
        "show the criterion's quality more directly. A digits epoch (1437 images) is tiny, "
        "so the overhead ratios are pessimistic: scoring streams a fixed number of "
        "calibration batches and the graph build is independent of the data set, while an "
        "epoch on CIFAR or ImageNet is 35–900× longer. Timings were taken on a shared "
        "CPU and are indicative only.",
        "",
    ]
    return lines


def write_section(path: str, text: str) -> None:
    """Write `text` (starting with SECTION) into `path`, replacing only that section."""
    sections.write_section(path, SECTION, text)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    host = machine()
    _say(f"benchmarking {', '.join(args.methods)} on {', '.join(args.models)}, seeds "
         f"{args.seeds}, targets {args.targets} ({host['nproc']} cores, torch {host['torch']})")
    results = run(args)
    results["machine"] = host
    text = render(results, args, host)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=str)
    if args.out == "-":
        print(text)
    else:
        write_section(args.out, text)
        _say(f"wrote the '{SECTION}' section of {args.out} ({results['seconds'] / 60:.1f} min)")
    return 0


__all__ = ["Snapshot", "Trajectory", "build_parser", "main", "prune_trajectory", "render",
           "run", "write_section"]

if __name__ == "__main__":
    sys.exit(main())
