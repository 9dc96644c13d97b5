"""Benchmark: channel-importance criteria x allocation policies at equal FLOPs reduction.

For each model and seed, steps 1-2 of Algorithm 1 run once (baseline, then BAM inserted and
trained). From that same BAM model every cell (criterion x allocation) prunes step by step:
each step scores the current model on unaugmented calibration batches, removes m channels
(allocation, then the lowest scores) and re-estimates BatchNorm on training batches (no
weight update), with no fine-tuning between steps, until the FLOPs reduction first reaches
each target. At each target the snapshot (BN re-estimated) is evaluated on the whole test
split ("right after pruning"); at the fine-tune targets it is then fine-tuned for the same
epochs with the same learning rate and data order for every cell, and evaluated again.

FLOPs are multiply-accumulates (ccpcsa.flops), the reduction is relative to the baseline
model without BAM, as in the paper's tables; pruned models keep their BAM modules, counted.
One trajectory per (model, seed, cell) serves every target (no fine-tuning between steps).

Resumable: every finished cell is saved to <cache-dir>/cells.json (and stage 0 to
<cache-dir>/<model>-seed<seed>/), so an interrupted run started again with the same command
continues where it stopped; a cache made with other settings is refused. --render-only writes
the report from the cached cells alone (cells not run are listed), e.g. for part of a grid.

Usage: python benchmarks/importance.py --help   (the documented commands: docs/benchmarks.md)
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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.utils.data import Subset

from ccpcsa.data import DataConfig, build_datasets, dataset_info
from ccpcsa.flops import count_flops, count_params
from ccpcsa.importance import DEFAULT_IMPORTANCE, IMPORTANCES, compute_scores
from ccpcsa.loop import PrepareConfig, prepare
from ccpcsa.models import MODELS, get_spec
from ccpcsa.prune import ALLOCATIONS, PruneLimits, group_widths
from ccpcsa.pruner import Pruner
from ccpcsa.train import LocalRunner, TrainConfig, seed_everything

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/sections.py
import sections  # noqa: E402

SECTIONS = {"digits": "## Importance criteria at equal FLOPs",
            "fashion-mnist": "## Importance criteria at equal FLOPs on Fashion-MNIST"}
DEFAULT_CELL = (DEFAULT_IMPORTANCE, "uniform")  # the library's default configuration
PAPER_CELL = ("ccpcsa", "uniform")  # the paper's criterion, under the default allocation
CORRELATION_VARIANTS = ("ccpcsa", "maxcorr", "dedup")  # strength x a redundancy term
CACHE_FILE = "cells.json"
# The default grid is reduced to about 1.5 h on 2 idle cores (docs/benchmarks.md): global
# allocation for the criteria that answer the allocation question, LAMP (whose normaliser
# only matters globally) and random.
REDUCED_GLOBAL = ("ccpcsa", "strength", "l1", "lamp", "random")
# Settings that change what a cell measures; a cache made with others is refused.
CELL_SETTINGS = ("dataset", "data_root", "image_size", "train_subset", "targets",
                 "finetune_targets", "finetune_epochs", "finetune_lr", "baseline_epochs",
                 "attention_epochs", "lr", "batch_size", "step_fraction",
                 "calibration_batches", "bn_batches", "overshoot")


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/importance.py",
        description="Compare channel-importance criteria under each allocation policy at "
                    "equal FLOPs reduction: top-1 right after pruning (BatchNorm re-"
                    "estimated) and after equal fine-tuning, paired per seed. Writes the "
                    "dataset's section of --out; resumable through --cache-dir.")
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(SECTIONS),
                   help="data set (default: %(default)s)")
    p.add_argument("--data-root", default=None,
                   help="fashion-mnist folder (default: /usr/share/datasets/fashion-mnist)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input side in pixels (default: the dataset's, 28 / digits 16)")
    p.add_argument("--train-subset", type=int, default=6000, metavar="N",
                   help="train and fine-tune on a fixed random N images of the training "
                        "split (the same for every seed and cell; 0 = all); the test split "
                        "is always whole (default: %(default)s)")
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"],
                   help=f"architectures, any of {', '.join(MODELS)} (default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="seeds; each trains its own baseline + BAM model and fixes the "
                        "fine-tune data order shared by every cell (default: %(default)s)")
    p.add_argument("--targets", nargs="+", type=float, default=[30.0, 50.0, 70.0],
                   help="FLOPs reductions in percent of the baseline (no-BAM) model's MACs "
                        "(default: %(default)s)")
    p.add_argument("--finetune-targets", nargs="+", type=_target_or_all, default=[50.0, 70.0],
                   help="targets whose snapshots are also fine-tuned; 'all' = every target "
                        "(default: %(default)s)")
    p.add_argument("--criteria", nargs="+", default=list(IMPORTANCES),
                   help=f"importance criteria, any of {', '.join(IMPORTANCES)} "
                        "(default: all)")
    p.add_argument("--allocations", nargs="+", default=["uniform", "global"],
                   help=f"allocation policies, any of {', '.join(ALLOCATIONS)} "
                        "(default: %(default)s)")
    p.add_argument("--global-criteria", nargs="+", default=list(REDUCED_GLOBAL),
                   help="run the allocations other than uniform only for these criteria; "
                        "'all' = every criterion (default: %(default)s)")
    p.add_argument("--finetune-epochs", type=int, default=1,
                   help="fine-tune epochs at each fine-tune target, identical for every cell "
                        "(default: %(default)s)")
    p.add_argument("--finetune-lr", type=float, default=0.01,
                   help="SGD learning rate of that fine-tune, cosine-annealed "
                        "(default: %(default)s)")
    p.add_argument("--baseline-epochs", type=int, default=10,
                   help="step 1: epochs to train the model without BAM (default: %(default)s)")
    p.add_argument("--attention-epochs", type=int, default=3,
                   help="step 2: epochs to train the model with BAM (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.05,
                   help="SGD learning rate of steps 1-2 (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="batch size of training and calibration (default: %(default)s)")
    p.add_argument("--step-fraction", type=float, default=0.03,
                   help="m: channels removed per pruning step, as a fraction of the model's "
                        "original prunable channels; smaller near a target "
                        "(default: %(default)s)")
    p.add_argument("--calibration-batches", type=int, default=4,
                   help="training batches (random, unaugmented) that channels are scored on "
                        "each step (default: %(default)s)")
    p.add_argument("--bn-batches", type=int, default=8,
                   help="training batches BatchNorm is re-estimated on after each step "
                        "(default: %(default)s)")
    p.add_argument("--overshoot", type=float, default=1.0,
                   help="a step that would pass a target by more than this many points of "
                        "FLOPs reduction is retried with half as many channels "
                        "(default: %(default)s)")
    p.add_argument("--cache-dir", default=None,
                   help="stage-0 models and finished cells, reused by a later run with the "
                        "same settings (default: runs/bench-importance-<dataset>)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write every raw measurement to this JSON file")
    p.add_argument("--out", default="docs/benchmarks.md",
                   help="markdown file whose section is written or replaced; '-' prints it "
                        "(default: %(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the grid (stage-0 runs, cells, fine-tunes) and exit")
    p.add_argument("--heading", default=None,
                   help="title of the section written into --out (default: the dataset's, "
                        "e.g. 'Importance criteria at equal FLOPs on Fashion-MNIST'); another "
                        "title writes a section of its own beside it")
    p.add_argument("--render-only", action="store_true",
                   help="write the report from the cells already in --cache-dir and run "
                        "nothing; cells of the grid that are not there are listed as not run "
                        "(e.g. to report the finished part of a long grid)")
    return p


def _target_or_all(text: str) -> float | str:
    return "all" if text == "all" else float(text)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in args.models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if args.global_criteria == ["all"]:
        args.global_criteria = list(args.criteria)
    for kind in [*args.criteria, *args.global_criteria]:
        if kind not in IMPORTANCES:
            parser.error(f"unknown criterion {kind!r}; choose from {', '.join(IMPORTANCES)}")
    for allocation in args.allocations:
        if allocation not in ALLOCATIONS:
            parser.error(f"unknown allocation {allocation!r}; choose from "
                         f"{', '.join(ALLOCATIONS)}")
    if any(not 0 < t < 100 for t in args.targets):
        parser.error(f"--targets must be in (0, 100), got {args.targets}")
    args.targets = sorted(set(args.targets))
    if "all" in args.finetune_targets:
        args.finetune_targets = list(args.targets)
    args.finetune_targets = sorted(set(args.finetune_targets))
    if not set(args.finetune_targets) <= set(args.targets):
        parser.error("--finetune-targets must be among --targets")
    if min(args.finetune_epochs, args.baseline_epochs, args.attention_epochs,
           args.train_subset) < 0:
        parser.error("epoch counts and --train-subset must be >= 0")
    if not 0 < args.step_fraction < 1:
        parser.error(f"--step-fraction must be in (0, 1), got {args.step_fraction}")
    if args.calibration_batches < 1 or args.bn_batches < 1:
        parser.error("--calibration-batches and --bn-batches must be >= 1")
    if args.overshoot < 0:
        parser.error("--overshoot must be >= 0")
    args.cache_dir = args.cache_dir or os.path.join("runs", f"bench-importance-{args.dataset}")
    return args


def cells_of(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(criterion, allocation) pairs: every criterion under uniform, the others as asked."""
    wider = set(args.global_criteria)
    return [(kind, allocation) for allocation in args.allocations for kind in args.criteria
            if allocation == "uniform" or kind in wider]


