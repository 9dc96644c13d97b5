"""Benchmark: what a pruning round costs on Ray Train beyond its work, and where channels are
scored; this code against an older commit (default a92738b: a new TorchTrainer for every fit
and evaluate, channels scored on the trial's driver).

The same loop (ccpcsa.loop.prune_loop: score, prune, [re-estimate BatchNorm,] fine-tune 1
epoch, evaluate; tolerance never reached) on the embedded digits, from one untrained model
with BAM, runs twice per version: in one process (--workers 1, no Ray) and on --workers Ray
Train workers. A round's wall time is the time between the loop's per-round callbacks; its
fixed cost is the Ray round's wall time minus the one-process round's (the same work, the same
CPUs). Round 1 is reported apart: from this commit on it includes starting the worker group,
which then serves every later round. Scoring time is the loop's own measure (tracing the
channel groups + computing the scores, with its calibration batches): on the driver before,
on the workers now.

Each version runs in its own Python process and Ray instance (127.0.0.1, --cpus CPUs); the old
commit is checked out in a temporary `git worktree` and imported through PYTHONPATH, then the
worktree is removed. Versions differ in what a round does (this one also re-estimates
BatchNorm, with --bn-batches), which is why each is compared with its own one-process run.

Usage: python benchmarks/round_cost.py [--rounds 4] [--workers 2] [--before a92738b]
       [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sections import write_section

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Ray Train: per-round fixed cost and where channels are scored"
TARGET_S = 5.0  # issue 8: fixed cost per round after the first


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4, help="rounds per run (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1,
                   help="Ray Train workers, 1 CPU each; the one-process run gets as many torch "
                        "threads (default: %(default)s: the same compute on both sides, so the "
                        "difference is Ray's alone, even on a busy machine)")
    p.add_argument("--model", default="resnet20", help="model (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=16,
                   help="digits resized to this side (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (default: 64)")
    p.add_argument("-m", "--groups-per-round", type=int, default=16,
                   help="channels removed per round (default: %(default)s)")
    p.add_argument("--calibration-batches", type=int, default=4,
                   help="global batches channels are scored on (default: %(default)s)")
    p.add_argument("--bn-batches", type=int, default=4,
                   help="BatchNorm re-estimation batches, where the version has it "
                        "(default: %(default)s)")
    p.add_argument("--before", default="a92738b",
                   help="commit to compare with, run from a temporary git worktree; 'none' "
                        "to skip it (default: %(default)s)")
    p.add_argument("--out", default="docs/benchmarks.md",
                   help="markdown file whose section this replaces (default: %(default)s)")
    p.add_argument("--measure", metavar="JSON", help=argparse.SUPPRESS)  # one version's runs
    return p


# ------------------------------------------------------------------ one version (subprocess)


def measure(args: argparse.Namespace) -> dict:
    """Both runs (one process, Ray Train) with whatever ccpcsa is importable; old and new
    APIs alike (make_runner moved from ccpcsa.train to ccpcsa.runners; LoopConfig grew
    fields, so only the ones this version has are set)."""
    import torch

    from ccpcsa.distributed import prefer_loopback

    prefer_loopback()  # a private Ray instance on 127.0.0.1
    import ray

    import ccpcsa.loop as loop
    from ccpcsa.data import DataConfig, dataset_info
    from ccpcsa.distributed import RayRunner
    from ccpcsa.models import build_model
    from ccpcsa.prune import PruneLimits
    from ccpcsa.train import TrainConfig, seed_everything

    try:
        from ccpcsa.runners import make_runner
    except ImportError:
        from ccpcsa.train import make_runner

    data = DataConfig("digits", image_size=args.image_size, augment=False)
    info = dataset_info(data)
    shape = (info.channels, info.image_size, info.image_size)
    wanted = dict(groups_per_round=args.groups_per_round, tolerance=100.0,
                  max_rounds=args.rounds, finetune_epochs=1, finetune_lr=0.01,
                  calibration_batches=args.calibration_batches, bn_batches=args.bn_batches,
                  limits=PruneLimits(max_ratio=0.8))
    have = {f.name for f in dataclasses.fields(loop.LoopConfig)}
    cfg = loop.LoopConfig(**{k: v for k, v in wanted.items() if k in have})
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    runs = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train_cfg = TrainConfig(batch_size=args.batch_size, seed=0)
            for how in ("one process", "Ray Train"):
                torch.set_num_threads(args.workers if how == "one process" else 1)
                seed_everything(0)
                model = build_model(args.model, info.num_classes, with_bam=True)
                started = time.perf_counter()
                runner = (make_runner(data, train_cfg, 1, tmp) if how == "one process" else
                          RayRunner(data, train_cfg, args.workers, os.path.join(tmp, "ray")))
                marks: list[tuple[float, int]] = []

                def on_round(_record, _model, runner=runner, marks=marks) -> None:
                    marks.append((time.perf_counter(), len(getattr(runner, "timings", []))))

                result = loop.prune_loop(model, args.model, shape, 0.0, runner, cfg, on_round,
                                         initial_accuracy=0.0)
                if hasattr(runner, "close"):
                    runner.close()
                timings = getattr(runner, "timings", None)  # this commit's RayRunner only
                runs[how] = {"total_s": time.perf_counter() - started, "rounds": [
                    {"round": r.round, "wall_s": marks[i][0] - marks[i - 1][0],
                     "score_s": r.seconds_score, "finetune_s": r.seconds_finetune,
                     "removed": r.removed,
                     "command_overhead_s": None if timings is None else sum(
                         c.wall_s - c.worker_s for c in timings[marks[i - 1][1]:marks[i][1]])}
                    for i, r in enumerate(result.records) if i > 0]}
                print(f"{how}: {[round(r['wall_s'], 1) for r in runs[how]['rounds']]} s per "
                      "round", flush=True)
    finally:
        ray.shutdown()
    return {"code": _describe_code(), "runs": runs}


def _describe_code() -> str:
    import ccpcsa

    root = Path(ccpcsa.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    return commit


# ------------------------------------------------------------------ orchestration


def run_version(args: argparse.Namespace, code_root: Path, json_path: Path) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--measure", str(json_path),
            "--rounds", str(args.rounds), "--workers", str(args.workers), "--model", args.model,
            "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
            "-m", str(args.groups_per_round),
            "--calibration-batches", str(args.calibration_batches),
            "--bn-batches", str(args.bn_batches)]
    env = {**os.environ, "PYTHONPATH": str(code_root), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run(argv, env=env, check=True, cwd=code_root)
    return json.loads(json_path.read_text())


def compare(args: argparse.Namespace) -> list[tuple[str, dict]]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.before.lower() != "none":
            tree = Path(tempfile.gettempdir()) / f"ccpcsa-before-{args.before}"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree),
                            args.before], check=True, capture_output=True)
            try:
                results.append(("before",
                                run_version(args, tree, Path(tmp) / "before.json")))
            finally:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                                str(tree)], check=False)
        results.append(("this commit", run_version(args, REPO, Path(tmp) / "after.json")))
    return results


# ------------------------------------------------------------------ report


def summarise(result: dict) -> dict:
    one, ray_run = result["runs"]["one process"]["rounds"], result["runs"]["Ray Train"]["rounds"]
    later = range(1, min(len(one), len(ray_run)))
    fixed = [ray_run[i]["wall_s"] - one[i]["wall_s"] for i in later]
    return {
        "one_round1": one[0]["wall_s"], "ray_round1": ray_run[0]["wall_s"],
        "one_later": statistics.fmean(one[i]["wall_s"] for i in later) if later else None,
        "ray_later": statistics.fmean(ray_run[i]["wall_s"] for i in later) if later else None,
        "fixed_round1": ray_run[0]["wall_s"] - one[0]["wall_s"],
        "fixed_later": statistics.fmean(fixed) if fixed else None,
        # after the first round: this commit's first scoring call also starts the workers
        "score_one": statistics.fmean(one[i]["score_s"] for i in later) if later else None,
        "score_ray": statistics.fmean(ray_run[i]["score_s"] for i in later) if later else None,
        "ray_total": result["runs"]["Ray Train"]["total_s"],
        "commands_later": (statistics.fmean(ray_run[i]["command_overhead_s"] for i in later)
                           if later and ray_run[0]["command_overhead_s"] is not None
                           else None),
    }


def _s(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render(results: list[tuple[str, dict]], args: argparse.Namespace, seconds: float) -> str:
    command = "python benchmarks/round_cost.py " + shlex.join(sys.argv[1:])
    rows, verdicts = [], []
    for label, result in results:
        s = summarise(result)
        where = ("the driver (1 torch thread, float64)" if label == "before" else
                 f"the {args.workers} worker(s) (float32 blocks, statistics summed)")
        commands = "–" if s["commands_later"] is None else f"{s['commands_later']:.2f}"
        rows.append(f"| {label} ({result['code']}) | {_s(s['one_round1'])} / "
                    f"{_s(s['ray_round1'])} | {_s(s['one_later'])} / {_s(s['ray_later'])} | "
                    f"{_s(s['fixed_round1'])} | **{_s(s['fixed_later'])}** | {commands} | "
                    f"{_s(s['score_one'], 2)} / {_s(s['score_ray'], 2)} | {where} |")
        if s["fixed_later"] is not None:
            verdicts.append(f"{label}: {s['fixed_later']:.1f} s per round after the first "
                            f"(target < {TARGET_S:g} s: "
                            f"{'met' if s['fixed_later'] < TARGET_S else 'not met'})")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return "\n".join([
        SECTION, "",
        f"Command: `{command}` ({seconds / 60:.0f} min)  ",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), Python "
        f"{platform.python_version()}, no GPU; Ray on {args.workers} CPU(s), {args.workers} "
        f"Ray Train worker(s) of 1 CPU vs one process on {args.workers} torch thread(s); "
        f"{args.model} with BAM on digits at {args.image_size}², global batch "
        f"{args.batch_size}, m = {args.groups_per_round}, {args.rounds} rounds of: score "
        f"({args.calibration_batches} calibration batches), prune, BatchNorm re-estimation "
        f"({args.bn_batches} batches, this commit only), 1 fine-tune epoch, evaluation. Load "
        f"average at the end: {load:.1f}.", "",
        "| code | round 1 s: one process / Ray | later rounds s (mean): one process / Ray | "
        "fixed cost round 1 s | fixed cost per later round s | of which between driver and "
        "workers s | scoring s per later round: one process / Ray | where Ray scores |",
        "|---|---|---|---|---|---|---|---|",
        *rows, "",
        "Fixed cost = the Ray round's wall time minus the one-process round's (same work, same "
        "CPUs): starting workers, moving the model, dispatch and waiting. 'Between driver and "
        "workers' is measured directly by this commit's RayRunner: each command's wall time "
        "on the driver minus the time the workers spent in it (model transfer, dispatch). "
        + "; ".join(verdicts)
        + ". Before, every fit (and every evaluate of a changed model) started a new "
        "TorchTrainer; now one worker group serves the whole loop and only the round that "
        "starts it pays for that. Scoring time is the loop's own (tracing the channel groups "
        "and scoring, calibration data included).", ""])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.measure:
        Path(args.measure).write_text(json.dumps(measure(args), indent=2))
        return 0
    started = time.perf_counter()
    results = compare(args)
    for label, result in results:
        print(label, json.dumps(summarise(result)), flush=True)
    write_section(args.out, SECTION, render(results, args, time.perf_counter() - started))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
