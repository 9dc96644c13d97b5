"""Benchmark: the frontier the Optuna search finds vs random search vs the paper's fixed schedule.

For each seed, stage 0 (baseline + BAM training) runs once and is shared by three arms on the
embedded digits:
- nsga2, tpe: search/run.py with Optuna's NSGA-II or (multi-objective) TPE sampler over m and
  per-stage ratio caps, N trials;
- random: the same space and budget, Optuna's RandomSampler (same seed: NSGA-II's first
  generation is random too, so the two start from the same trials);
- fixed: the paper's kind of schedule, one m and one uniform cap (one trial; its rounds are its
  frontier).
Each arm's frontier (every reported round, plus the unpruned BAM model) is scored by its
hypervolume in (FLOPs saved vs the baseline, accuracy above a floor) space (search.pareto).

Usage: python benchmarks/search_hypervolume.py [--seeds 0 1 2] [--trials 10]
       [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sections import write_section  # noqa: E402

from search import run as search_run  # noqa: E402
from search.pareto import hypervolume, read_frontier  # noqa: E402

SECTION = "## Search: Optuna vs random search vs the paper's fixed schedule"
ARMS = ("nsga2", "tpe", "random", "fixed")
SEARCHED = ("nsga2", "tpe")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--trials", type=int, default=16, help="trials of the sampled arms")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--fixed-m", type=int, default=8, help="m of the fixed schedule")
    p.add_argument("--fixed-cap", type=float, default=0.5, help="uniform cap, fixed schedule")
    p.add_argument("--floor", type=float, default=5.0,
                   help="hypervolume counts accuracy above baseline - FLOOR points")
    p.add_argument("--extra", default="--baseline-epochs 10 --attention-epochs 3 "
                   "--max-rounds 8 --tolerance 1.0",
                   help="flags passed to every search (default: %(default)s)")
    p.add_argument("--out", default="docs/benchmarks.md")
    return p


def arm_flags(arm: str, args: argparse.Namespace) -> list[str]:
    if arm in (*SEARCHED, "random"):
        return ["--sampler", arm, "--num-samples", str(args.trials)]
    m, cap = args.fixed_m, args.fixed_cap
    return ["--num-samples", "1", "--m-range", f"{m},{m}", "--cap-range", f"{cap},{cap}"]


def run_arm(arm: str, seed: int, args: argparse.Namespace, storage: str, stage0: Path | None
            ) -> tuple[float, int, float, float]:
    name = f"{arm}-seed{seed}"
    if stage0 is not None:  # share stage 0: the cache is keyed by its config, which is equal
        shutil.copytree(stage0, Path(storage) / name / "stage0")
    argv = ["--model", args.model, "--storage", storage, "--name", name, "--seed", str(seed),
            *shlex.split(args.extra), *arm_flags(arm, args)]
    start = time.perf_counter()
    code = search_run.main(argv)
    if code != 0:
        raise SystemExit(f"search {name} failed with exit code {code}")
    seconds = time.perf_counter() - start
    frame, baseline = read_frontier(str(Path(storage) / name))
    floor = baseline["accuracy"] - args.floor
    hv = hypervolume(frame["accuracy"], frame["flops"], baseline["flops"], floor)
    best = frame[frame["accuracy"] >= baseline["accuracy"] - 1.0]["flops_reduction"].max()
    return hv, len(frame), seconds, float(best)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results: dict[str, list[tuple[float, int, float, float]]] = {a: [] for a in ARMS}
    with tempfile.TemporaryDirectory() as storage:
        for seed in args.seeds:
            stage0 = None
            for arm in ARMS:
                got = run_arm(arm, seed, args, storage, stage0)
                stage0 = stage0 or Path(storage) / f"{arm}-seed{seed}" / "stage0"
                results[arm].append(got)
                print(f"seed {seed} {arm}: hypervolume {got[0]:.3f}, {got[1]} points, "
                      f"{got[2]:.0f}s", flush=True)
            import ray

            ray.shutdown()
    text = render(results, args)
    write_section(args.out, SECTION, text)
    print(text)
    return 0


def _ms(values: list[float], digits: int = 3) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def render(results: dict, args: argparse.Namespace) -> str:
    command = "python benchmarks/search_hypervolume.py " + shlex.join(sys.argv[1:])
    rows = []
    for arm in ARMS:
        runs = results[arm]
        rows.append(f"| {arm} | {_ms([r[0] for r in runs])} | "
                    f"{' / '.join(f'{r[0]:.3f}' for r in runs)} | "
                    f"{_ms([r[3] for r in runs], 1)} | {_ms([float(r[1]) for r in runs], 0)} | "
                    f"{_ms([r[2] for r in runs], 0)} |")
    seeds = range(len(args.seeds))
    wins = [f"{arm} beat random search on "
            f"{sum(results[arm][i][0] > results['random'][i][0] for i in seeds)} of "
            f"{len(args.seeds)} seeds (tied on "
            f"{sum(results[arm][i][0] == results['random'][i][0] for i in seeds)}) and the "
            f"fixed schedule on {sum(results[arm][i][0] > results['fixed'][i][0] for i in seeds)}"
            f" of {len(args.seeds)}." for arm in SEARCHED]
    return "\n".join([
        SECTION, "",
        f"Command: `{command}`  ",
        f"Machine: {os.cpu_count()}-core CPU, no GPU. {args.model} on the embedded digits; "
        f"nsga2, tpe and random: {args.trials} trials each; fixed: one trial, "
        f"m = {args.fixed_m}, "
        f"every stage capped at {args.fixed_cap}. Stage 0 is shared by the three arms of a "
        f"seed. Hypervolume: area dominated in (fraction of baseline FLOPs saved) x "
        f"(accuracy points above baseline - {args.floor}); larger is better.", "",
        "| arm | hypervolume (mean ± std) | per seed | best FLOPs↓ % within 1 point | "
        "points | seconds |",
        "|---|---|---|---|---|---|",
        *rows, "",
        *wins, ""])


if __name__ == "__main__":
    sys.exit(main())
