"""Benchmark: how well adaptive-BN accuracy (no fine-tune) ranks pruning schedules by the
accuracy they reach once fine-tuned, the proxy the two-phase search screens with.

For each dataset, stage 0 (baseline, then BAM) is trained once; then S schedules are drawn at
random from the search's own space (ccpcsa/search/space.py: m and per-stage ratio caps, the
search's default ranges) and each runs the CCPCSA loop twice from the same BAM model:
- screened: every round re-estimates BatchNorm on --bn-batches training batches (train mode,
  no gradients, no weight update) and evaluates (LoopConfig.screen, what phase 1 does);
- fine-tuned: the full loop, fine-tuning --finetune-epochs after every round (tolerance off,
  so every schedule runs every round).
Under the default uniform allocation a schedule's widths at round r are nearly the same in
both runs: the shares are set by the caps, and only a leftover channel's group is chosen by
the scores, which differ once one run fine-tunes. FLOPs are checked to agree within
FLOPS_SLACK, so the two accuracies of a round describe (nearly) the same architecture.

Reported per dataset: Spearman's rank correlation between screened and fine-tuned accuracy
at each schedule's last round (n = S), the same with FLOPs alone as the predictor, the
partial rank correlation of the proxy given FLOPs (what the proxy adds beyond "fewer FLOPs,
lower accuracy"), and the correlation pooled over every round of every schedule.

With --screen-eval-images N each schedule is screened a second time on a runner whose test
split is a fixed random N of its images (what `search/run.py --screen-eval-images N` does),
and the section also reports that proxy's correlations and cost.

Resumable: each finished schedule is saved to <cache-dir>/schedules.json (stage 0 beside it),
so the same command started again continues; a cache made with other settings is refused.

Usage: python benchmarks/bn_proxy.py --help   (the documented command: docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

import optuna
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/sections.py

from resumable import load_cache, save_cache  # noqa: E402
from sections import write_section  # noqa: E402

from ccpcsa.data import DataConfig, build_datasets, dataset_info  # noqa: E402
from ccpcsa.loop import LoopConfig, PrepareConfig, prepare, prune_loop  # noqa: E402
from ccpcsa.prune import PruneLimits  # noqa: E402
from ccpcsa.search.config import SearchConfig  # noqa: E402
from ccpcsa.search.space import build_space, decode, describe_model  # noqa: E402
from ccpcsa.train import LocalRunner, TrainConfig  # noqa: E402

SECTION = "## Adaptive-BN screening: does the proxy rank schedules like fine-tuning?"
CACHE_FILE = "schedules.json"
FLOPS_SLACK = 0.02  # screened vs full loop, same schedule and round (see the docstring)
SETTINGS = ("model", "schedules", "seed", "max_rounds", "finetune_epochs", "finetune_lr",
            "bn_batches", "calibration_batches", "baseline_epochs", "attention_epochs", "lr",
            "batch_size", "train_subset", "image_size", "data_root", "screen_eval_images")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/bn_proxy.py",
        description="Spearman correlation between adaptive-BN accuracy (BatchNorm re-estimated, "
                    "no fine-tune) and fine-tuned accuracy over random pruning schedules, per "
                    "dataset. Writes its section of --out; resumable through --cache-dir.")
    p.add_argument("--datasets", nargs="+", default=["digits", "fashion-mnist"],
                   help="data sets (default: %(default)s)")
    p.add_argument("--data-root", default=None, help="fashion-mnist folder (default: "
                   "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--model", default="resnet20", help="architecture (default: %(default)s)")
    p.add_argument("--schedules", type=int, default=24,
                   help="random schedules per dataset, >= 20 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of stage 0, the schedules and training (default: %(default)s)")
    p.add_argument("--max-rounds", type=int, default=4, help="rounds (default: %(default)s)")
    p.add_argument("--finetune-epochs", type=int, default=1,
                   help="fine-tune epochs per round of the full loop (default: %(default)s)")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="(default: %(default)s)")
    p.add_argument("--bn-batches", type=int, default=16,
                   help="batches BatchNorm is re-estimated on (default: %(default)s)")
    p.add_argument("--calibration-batches", type=int, default=4,
                   help="batches channels are scored on (default: %(default)s)")
    p.add_argument("--baseline-epochs", type=int, default=10, help="(default: %(default)s)")
    p.add_argument("--attention-epochs", type=int, default=3, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.05, help="stage-0 lr (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--train-subset", type=int, default=6000, metavar="N",
                   help="fashion-mnist: train on a fixed random N training images (0 = all "
                        "60,000); digits always uses its whole split (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input side (default: the dataset's, digits 16, fashion-mnist 28)")
    p.add_argument("--screen-eval-images", type=int, default=0, metavar="N",
                   help="also screen each schedule evaluating on a fixed random N test images "
                        "(search --screen-eval-images); 0 = not (default: %(default)s)")
    p.add_argument("--cache-dir", default="runs/bench-bn-proxy",
                   help="finished schedules and stage-0 models (default: %(default)s)")
    p.add_argument("--out", default="docs/benchmarks.md", help="(default: %(default)s)")
    return p


# ---------------------------------------------------------------- measuring


def subset_for(dataset: str, args: argparse.Namespace) -> int:
    return args.train_subset if dataset != "digits" else 0


def make_runner(dataset: str, args: argparse.Namespace, test_subset: int = 0
                ) -> tuple[LocalRunner, DataConfig]:
    data = DataConfig(dataset, args.data_root, args.image_size,
                      train_subset=subset_for(dataset, args), test_subset=test_subset)
    train, test = build_datasets(data)
    calibration = build_datasets(replace(data, augment=False))[0]
    cfg = TrainConfig(batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    return LocalRunner(train, test, cfg, calibration), data


def draw_schedules(args: argparse.Namespace, layout) -> list[dict]:
    """Random schedules from the search's own space (the default ranges)."""
    space = build_space(SearchConfig(model=args.model), layout)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=args.seed))
    schedules = []
    for _ in range(args.schedules):
        trial = study.ask(space)
        schedules.append(dict(trial.params))
        study.tell(trial, [0.0, 0.0])
    return schedules


