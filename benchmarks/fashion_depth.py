"""Fashion-MNIST at the paper's depth: accuracy at -50 % and -70 % FLOPs after the final
fine-tune, with and without distillation, next to the unpruned model and next to
Torch-Pruning's own recipe at equal compute.

    python benchmarks/fashion_depth.py --out runs/fashion_depth.jsonl [--models resnet20,resnet56]
        [--seeds 0,1,2] [--epochs 30] [--budget-s 300]
    python benchmarks/fashion_depth.py --render --out runs/fashion_depth.jsonl

Per model and seed: stage 0 (the baseline on the whole 60,000-image training split at 28 px,
then BAM) through ccpcsa.loop.prepare, cached in --cache-dir; then per FLOPs target:
- ccpcsa: the loop walks to the target (LoopConfig.target_flops; l1 under the uniform
  allocation, m from ccpcsa.depth so the target takes --rounds rounds of --round-epochs), then
  --final-epochs of fine-tuning, once plain ("ccpcsa") and once distilled from the unpruned
  model ("ccpcsa+kd"), both from the same pruned model;
- tp-magnitude: Torch-Pruning's MagnitudePruner (L1) on the same trained baseline, with
  iterative_steps = the rounds ccpcsa took, a uniform pruning ratio found to reach the same
  FLOPs, --round-epochs after each step and the same --final-epochs: the same fine-tune
  epochs in total.
Everything trains in this process (the local runner: no Ray), on CUDA when there is one. Each
finished arm is appended to --out as a JSON line at once; with --budget-s no new arm starts
once the next one would not fit, so a short lease still leaves every finished arm on disk.
--render turns the JSON lines into docs/benchmarks.md's section.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HEADING = ("## Fashion-MNIST at depth: -50 % and -70 % FLOPs after the final fine-tune, "
           "with and without distillation, against Torch-Pruning")
TARGETS = {"-50%": 0.5, "-70%": 0.3}
ARMS = ("ccpcsa", "ccpcsa+kd", "tp-magnitude")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/fashion_depth.py", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist",
                   help="folder with the four Fashion-MNIST idx .gz files (apt-get install "
                        "dataset-fashion-mnist) (default: %(default)s)")
    p.add_argument("--models", default="resnet20,resnet56", help="comma list (default: "
                   "%(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma list (default: %(default)s)")
    p.add_argument("--targets", default="-50%,-70%",
                   help=f"comma list of {', '.join(TARGETS)} (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=30,
                   help="stage 0: baseline epochs on the whole training split (default: "
                        "%(default)s)")
    p.add_argument("--attention-epochs", type=int, default=5,
                   help="stage 0: epochs with BAM (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=6,
                   help="pruning rounds to reach a target (ccpcsa: m is set from it; "
                        "Torch-Pruning: iterative_steps) (default: %(default)s)")
    p.add_argument("--round-epochs", type=int, default=1,
                   help="fine-tune epochs after each round (default: %(default)s)")
    p.add_argument("--final-epochs", type=int, default=10,
                   help="final fine-tune epochs, every arm (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.05, help="stage 0 lr (default: %(default)s)")
    p.add_argument("--finetune-lr", type=float, default=0.01,
                   help="round and final fine-tune lr (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--distill-weight", type=float, default=0.5, help="(default: %(default)s)")
    p.add_argument("--distill-temperature", type=float, default=4.0,
                   help="(default: %(default)s)")
    p.add_argument("--train-subset", type=int, default=0,
                   help="train on a fixed random N training images (0 = all 60,000; a smoke "
                        "test only) (default: %(default)s)")
    p.add_argument("--test-subset", type=int, default=0,
                   help="evaluate on a fixed random N test images (0 = all 10,000; a smoke "
                        "test only) (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when "
                   "available)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast / channels_last "
                   "on CUDA")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="stop starting new arms when the next would not finish within this "
                        "many seconds of the start (estimated from the arms so far); 0 = no "
                        "limit (default: %(default)s)")
    p.add_argument("--cache-dir", default="runs/fashion_depth_stage0",
                   help="stage-0 cache (default: %(default)s)")
    p.add_argument("--out", default="runs/fashion_depth.jsonl",
                   help="JSON lines, one per finished arm, appended (default: %(default)s)")
    p.add_argument("--render", action="store_true",
                   help="write --doc's section from --out instead of running")
    p.add_argument("--doc", default="docs/benchmarks.md", help="(default: %(default)s)")
    p.add_argument("--command", default=None,
                   help="with --render: the command line to quote (default: from --out's "
                        "records)")
    return p


# ------------------------------------------------------------------------------ running


def write_line(path: str, record: dict[str, Any]) -> None:
    """Append one record, synced; a line an earlier kill cut short is ended first, so it
    costs only itself."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cut = False
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if cut else "") + json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def done_keys(path: str) -> set[tuple]:
    return {key_of(r) for r in read_lines(path) if r.get("kind") == "arm"}