def command_line(args: argparse.Namespace) -> str:
    """The exact command, every setting spelled out."""
    parts = ["python", "benchmarks/importance.py", "--dataset", args.dataset]
    if args.data_root:
        parts += ["--data-root", args.data_root]
    if args.image_size:
        parts += ["--image-size", str(args.image_size)]
    parts += ["--train-subset", str(args.train_subset), "--models", *args.models,
              "--seeds", *map(str, args.seeds), "--targets", *(f"{t:g}" for t in args.targets),
              "--finetune-targets", *(f"{t:g}" for t in args.finetune_targets),
              "--criteria", *args.criteria, "--allocations", *args.allocations]
    parts += ["--global-criteria", *args.global_criteria]
    parts += ["--finetune-epochs", str(args.finetune_epochs),
              "--finetune-lr", f"{args.finetune_lr:g}",
              "--baseline-epochs", str(args.baseline_epochs),
              "--attention-epochs", str(args.attention_epochs), "--lr", f"{args.lr:g}",
              "--batch-size", str(args.batch_size),
              "--step-fraction", f"{args.step_fraction:g}",
              "--calibration-batches", str(args.calibration_batches),
              "--bn-batches", str(args.bn_batches), "--overshoot", f"{args.overshoot:g}",
              "--out", args.out]
    if args.json:
        parts += ["--json", args.json]
    if args.heading:
        parts += ["--heading", args.heading]
    return shlex.join(parts)