def loop_config(args: argparse.Namespace, params: dict, layout, screen: bool) -> LoopConfig:
    cfg = SearchConfig(model=args.model)
    schedule = decode(params, cfg, layout)
    return LoopConfig(groups_per_round=schedule.groups_per_round, tolerance=100.0,
                      max_rounds=args.max_rounds, finetune_epochs=args.finetune_epochs,
                      finetune_lr=args.finetune_lr, importance=cfg.importance,
                      calibration_batches=args.calibration_batches, allocation=cfg.allocation,
                      bn_batches=args.bn_batches,
                      limits=PruneLimits(max(cfg.cap_range), schedule.stage_caps,
                                         schedule.layer_caps, cfg.min_channels,
                                         schedule.residual_cap),
                      seed=args.seed, screen=screen)


def measure_dataset(dataset: str, args: argparse.Namespace, cache: dict) -> None:
    runner, data = make_runner(dataset, args)
    runs = [("screened", runner, True), ("finetuned", runner, False)]
    if args.screen_eval_images:
        runs.append(("screened_subset", make_runner(dataset, args, args.screen_eval_images)[0],
                     True))
    info = dataset_info(data)
    shape = (info.channels, info.image_size, info.image_size)
    prep = PrepareConfig(args.model, info.num_classes, shape, dataset, args.baseline_epochs,
                         args.attention_epochs, args.lr, args.seed, data_root=args.data_root,
                         batch_size=args.batch_size, train_subset=subset_for(dataset, args))
    prepared = prepare(prep, runner, os.path.join(args.cache_dir, f"stage0-{dataset}"))
    layout = describe_model(args.model, info.num_classes, shape)
    done = cache["datasets"].setdefault(dataset, {"schedules": []})
    done["baseline_accuracy"] = prepared.baseline_accuracy
    done["baseline_flops"] = prepared.baseline_flops
    done["test_images"] = len(build_datasets(data)[1])
    for index, params in enumerate(draw_schedules(args, layout)):
        if index < len(done["schedules"]):
            continue
        rows = {}
        seconds = {}
        for name, run_on, screen in runs:
            start = time.perf_counter()
            result = prune_loop(prepared.load_attention_model(), args.model, shape, 0.0, run_on,
                                loop_config(args, params, layout, screen),
                                initial_accuracy=prepared.attention_accuracy,
                                original_widths=layout.widths)
            seconds[name] = time.perf_counter() - start
            for r in result.records[1:]:
                row = rows.setdefault(r.round, {"round": r.round, "flops": r.flops})
                if screen:
                    row[name] = r.accuracy
                else:
                    row.update(finetuned=r.accuracy, pruned_in_full_loop=r.accuracy_pruned,
                               flops_full=r.flops)
                    assert abs(row["flops"] - r.flops) <= FLOPS_SLACK * row["flops"], (
                        f"screened and full loop differ in FLOPs: {row['flops']} vs {r.flops}")
        done["schedules"].append({"params": params, "rounds": sorted(
            (r for r in rows.values() if "screened" in r and "finetuned" in r),
            key=lambda r: r["round"]), "seconds": seconds})
        save(args, cache)
        last = done["schedules"][-1]["rounds"][-1] if done["schedules"][-1]["rounds"] else {}
        print(f"{dataset} schedule {index + 1}/{args.schedules}: last round "
              f"{last.get('round')}: screened {last.get('screened', math.nan):.2f} %, "
              f"fine-tuned {last.get('finetuned', math.nan):.2f} % "
              f"({seconds['screened']:.0f} s + {seconds['finetuned']:.0f} s)", flush=True)