def key_of(r: dict[str, Any]) -> tuple:
    return (r["model"], r["seed"], r["target"], r["arm"], r.get("train_subset", 0))


def read_lines(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    found = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    return found


class Clock:
    """The budget: how long the run has gone and how long an arm of each kind took."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget = time.perf_counter(), budget_s
        self.took: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, kind: str) -> bool:
        if not self.budget:
            return True
        return self.elapsed() + self.took.get(kind, 0.0) <= self.budget


def make_runner(args: argparse.Namespace, seed: int, teacher: str | None = None):
    from ccpcsa.data import DataConfig
    from ccpcsa.runners import make_runner as runner_for
    from ccpcsa.train import TrainConfig

    data = DataConfig("fashion-mnist", args.data_root, 28, train_subset=args.train_subset,
                      test_subset=args.test_subset)
    train = TrainConfig(batch_size=args.batch_size, lr=args.lr, seed=seed, device=args.device,
                        amp=not args.no_amp, channels_last=not args.no_amp, teacher=teacher,
                        distill_weight=args.distill_weight,
                        distill_temperature=args.distill_temperature)
    return runner_for(data, train, 1, os.path.join(args.cache_dir, "ray-unused"))


def stage0(args: argparse.Namespace, model_name: str, seed: int, runner):
    from ccpcsa.loop import PrepareConfig, prepare

    cfg = PrepareConfig(model_name, 10, (3, 28, 28), "fashion-mnist", args.epochs,
                        args.attention_epochs, args.lr, seed, data_root=args.data_root,
                        batch_size=args.batch_size, train_subset=args.train_subset)
    folder = os.path.join(args.cache_dir, f"{model_name}-seed{seed}-sub{args.train_subset}")
    cached = os.path.exists(os.path.join(folder, "prepare.json"))
    started = time.perf_counter()
    prepared = prepare(cfg, runner, folder)
    return prepared, time.perf_counter() - started, cached


def ccpcsa_arms(args, model_name: str, seed: int, fraction: float, prepared, runner,
                kd_runner) -> list[dict[str, Any]]:
    """The loop to the target, then the final fine-tune plain and distilled."""
    from ccpcsa.depth import per_round_for, ratio_for_target
    from ccpcsa.loop import LoopConfig, prune_loop
    from ccpcsa.prune import PruneLimits

    started = time.perf_counter()
    shape = (3, 28, 28)
    plan = ratio_for_target(model_name, 10, shape, fraction, 4, 1, max_ratio=0.9)
    m = per_round_for(plan, args.rounds)
    cfg = LoopConfig(groups_per_round=m, max_rounds=4 * args.rounds,
                     finetune_epochs=args.round_epochs, finetune_lr=args.finetune_lr,
                     limits=PruneLimits(0.9), seed=seed, round_to=1,
                     target_flops=int(fraction * prepared.baseline_flops))
    latest: dict[str, Any] = {}

    def keep(record, model) -> None:
        latest.update(record=record, model=copy.deepcopy(model).cpu())

    result = prune_loop(prepared.load_attention_model(), model_name, shape,
                        prepared.baseline_accuracy, runner, cfg, keep,
                        initial_accuracy=prepared.attention_accuracy)
    record, pruned = latest["record"], latest["model"]
    rounds = record.round
    loop_s = time.perf_counter() - started
    out = []
    for arm, tuner in (("ccpcsa", runner), ("ccpcsa+kd", kd_runner)):
        t0 = time.perf_counter()
        model = tuner.fit(copy.deepcopy(pruned), args.final_epochs, args.finetune_lr,
                          label=f"{arm} final")
        out.append({"arm": arm, "accuracy_rounds": record.accuracy,
                    "accuracy": tuner.evaluate(model), "flops": record.flops,
                    "rounds": rounds, "m": m, "stop_reason": result.stop_reason,
                    "epochs_total": rounds * args.round_epochs + args.final_epochs,
                    "seconds": loop_s + time.perf_counter() - t0})
    return out


def tp_ratio_for(model, example, classifier, fraction: float, baseline_flops: int,
                 shape) -> float:
    """The uniform Torch-Pruning ratio whose one-shot pruning keeps <= fraction of the FLOPs."""
    import torch_pruning as tp

    from ccpcsa.flops import count_flops

    def flops_at(ratio: float) -> int:
        trial = copy.deepcopy(model).cpu().eval()
        pruner = tp.pruner.MagnitudePruner(
            trial, example, importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio, ignored_layers=[_same(trial, model, classifier)])
        pruner.step()
        return count_flops(trial, shape)

    low, high = 0.0, 0.95
    for _ in range(10):
        mid = (low + high) / 2
        low, high = (low, mid) if flops_at(mid) <= fraction * baseline_flops else (mid, high)
    return high


def _same(copy_model, original, module):
    """`module` of `original`, found by name in its copy."""
    name = next(n for n, m in original.named_modules() if m is module)
    return copy_model.get_submodule(name)


def tp_arm(args, model_name: str, fraction: float, rounds: int, prepared, runner
           ) -> dict[str, Any]:
    """Torch-Pruning's recipe: MagnitudePruner (L1), iterative_steps = rounds, each step then
    --round-epochs, then --final-epochs; on the baseline without BAM."""
    import torch
    import torch_pruning as tp

    from ccpcsa.checkpoint import load_checkpoint
    from ccpcsa.flops import count_flops
    from ccpcsa.models import get_spec

    started = time.perf_counter()
    shape = (3, 28, 28)
    model = load_checkpoint(prepared.baseline_checkpoint).cpu().eval()
    example = torch.zeros(1, *shape)
    classifier = get_spec(model_name, shape).classifier(model)
    ratio = tp_ratio_for(model, example, classifier, fraction, prepared.baseline_flops, shape)
    pruner = tp.pruner.MagnitudePruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio, iterative_steps=rounds, ignored_layers=[classifier])
    for step in range(rounds):
        model.cpu().eval()
        pruner.step()
        model = runner.fit(model.train(), args.round_epochs, args.finetune_lr,
                           label=f"tp step {step + 1}")
    accuracy_rounds = runner.evaluate(model)
    model = runner.fit(model, args.final_epochs, args.finetune_lr, label="tp final")
    return {"arm": "tp-magnitude", "accuracy_rounds": accuracy_rounds,
            "accuracy": runner.evaluate(model), "flops": count_flops(model.cpu(), shape),
            "rounds": rounds, "tp_ratio": ratio,
            "epochs_total": rounds * args.round_epochs + args.final_epochs,
            "seconds": time.perf_counter() - started}


def device_name(args: argparse.Namespace) -> str:
    import torch

    from ccpcsa.train import pick_device

    device = pick_device(args.device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(args: argparse.Namespace) -> int:
    clock = Clock(args.budget_s)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        print(f"error: unknown target(s) {', '.join(unknown)}; choose from "
              f"{', '.join(TARGETS)}", file=sys.stderr)
        return 2
    if not os.path.isdir(args.data_root):
        print(f"error: --data-root {args.data_root!r} is not a folder (apt-get install "
              "dataset-fashion-mnist)", file=sys.stderr)
        return 2
    done = done_keys(args.out)
    common = {"train_subset": args.train_subset, "test_subset": args.test_subset,
              "device": device_name(args), "command": "python " + " ".join(sys.argv),
              "epochs": args.epochs, "final_epochs": args.final_epochs,
              "round_epochs": args.round_epochs}
    for model_name in models:
        for seed in seeds:
            if not clock.fits("stage0"):
                print(f"budget: not starting {model_name} seed {seed}", flush=True)
                return 0
            runner = make_runner(args, seed)
            prepared, seconds, cached = stage0(args, model_name, seed, runner)
            clock.took["stage0"] = 0.0 if cached else seconds
            write_line(args.out, {**common, "kind": "stage0", "model": model_name,
                                  "seed": seed, "baseline_accuracy": prepared.baseline_accuracy,
                                  "attention_accuracy": prepared.attention_accuracy,
                                  "baseline_flops": prepared.baseline_flops,
                                  "seconds": seconds, "cached": cached})
            print(f"{model_name} seed {seed}: baseline {prepared.baseline_accuracy:.2f}% "
                  f"({'cached' if cached else f'{seconds:.0f}s'})", flush=True)
            kd_runner = make_runner(args, seed, teacher=prepared.baseline_checkpoint)
            for target in targets:
                fraction = TARGETS[target]
                key = (model_name, seed, target)
                rounds = args.rounds
                if not all((*key, arm, args.train_subset) in done for arm in ARMS[:2]):
                    if not clock.fits("ccpcsa"):
                        print(f"budget: stopping before {key}", flush=True)
                        return 0
                    t0 = time.perf_counter()
                    for rec in ccpcsa_arms(args, model_name, seed, fraction, prepared, runner,
                                           kd_runner):
                        rounds = rec["rounds"]
                        write_line(args.out, _arm_record(common, key, rec, prepared))
                        print(_arm_text(key, rec, prepared), flush=True)
                    clock.took["ccpcsa"] = time.perf_counter() - t0
                if (*key, ARMS[2], args.train_subset) not in done:
                    if not clock.fits("tp"):
                        print(f"budget: stopping before {key} tp-magnitude", flush=True)
                        return 0
                    t0 = time.perf_counter()
                    rec = tp_arm(args, model_name, fraction, max(rounds, 1), prepared, runner)
                    write_line(args.out, _arm_record(common, key, rec, prepared))
                    print(_arm_text(key, rec, prepared), flush=True)
                    clock.took["tp"] = time.perf_counter() - t0
    print(f"done in {clock.elapsed():.0f}s; results in {args.out}", flush=True)
    return 0


def _arm_record(common, key, rec, prepared) -> dict[str, Any]:
    model_name, seed, target = key
    return {**common, "kind": "arm", "model": model_name, "seed": seed, "target": target,
            **rec, "flops_fraction": rec["flops"] / prepared.baseline_flops,
            "baseline_accuracy": prepared.baseline_accuracy}


def _arm_text(key, rec, prepared) -> str:
    return (f"{key[0]} seed {key[1]} {key[2]} {rec['arm']}: {rec['accuracy']:.2f}% "
            f"(rounds {rec['accuracy_rounds']:.2f}%), FLOPs "
            f"{rec['flops'] / prepared.baseline_flops:.3f} of the baseline, "
            f"{rec['seconds']:.0f}s")


# ------------------------------------------------------------------------------ render


def summarize(records: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """(model, target) -> per-arm accuracies by seed, the unpruned baseline's by seed."""
    table: dict[tuple, dict[str, Any]] = defaultdict(lambda: {"arms": defaultdict(dict),
                                                               "flops": defaultdict(list),
                                                               "unpruned": {}})
    for r in records:
        if r.get("kind") != "arm":
            continue
        cell = table[(r["model"], r["target"])]
        cell["arms"][r["arm"]][r["seed"]] = r["accuracy"]
        cell["flops"][r["arm"]].append(r["flops_fraction"])
        cell["unpruned"][r["seed"]] = r["baseline_accuracy"]
    return table


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def render(records: list[dict[str, Any]], command: str) -> str:
    stage0 = [r for r in records if r.get("kind") == "stage0"]
    arms = [r for r in records if r.get("kind") == "arm"]
    device = next((r["device"] for r in records if r.get("device")), "?")
    lines = [HEADING, "", f"Command: `{command}`", "",
             f"Machine: {device}. Stage 0 on {_subset_text(records)}; "
             "every arm starts from the same trained baseline per seed; the fine-tune epochs "
             "in total are equal across arms (rounds x round epochs + final epochs). The "
             "ccpcsa arms also trained BAM in stage 0 (not counted).", ""]
    if stage0:
        trained = [r for r in stage0 if not r["cached"]]
        took = (", ".join(f"{r['model']} seed {r['seed']} {r['seconds']:.0f}s" for r in trained)
                or "all cached")
        lines += [f"Stage 0 ({stage0[0]['epochs']} baseline epochs): {took}.", ""]
    if not arms:
        return "\n".join([*lines, "No arm finished."]) + "\n"
    lines += ["| model | FLOPs | arm | seeds | top-1 % after final fine-tune | vs unpruned "
              "(points) | FLOPs kept | ahead of tp-magnitude (seeds) |",
              "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for (model, target), cell in sorted(summarize(records).items()):
        unpruned = cell["unpruned"]
        lines.append(f"| {model} | unpruned | - | {len(unpruned)} | "
                     f"{_mean_sd(list(unpruned.values()))} | 0 | 1.000 | - |")
        tp = cell["arms"].get("tp-magnitude", {})
        for arm in ARMS:
            by_seed = cell["arms"].get(arm, {})
            if not by_seed:
                continue
            gaps = [by_seed[s] - unpruned[s] for s in by_seed]
            ahead = [s for s in by_seed if s in tp and by_seed[s] > tp[s]]
            vs_tp = "-" if arm == "tp-magnitude" else f"{len(ahead)}/{len(set(by_seed) & set(tp))}"
            lines.append(f"| {model} | {target} | {arm} | {len(by_seed)} | "
                         f"{_mean_sd(list(by_seed.values()))} | {_mean_sd(gaps)} | "
                         f"{statistics.mean(cell['flops'][arm]):.3f} | {vs_tp} |")
            if arm != "tp-magnitude" and target == "-70%" and model == "resnet56":
                verdicts.append(
                    f"- resnet56 at -70 % ({arm}): {statistics.mean(gaps):+.2f} points against "
                    f"the unpruned model (target: >= -0.5: "
                    f"{'met' if statistics.mean(gaps) >= -0.5 else 'not met'}); ahead of "
                    f"Torch-Pruning's recipe on {len(ahead)} of "
                    f"{len(set(by_seed) & set(tp))} seeds "
                    f"({'met' if tp and len(ahead) == len(by_seed) else 'not met'}).")
    return "\n".join([*lines, "", *verdicts]) + "\n"


def _subset_text(records) -> str:
    sub = next((r.get("train_subset", 0) for r in records), 0)
    return ("the whole 60,000-image training split at 28 px" if not sub
            else f"a fixed {sub}-image subset of the training split (a smoke test, not the "
                 "benchmark)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        from benchmarks.sections import write_section

        records = read_lines(args.out)
        if not records:
            print(f"error: no results in {args.out}", file=sys.stderr)
            return 2
        command = args.command or next((r["command"] for r in records if r.get("command")),
                                       "python benchmarks/fashion_depth.py")
        write_section(args.doc, HEADING, render(records, command))
        print(f"wrote {HEADING!r} to {args.doc}")
        return 0
    for name in ("epochs", "rounds", "final_epochs", "round_epochs"):
        if getattr(args, name) < (1 if name == "rounds" else 0):
            print(f"error: --{name.replace('_', '-')} must be >= "
                  f"{1 if name == 'rounds' else 0}, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    if not math.isfinite(args.budget_s) or args.budget_s < 0:
        print(f"error: --budget-s must be >= 0, got {args.budget_s}", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