# ---------------------------------------------------------------- the cache


def cell_key(model: str, seed: int, kind: str, allocation: str) -> str:
    return f"{model}|{seed}|{kind}|{allocation}"


class CellCache:
    """Finished cells and stage-0 records in <cache-dir>/cells.json, saved after each one."""

    def __init__(self, folder: str, args: argparse.Namespace) -> None:
        self.path = os.path.join(folder, CACHE_FILE)
        self.settings = {k: getattr(args, k) for k in CELL_SETTINGS}
        self.data: dict = {"settings": self.settings, "prepared": {}, "cells": {}}
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                stored = json.load(f)
            differs = [k for k in CELL_SETTINGS if stored["settings"].get(k) != self.settings[k]]
            if differs:
                raise SystemExit(f"error: {self.path} was made with other settings "
                                 f"({', '.join(differs)} differ); pass another --cache-dir")
            self.data = stored

    def save(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        temp = self.path + ".tmp"
        with open(temp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1)
        os.replace(temp, self.path)  # an interruption never leaves a half-written cache


# ---------------------------------------------------------------- measurements


@dataclass
class Snapshot:
    target: float
    model: nn.Module
    flops: int
    params: int
    steps: int
    widths: dict[str, int]


@dataclass
class Trajectory:
    snapshots: list[Snapshot] = field(default_factory=list)
    score_s: list[float] = field(default_factory=list)
    surgery_s: list[float] = field(default_factory=list)
    bn_s: list[float] = field(default_factory=list)
    stop: str = "targets_reached"


def _copy_to_prune(model: nn.Module, spec, input_shape, allocation: str,
                   original: dict[str, int]) -> tuple[Pruner, float]:
    """A Pruner on a copy of `model` (which stays as it is), traced; (it, seconds traced)."""
    pruner = Pruner(copy.deepcopy(model), spec, input_shape, limits=PruneLimits(),
                    allocation=allocation, original_widths=original)
    start = time.perf_counter()
    pruner.groups  # noqa: B018 - traced here, so that the trace is timed apart
    seconds = time.perf_counter() - start
    if allocation == "flops":
        pruner.channel_costs()  # not surgery time: the same costs for every attempt
    return pruner, seconds


def prune_trajectory(model: nn.Module, model_name: str, input_shape, kind: str,
                     allocation: str, seed: int, targets: Sequence[float],
                     baseline_flops: int, runner: LocalRunner, args: argparse.Namespace
                     ) -> Trajectory:
    """Prune `model` step by step (score, remove, re-estimate BN; no fine-tuning) and keep a
    copy at the first step whose FLOPs reduction reaches each target.

    A step that would overshoot the next target by more than `args.overshoot` points is
    retried on the same scores with half as many channels (down to one), so every cell lands
    on each target within about a point. Surgery time: graph build + selection + removal of
    the accepted attempt.
    """
    spec = get_spec(model_name)
    seed_everything(seed)
    original = Pruner(model, spec, input_shape).widths()
    base_m = max(1, round(args.step_fraction * sum(original.values())))
    traj = Trajectory()
    pending = list(targets)
    step = 0
    while pending:
        step += 1
        pruner, graph_s = _copy_to_prune(model, spec, input_shape, allocation, original)
        t0 = time.perf_counter()
        scores = compute_scores(kind, pruner.model, pruner.groups,
                                runner.calibration_batches(args.calibration_batches),
                                seed=seed * 100_003 + step)
        score_s = time.perf_counter() - t0
        floor = baseline_flops * (1 - (pending[0] + args.overshoot) / 100)
        m = base_m
        while True:
            done = pruner.step(scores, m)
            surgery_s = graph_s + done.seconds_remove
            new_flops = pruner.flops()
            if done.removed and new_flops < floor and m > 1:
                m = max(1, m // 2)  # overshoot: retry smaller on the same scores
                pruner, graph_s = _copy_to_prune(model, spec, input_shape, allocation, original)
                continue
            break
        if done.removed == 0:
            traj.stop = "nothing_prunable"
            break
        t2 = time.perf_counter()
        model = runner.recalibrate_bn(pruner.model, args.bn_batches)  # no stale BN when re-scoring
        traj.bn_s.append(time.perf_counter() - t2)
        traj.score_s.append(score_s)
        traj.surgery_s.append(surgery_s)
        while pending and new_flops <= baseline_flops * (1 - pending[0] / 100):
            traj.snapshots.append(Snapshot(pending.pop(0), copy.deepcopy(model), new_flops,
                                           count_params(model), step, done.widths))
    return traj


def timed_fit(runner: LocalRunner, model: nn.Module, epochs: int, lr: float, seed: int,
              label: str) -> float:
    """Fine-tune with a fixed data order; returns seconds per epoch."""
    seed_everything(seed)
    start = time.perf_counter()
    runner.fit(model, epochs, lr, label=label)
    return (time.perf_counter() - start) / max(epochs, 1)


def make_runner(args: argparse.Namespace, seed: int) -> tuple[LocalRunner, DataConfig]:
    data = DataConfig(args.dataset, args.data_root, args.image_size)
    train, test = build_datasets(data)
    calibration = build_datasets(replace(data, augment=False))[0]  # scored unaugmented
    if args.train_subset and args.train_subset < len(train):
        gen = torch.Generator().manual_seed(0)  # the same images for every seed
        keep = torch.randperm(len(train), generator=gen)[:args.train_subset].tolist()
        train, calibration = Subset(train, keep), Subset(calibration, keep)
    cfg = TrainConfig(batch_size=args.batch_size, lr=args.lr, seed=seed)
    return LocalRunner(train, test, cfg, calibration), data


def run(args: argparse.Namespace, cache: CellCache) -> dict:
    started = time.perf_counter()
    for model_name in args.models:
        for seed in args.seeds:
            todo = [c for c in cells_of(args)
                    if cell_key(model_name, seed, *c) not in cache.data["cells"]]
            if not todo:
                continue
            _run_model_seed(args, cache, model_name, seed, todo)
    cache.data["seconds_this_run"] = time.perf_counter() - started
    return cache.data


def _run_model_seed(args, cache: CellCache, model_name: str, seed: int, todo) -> None:
    runner, data = make_runner(args, seed)
    info = dataset_info(data)
    input_shape = (info.channels, info.image_size, info.image_size)
    prep_cfg = PrepareConfig(model_name, info.num_classes, input_shape, args.dataset,
                             args.baseline_epochs, args.attention_epochs, args.lr, seed,
                             data_root=args.data_root, batch_size=args.batch_size)
    t = time.perf_counter()
    prepared = prepare(prep_cfg, runner,
                       os.path.join(args.cache_dir, f"{model_name}-seed{seed}"))
    bam_model = prepared.load_attention_model()
    spec = get_spec(model_name)
    groups = Pruner(bam_model, spec, input_shape).groups
    residual = sorted(g.key for g in groups if g.is_residual)
    record = {"model": model_name, "seed": seed, "baseline_accuracy": prepared.baseline_accuracy,
              "baseline_flops": prepared.baseline_flops,
              "baseline_params": prepared.baseline_params,
              "bam_accuracy": prepared.attention_accuracy,
              "bam_flops": count_flops(bam_model, input_shape),
              "bam_params": count_params(bam_model), "residual_groups": residual,
              "original_widths": group_widths(groups)}
    cache.data["prepared"][f"{model_name}|{seed}"] = record
    cache.save()
    _say(f"[{model_name} seed {seed}] baseline {prepared.baseline_accuracy:.2f}%, with BAM "
         f"{prepared.attention_accuracy:.2f}% ({time.perf_counter() - t:.0f}s); "
         f"{len(todo)} cells to run")
    compute_scores("ccpcsa", bam_model, groups, runner.calibration_batches(1))  # warm-up
    for kind, allocation in todo:
        t = time.perf_counter()
        traj = prune_trajectory(copy.deepcopy(bam_model), model_name, input_shape, kind,
                                allocation, seed, args.targets, prepared.baseline_flops,
                                runner, args)
        points = []
        epochs_s = []
        for snap in traj.snapshots:
            pruned = runner.evaluate(snap.model)
            after = None
            if snap.target in args.finetune_targets and args.finetune_epochs:
                epochs_s.append(timed_fit(runner, snap.model, args.finetune_epochs,
                                          args.finetune_lr, seed,
                                          f"{kind} {allocation} {snap.target:g}%"))
                after = runner.evaluate(snap.model)
            points.append({
                "target": snap.target, "steps": snap.steps, "flops": snap.flops,
                "params": snap.params,
                "reduction": 100 * (1 - snap.flops / prepared.baseline_flops),
                "params_reduction": 100 * (1 - snap.params / prepared.baseline_params),
                "acc_pruned": pruned, "acc_after": after,
                "residual_kept": _kept(snap.widths, record, residual),
                "inner_kept": _kept(snap.widths, record,
                                    [k for k in snap.widths if k not in residual])})
            _say(f"[{model_name} seed {seed}] {kind:>9} {allocation:>7} −{snap.target:g}%: "
                 f"reached {points[-1]['reduction']:.1f}% in {snap.steps} steps, "
                 f"{pruned:.2f}% right after pruning -> {_pct(after)} after "
                 f"{args.finetune_epochs} FT epochs (residual streams kept "
                 f"{points[-1]['residual_kept']:.2f})")
        for target in args.targets[len(traj.snapshots):]:
            _say(f"[{model_name} seed {seed}] {kind:>9} {allocation:>7} −{target:g}%: "
                 f"NOT reached ({traj.stop})")
        cache.data["cells"][cell_key(model_name, seed, kind, allocation)] = {
            "model": model_name, "seed": seed, "method": kind, "allocation": allocation,
            "points": points, "stop": traj.stop, "score_s": traj.score_s,
            "surgery_s": traj.surgery_s, "bn_s": traj.bn_s,
            "finetune_epoch_s": statistics.median(epochs_s) if epochs_s else None,
            "seconds": time.perf_counter() - t}
        cache.save()


def _kept(widths: dict[str, int], record: dict, keys: Sequence[str]) -> float:
    original = record["original_widths"]
    return statistics.fmean(widths[k] / original[k] for k in keys) if keys else float("nan")


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
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    import torch_pruning

    return {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "torch_pruning": getattr(torch_pruning, "__version__", "unknown"),
            "python": platform.python_version(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "load": os.getloadavg()[0]}


class Table:
    """Per-seed values of one metric, by (model, cell, target)."""

    def __init__(self, results: dict, key: str) -> None:
        self.by: dict[tuple, dict[int, float]] = {}
        for cell in results["cells"].values():
            for p in cell["points"]:
                if p.get(key) is not None:
                    where = (cell["model"], (cell["method"], cell["allocation"]), p["target"])
                    self.by.setdefault(where, {})[cell["seed"]] = p[key]

    def values(self, model: str, cell: tuple[str, str], target: float) -> dict[int, float]:
        return self.by.get((model, cell, target), {})

    def mean(self, model: str, cell: tuple[str, str], target: float) -> float | None:
        v = self.values(model, cell, target)
        return statistics.fmean(v.values()) if v else None


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, int, int, float] | None:
    """Mean of a - b over shared seeds, seeds where a > b, shared seeds, and the standard
    error of that mean (0 with one seed)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
    return statistics.fmean(diffs), sum(d > 0 for d in diffs), len(diffs), se


def within_noise(diff: tuple[float, int, int, float], floor: float) -> bool:
    """A paired difference is noise when within two standard errors, or within `floor`
    points (two binomial standard errors of one test-split evaluation)."""
    return abs(diff[0]) <= max(2 * diff[3], floor)


def heading_of(args: argparse.Namespace) -> str:
    return f"## {args.heading}" if args.heading else SECTIONS[args.dataset]


def _label(cell: tuple[str, str]) -> str:
    return f"{cell[0]} · {cell[1]}"


def render(results: dict, args: argparse.Namespace, host: dict) -> str:
    section = heading_of(args)
    test_images = results.get("test_images", 0)
    cells = cells_of(args)
    pruned, after = Table(results, "acc_pruned"), Table(results, "acc_after")
    finetuned = (f" — and at {', '.join(f'−{t:g} %' for t in args.finetune_targets)} also "
                 f"fine-tuned {args.finetune_epochs} epoch(s) (SGD lr {args.finetune_lr:g}, "
                 "cosine, the same data order in every cell) and evaluated again"
                 if args.finetune_epochs else "")
    lines = [section, "", (
        f"Every cell (criterion · allocation) prunes the same trained BAM model per seed, step "
        f"by step: score on {args.calibration_batches} random unaugmented training batches, "
        f"remove m channels (m = {args.step_fraction:.0%} of the prunable channels, smaller "
        f"near a target), re-estimate BatchNorm on {args.bn_batches} training batches; no "
        "fine-tuning between steps. At the first step past each FLOPs target (MACs, relative "
        "to the baseline without BAM; BAM is kept and counted) the model is evaluated on the "
        f"whole test split ({test_images} images) — *right after pruning*{finetuned}. "
        "Allocation: *uniform* = every layer the "
        "same fraction of its width, the criterion ranks channels within a layer; *global* "
        "= the lowest mean-normalised scores over all layers (LAMP: its own normaliser); "
        "*flops* = global, per MAC saved. Baselines are Torch-Pruning's importances. Cells: "
        f"mean ± std over seeds {args.seeds}; bold = best mean in the column."), ""]
    lines += _reductions(results, args)
    for model_name in args.models:
        prep = [p for k, p in results["prepared"].items() if k.split("|")[0] == model_name
                and int(k.split("|")[1]) in args.seeds]
        if not prep:
            continue
        lines += [f"### {model_name}", "",
                  f"Baseline {_ms([p['baseline_accuracy'] for p in prep])} % top-1, "
                  f"{prep[0]['baseline_flops'] / 1e6:.2f} M MACs, "
                  f"{prep[0]['baseline_params'] / 1e6:.3f} M params; with BAM "
                  f"{_ms([p['bam_accuracy'] for p in prep])} %, "
                  f"{prep[0]['bam_flops'] / 1e6:.2f} M MACs.", ""]
        missing = cells_not_run(results, model_name, cells, args.seeds)
        if missing:
            lines += ["Not run for this model: " + _missing_text(missing, args.seeds) + ".", ""]
        ran = [c for c in cells if len(missing.get(c, ())) < len(args.seeds)]
        if args.finetune_epochs:
            lines += [f"After {args.finetune_epochs} fine-tune epochs:", ""]
            lines += _accuracy_table(after, model_name, ran, args.finetune_targets)
        lines += ["Right after pruning (BatchNorm re-estimated, no fine-tuning):", ""]
        lines += _accuracy_table(pruned, model_name, ran, args.targets)
        lines += _paired_table(after if args.finetune_epochs else pruned, model_name, ran,
                               args.finetune_targets if args.finetune_epochs else args.targets,
                               test_images)
        lines += _structure_table(results, model_name, ran, args)
    lines += _timing_table(results, args, cells)
    lines += _summary(results, args, cells, pruned, after, test_images)
    lines += [
        "### How it was run", "", "```", command_line(args), "```", "",
        f"Machine: {host['nproc']} CPU cores ({host['cpu']}), {host['device']}, torch "
        f"{host['torch']} ({host['torch_threads']} threads), torch-pruning "
        f"{host['torch_pruning']}, Python {host['python']}; load average at the end "
        f"{host['load']:.1f}. Sum of the cells' wall times: "
        f"{sum(c['seconds'] for c in results['cells'].values()) / 60:.1f} min (stage 0 "
        "not included; cells resumed from the cache keep their original times).", ""]
    return "\n".join(lines)


def cells_not_run(results: dict, model: str, cells, seeds) -> dict[tuple[str, str], list[int]]:
    """The grid's cells with no record in the cache for some seeds, and those seeds."""
    done = {(c["method"], c["allocation"], c["seed"]) for c in results["cells"].values()
            if c["model"] == model}
    missing = {cell: [s for s in seeds if (*cell, s) not in done] for cell in cells}
    return {cell: s for cell, s in missing.items() if s}


def _missing_text(missing: dict[tuple[str, str], list[int]], seeds) -> str:
    """'seeds 1, 2 of a, b; c' — cells grouped by the seeds they lack (none named = all)."""
    by_seeds: dict[tuple[int, ...], list[str]] = {}
    for cell, lacking in missing.items():
        by_seeds.setdefault(tuple(lacking), []).append(_label(cell))
    parts = []
    for lacking, labels in by_seeds.items():
        prefix = "" if len(lacking) == len(seeds) else (
            f"seed{'s' if len(lacking) > 1 else ''} {', '.join(map(str, lacking))} of ")
        parts.append(prefix + ", ".join(labels))
    return "; ".join(parts)


def _reductions(results: dict, args: argparse.Namespace) -> list[str]:
    """What this run leaves out of the full grid, said where its numbers are."""
    cut = []
    if results.get("train_images", 0) < results.get("train_split", 0):
        cut.append(f"stage 0 and fine-tuning train on a fixed random {results['train_images']} "
                   f"of the {results['train_split']} training images (the test split is "
                   "whole), so absolute accuracies are below full-data training")
    others = [a for a in args.allocations if a != "uniform"]
    wider = [k for k in args.criteria if k in set(args.global_criteria)]
    if others and wider != list(args.criteria):
        cut.append(f"{' and '.join(others)} allocation only for "
                   f"{', '.join(wider) or 'no criterion'}")
    if args.finetune_targets != args.targets and args.finetune_epochs:
        cut.append("fine-tuning only at " + ", ".join(f"−{t:g} %" for t in
                                                       args.finetune_targets))
    if not cut:
        return []
    return ["**Reduced grid:** " + "; ".join(cut) + ". The "
            "comparison between cells, on equal terms, is what is measured.", ""]


def _accuracy_table(table: Table, model: str, cells, targets) -> list[str]:
    lines = ["| criterion · allocation | " + " | ".join(f"−{t:g} % FLOPs" for t in targets)
             + " |", "|---" * (len(targets) + 1) + "|"]
    best = {t: max((c for c in cells if table.mean(model, c, t) is not None),
                   key=lambda c, t=t: table.mean(model, c, t), default=None) for t in targets}
    for cell in cells:
        row = []
        for t in targets:
            values = list(table.values(model, cell, t).values())
            text = _ms(values) if values else "not reached"
            row.append(f"**{text}**" if best[t] == cell and values else text)
        lines.append(f"| {_label(cell)} | " + " | ".join(row) + " |")
    return [*lines, ""]


def _paired_table(table: Table, model: str, cells, targets, test_images: int) -> list[str]:
    """The default configuration against every other cell, seed by seed."""
    if DEFAULT_CELL not in cells:
        return []
    lines = [f"Paired per seed: {_label(DEFAULT_CELL)} minus each cell, mean difference in "
             "points (seeds where it is ahead / seeds); *noise* = within two standard errors "
             f"of the paired difference or within {_floor(test_images):.2f} points:", "",
             "| cell | " + " | ".join(f"−{t:g} %" for t in targets) + " |",
             "|---" * (len(targets) + 1) + "|"]
    for cell in cells:
        if cell == DEFAULT_CELL:
            continue
        row = []
        for t in targets:
            diff = paired(table.values(model, DEFAULT_CELL, t), table.values(model, cell, t))
            if diff is None:
                row.append("n/a")
                continue
            noise = " noise" if within_noise(diff, _floor(test_images)) else ""
            row.append(f"{diff[0]:+.2f} ({diff[1]}/{diff[2]}){noise}")
        lines.append(f"| {_label(cell)} | " + " | ".join(row) + " |")
    return [*lines, ""]


def _structure_table(results: dict, model: str, cells, args) -> list[str]:
    target = args.targets[len(args.targets) // 2]
    lines = [f"At −{target:g} %: achieved FLOPs reduction (mean, min–max over seeds) and "
             "mean fraction of channels kept in residual streams vs inner layers:", "",
             "| cell | FLOPs↓ % | residual kept | inner kept |", "|---|---|---|---|"]
    for cell in cells:
        points = [p for c in results["cells"].values() if c["model"] == model
                  and (c["method"], c["allocation"]) == cell and c["seed"] in args.seeds
                  for p in c["points"] if p["target"] == target]
        if not points:
            continue
        red = [p["reduction"] for p in points]
        lines.append(f"| {_label(cell)} | {statistics.fmean(red):.1f} ({min(red):.1f}–"
                     f"{max(red):.1f}) | {statistics.fmean(p['residual_kept'] for p in points):.2f}"
                     f" | {statistics.fmean(p['inner_kept'] for p in points):.2f} |")
    return [*lines, ""]


def _timing_table(results: dict, args, cells) -> list[str]:
    lines = ["### Time per pruning step", "",
             f"Per step: scoring ({args.calibration_batches} calibration batches of "
             f"{args.batch_size}; taylor adds a backward pass), surgery (graph + selection + "
             f"removal), BatchNorm re-estimation ({args.bn_batches} batches); medians over the "
             "steps, mean over seeds; *step / epoch* = (score + surgery) over one fine-tune "
             "epoch of the same cell. The CPU was shared: indicative only.", "",
             "| model | cell | steps | score ms | surgery ms | BN ms | FT epoch s "
             "| step / epoch |", "|---|---|---|---|---|---|---|---|"]
    for model_name in args.models:
        for cell in cells:
            found = [c for c in results["cells"].values() if c["model"] == model_name
                     and (c["method"], c["allocation"]) == cell and c["seed"] in args.seeds
                     and c["score_s"]]
            if not found:
                continue
            med = {k: [1000 * statistics.median(c[k]) for c in found]
                   for k in ("score_s", "surgery_s", "bn_s")}
            epoch = [c["finetune_epoch_s"] for c in found if c["finetune_epoch_s"]]
            ratio = [100 * statistics.median(a + b for a, b in zip(c["score_s"], c["surgery_s"],
                                                                   strict=True))
                     / c["finetune_epoch_s"] for c in found if c["finetune_epoch_s"]]
            lines.append(f"| {model_name} | {_label(cell)} | "
                         f"{statistics.fmean(len(c['score_s']) for c in found):.0f} | "
                         f"{_ms(med['score_s'], 0)} | {_ms(med['surgery_s'], 0)} | "
                         f"{_ms(med['bn_s'], 0)} | {_ms(epoch)} | {_ms(ratio, 1)} % |")
    return [*lines, ""]


def _floor(test_images: int) -> float:
    """Two binomial standard errors of one evaluation at 90 % accuracy, in points."""
    return 2 * 100 * (0.9 * 0.1 / max(test_images, 1)) ** 0.5


def _summary(results, args, cells, pruned: Table, after: Table, test_images: int
             ) -> list[str]:
    """Generated from the numbers above, so a re-run cannot leave a stale conclusion."""
    table = after if args.finetune_epochs else pruned
    targets = args.finetune_targets if args.finetune_epochs else args.targets
    when = "after fine-tuning" if args.finetune_epochs else "right after pruning"
    floor = _floor(test_images)
    lines = ["### What the numbers say", ""]
    for model_name in args.models:
        for t in targets:
            ranked = sorted((c for c in cells if table.mean(model_name, c, t) is not None),
                            key=lambda c, t=t: -table.mean(model_name, c, t))
            if not ranked:
                continue
            best = ranked[0]
            text = (f"- **{model_name}, −{t:g} %** {when}: best {_label(best)} "
                    f"{table.mean(model_name, best, t):.2f} %")
            roles = {DEFAULT_CELL: "the default"}
            roles.setdefault(PAPER_CELL, "the paper's")  # one label when they are one cell
            if best in roles:
                text += f" ({roles[best]})"
            for cell, role in roles.items():
                if cell != best and cell in ranked:
                    diff = paired(table.values(model_name, cell, t),
                                  table.values(model_name, best, t))
                    verdict = "within noise of" if within_noise(diff, floor) else "below"
                    text += (f"; {role} {_label(cell)} "
                             f"{table.mean(model_name, cell, t):.2f} % is {verdict} it "
                             f"({diff[0]:+.2f}, ahead on {diff[1]}/{diff[2]} seeds)")
            random_cell = ("random", DEFAULT_CELL[1])
            diff = paired(table.values(model_name, DEFAULT_CELL, t),
                          table.values(model_name, random_cell, t))
            if diff:
                text += (f"; default vs {_label(random_cell)}: {diff[0]:+.2f}, ahead on "
                         f"{diff[1]}/{diff[2]} seeds")
            lines.append(text + ".")
    lines += ["", *_correlation_verdict(cells, args, pruned, after, floor), ""]
    return lines + _target_table(args, cells, table, targets, floor, when)


def _target_table(args, cells, table: Table, targets, floor: float, when: str) -> list[str]:
    """Which cells meet the default's target (best or within noise of the best in every
    model x target setting); only cells measured on every seed of every setting take part,
    so that the best is found among equals."""
    settings = [(m, t) for m in args.models for t in targets]
    full = [c for c in cells if all(len(table.values(m, c, t)) == len(args.seeds)
                                    for m, t in settings)]
    if len(full) < 2 or len(settings) < 2:
        return []
    best = {s: max(full, key=lambda c, s=s: table.mean(s[0], c, s[1])) for s in settings}
    rows = []
    for cell in full:
        marks, gaps, met = [], [], 0
        for s in settings:
            if cell == best[s]:
                marks.append("**best**")
                gaps.append(0.0)
                met += 1
                continue
            diff = paired(table.values(s[0], cell, s[1]), table.values(s[0], best[s], s[1]))
            noise = within_noise(diff, floor)
            met += noise
            gaps.append(diff[0])
            marks.append(f"{diff[0]:+.2f} ({diff[1]}/{diff[2]}){' noise' if noise else ''}")
        rows.append((-met, -min(gaps), cell, marks, met))
    lines = ["### Which cells are best or within noise of the best everywhere", "",
             f"{when[0].upper()}{when[1:]}, among the {len(full)} cells measured on all "
             f"{len(args.seeds)} seeds: each cell minus the best cell of the setting, paired "
             "per seed (seeds where it is ahead / seeds); sorted by settings met, then by the "
             "worst gap.", "",
             "| cell | " + " | ".join(f"{m} −{t:g} %" for m, t in settings)
             + " | best or within noise | worst gap |",
             "|---" * (len(settings) + 3) + "|"]
    for _, worst, cell, marks, met in sorted(rows, key=lambda r: r[:2]):
        lines.append(f"| {_label(cell)} | " + " | ".join(marks)
                     + f" | {met} of {len(settings)} | {-worst:+.2f} |")
    return [*lines, ""]


def _correlation_verdict(cells, args, pruned: Table, after: Table, floor: float) -> list[str]:
    """Does a redundancy term help over attention-weighted strength alone? Paired, per
    model x target, for every correlation variant under uniform allocation."""
    lines = []
    strength = ("strength", "uniform")
    if strength not in cells:
        return lines
    for kind in CORRELATION_VARIANTS:
        cell = (kind, "uniform")
        if cell not in cells:
            continue
        for name, table, targets in (("after fine-tuning", after, args.finetune_targets),
                                     ("right after pruning", pruned, args.targets)):
            diffs = [d for m in args.models for t in targets
                     if (d := paired(table.values(m, cell, t), table.values(m, strength, t)))]
            if not diffs:
                continue
            better = sum(d[0] > 0 and not within_noise(d, floor) for d in diffs)
            worse = sum(d[0] < 0 and not within_noise(d, floor) for d in diffs)
            mean = statistics.fmean(d[0] for d in diffs)
            lines.append(f"- {kind} vs strength alone ({name}, uniform, {len(diffs)} model × "
                         f"target settings): mean {mean:+.2f} points; better beyond noise in "
                         f"{better}, worse beyond noise in {worse}, within noise in "
                         f"{len(diffs) - better - worse}.")
    return lines


def write_section(path: str, heading: str, text: str) -> None:
    """Write `text` (starting with `heading`) into `path`, replacing only that section."""
    sections.write_section(path, heading, text)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cells = cells_of(args)
    runs = len(args.models) * len(args.seeds)
    finetunes = runs * len(cells) * len(args.finetune_targets) * bool(args.finetune_epochs)
    _say(f"{runs} stage-0 runs, {runs * len(cells)} cells "
         f"({len(cells)} per model and seed: {', '.join(map(_label, cells))}), "
         f"{finetunes} fine-tunes of {args.finetune_epochs} epochs; cache {args.cache_dir}")
    if args.dry_run:
        return 0
    cache = CellCache(args.cache_dir, args)
    results = cache.data if args.render_only else run(args, cache)
    host = machine()
    runner = make_runner(args, 0)[0]
    results["test_images"] = len(runner.test_set)
    results["train_images"] = len(runner.train_set)
    results["train_split"] = len(build_datasets(DataConfig(args.dataset, args.data_root,
                                                           args.image_size))[0])
    results["machine"] = host
    text = render(results, args, host)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=str)
    if args.out == "-":
        print(text)
    else:
        write_section(args.out, heading_of(args), text)
        _say(f"wrote the '{heading_of(args)}' section of {args.out}")
    return 0


__all__ = ["CellCache", "Snapshot", "Trajectory", "build_parser", "cells_of", "main",
           "paired", "prune_trajectory", "render", "run", "write_section"]

if __name__ == "__main__":
    sys.exit(main())