# ---------------------------------------------------------------- cache


def cache_path(args: argparse.Namespace) -> str:
    return os.path.join(args.cache_dir, CACHE_FILE)


def section_of(args: argparse.Namespace) -> str:
    """One section per set of data sets: each can be run with its own settings and cache."""
    also = (f", also screened on {args.screen_eval_images} test images"
            if args.screen_eval_images else "")
    return f"{SECTION} ({', '.join(args.datasets)}{also})"


def load(args: argparse.Namespace) -> dict:
    return load_cache(cache_path(args), {k: getattr(args, k) for k in SETTINGS},
                      {"datasets": {}}, "--cache-dir")


def save(args: argparse.Namespace, cache: dict) -> None:
    save_cache(cache_path(args), cache)


# ---------------------------------------------------------------- statistics


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return float(pd.Series(list(x)).corr(pd.Series(list(y)), method="spearman"))


def partial_spearman(x, y, z) -> float:
    """Rank correlation of x and y with z's (rank) effect removed from both."""
    rxy, rxz, ryz = spearman(x, y), spearman(x, z), spearman(y, z)
    denominator = math.sqrt(max(1e-12, (1 - rxz ** 2) * (1 - ryz ** 2)))
    return (rxy - rxz * ryz) / denominator


def statistics_of(entry: dict) -> dict:
    last = [s["rounds"][-1] for s in entry["schedules"] if s["rounds"]]
    pooled = [r for s in entry["schedules"] for r in s["rounds"]]
    screened = [r["screened"] for r in last]
    finetuned = [r["finetuned"] for r in last]
    flops = [r["flops"] for r in last]  # the naive predictor: more FLOPs kept, higher accuracy
    subset = {}
    if last and all("screened_subset" in r for r in last):
        proxy = [r["screened_subset"] for r in last]
        subset = {"rho_subset": spearman(proxy, finetuned),
                  "partial_subset": partial_spearman(proxy, finetuned, flops),
                  "rho_subset_whole": spearman(proxy, screened),
                  "seconds_subset": sum(s["seconds"]["screened_subset"]
                                        for s in entry["schedules"])}
    return {
        **subset,
        "n": len(last), "pooled_n": len(pooled),
        "rho": spearman(screened, finetuned),
        "rho_flops": spearman(flops, finetuned),
        "partial": partial_spearman(screened, finetuned, flops),
        "rho_pooled": spearman([r["screened"] for r in pooled], [r["finetuned"] for r in pooled]),
        "screened": screened, "finetuned": finetuned,
        "seconds_screened": sum(s["seconds"]["screened"] for s in entry["schedules"]),
        "seconds_finetuned": sum(s["seconds"]["finetuned"] for s in entry["schedules"]),
    }


def render(cache: dict, args: argparse.Namespace, wall_s: float) -> str:
    rows, verdicts = [], []
    for dataset, entry in cache["datasets"].items():
        st = statistics_of(entry)
        if st["n"] < 2:
            continue
        rows.append(
            f"| {dataset} | {st['n']} | {st['rho']:+.2f} | {st['rho_flops']:+.2f} | "
            f"{st['partial']:+.2f} | {st['rho_pooled']:+.2f} ({st['pooled_n']}) | "
            f"{min(st['screened']):.1f}–{max(st['screened']):.1f} | "
            f"{min(st['finetuned']):.1f}–{max(st['finetuned']):.1f} | "
            f"{st['seconds_screened'] / st['n']:.0f} / {st['seconds_finetuned'] / st['n']:.0f} |")
        verdicts.append(
            f"- **{dataset}**: ρ = {st['rho']:+.2f} over {st['n']} schedules "
            f"({'meets' if st['n'] >= 20 else 'below'} the 20-schedule minimum); "
            + ("the proxy ranks better than FLOPs alone" if st["rho"] > st["rho_flops"]
               else "FLOPs alone rank at least as well as the proxy")
            + f" (ρ = {st['rho_flops']:+.2f}); given FLOPs, the proxy still carries "
            f"{'a positive' if st['partial'] > 0 else 'no'} signal (partial ρ = "
            f"{st['partial']:+.2f}). Screening a schedule cost "
            f"{st['seconds_screened'] / max(st['seconds_finetuned'], 1e-9) * 100:.0f} % of "
            "fine-tuning it."
            + (f" Screened on {args.screen_eval_images} test images instead of "
               f"{entry.get('test_images', 'all')}: ρ = {st['rho_subset']:+.2f} with the "
               f"fine-tuned accuracy (partial ρ given FLOPs {st['partial_subset']:+.2f}), ρ = "
               f"{st['rho_subset_whole']:+.2f} with the whole-split proxy, at "
               f"{st['seconds_subset'] / st['n']:.0f} s per schedule "
               f"({st['seconds_subset'] / max(st['seconds_finetuned'], 1e-9) * 100:.0f} % of "
               "fine-tuning it)." if "rho_subset" in st else ""))
    command = "python benchmarks/bn_proxy.py " + shlex.join(sys.argv[1:])
    host = f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}"
    return "\n".join([
        section_of(args), "",
        f"Command: `{command}`  ",
        f"Machine: {host}, {torch.get_num_threads()} torch threads; wall time of this run "
        f"{wall_s / 60:.1f} min (finished schedules are cached).", "",
        f"{args.model}; {args.schedules} random schedules per dataset from the search's "
        f"space (m and per-stage ratio caps), {args.max_rounds} rounds each, run twice from "
        f"the same BAM model: screened (BatchNorm re-estimated on {args.bn_batches} batches of "
        f"{args.batch_size}, no fine-tune) and the full loop ({args.finetune_epochs} fine-tune "
        f"epoch(s) per round, lr {args.finetune_lr}, tolerance off). Fashion-MNIST trains on "
        f"a fixed {args.train_subset or 'all'} of its training images; the test split is "
        f"whole. ρ: Spearman's rank correlation with the fine-tuned accuracy at each "
        "schedule's last round; FLOPs ρ: more FLOPs kept as the predictor; partial ρ: the proxy's "
        "given FLOPs; pooled: every round of every schedule.", "",
        "| dataset | schedules | ρ proxy | ρ FLOPs | partial ρ | ρ pooled (points) | "
        "screened % | fine-tuned % | s per schedule: screened / fine-tuned |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows, "", *verdicts, ""])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.schedules < 2:
        raise SystemExit("error: --schedules must be >= 2 (the issue asks for >= 20)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cache = load(args)
    start = time.perf_counter()
    for dataset in args.datasets:
        measure_dataset(dataset, args, cache)
    text = render(cache, args, time.perf_counter() - start)
    write_section(args.out, section_of(args), text, replaces=SECTION)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
