"""What a two-phase search's finalists are, read from finished search_hypervolume.py runs.

Per seed, for a full-search arm and a two-phase arm of the same cache: the hypervolume of
all deployable points (as in the benchmark's tables: against the baseline, accuracy floor
baseline - FLOOR), the best single trial's own hypervolume and schedule, and how many rounds
each fine-tuned trial ran. Then a spread-seeking finalist rule, simulated: greedily the
screened schedule whose screened points add most hypervolume to those already chosen; where
every pick is a schedule the full arm fine-tuned (the first screened schedules are the same
random draws), the union of their fine-tuned points is reported. No training is run.

Usage: python benchmarks/finalist_review.py --work-dir /work/bench/hvf12-r56 \
    --setting resnet56:fashion-mnist --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccpcsa.search.pareto import hypervolume, read_frontier  # noqa: E402

PARAM = "param_"


def schedule_key(row: pd.Series) -> tuple:
    return tuple(round(float(row[c]), 4) for c in row.index if c.startswith(PARAM))


def own_hypervolume(*points: pd.DataFrame, baseline: dict, floor: float) -> float:
    """Hypervolume of the points of all frames together, as in the benchmark's tables."""
    both = pd.concat(points)
    return hypervolume(both["accuracy"], both["flops"], baseline["flops"],
                       baseline["accuracy"] - floor)


def spread_picks(screened: dict[str, pd.DataFrame], count: int, baseline: dict,
                 floor: float) -> list[str]:
    chosen: list[pd.DataFrame] = []
    picks: list[str] = []
    left = dict(screened)
    while left and len(picks) < count:
        best = max(left, key=lambda t: own_hypervolume(left[t], *chosen, baseline=baseline,
                                                        floor=floor))
        picks.append(best)
        chosen.append(left.pop(best))
    return picks


def describe(points: pd.DataFrame) -> str:
    first = points.iloc[0]
    return f"m {int(first[PARAM + 'groups_per_round'])}, residual cap " \
           f"{first[PARAM + 'cap_residual']:.2f}"


def review(run: Path, full_arm: str, screen_arm: str, floor: float, count: int) -> list[str]:
    full, baseline = read_frontier(str(run / full_arm))
    two, _ = read_frontier(str(run / screen_arm))
    stage0 = full[full["phase"] == "stage0"]
    lines = []
    area = {"baseline": baseline, "floor": floor}
    for arm, frame in ((full_arm, full), (screen_arm, two)):
        fine = frame[frame["deployable"] & frame["phase"].isin(["full", "finetune"])]
        trials = {t: g for t, g in fine.groupby("trial_id")}
        scores = {t: own_hypervolume(g, stage0, **area) for t, g in trials.items()}
        best = max(scores, key=scores.get)
        lines.append(f"  {arm}: all points {own_hypervolume(fine, stage0, **area):.3f}"
                     f", best trial {scores[best]:.3f} ({describe(trials[best])}), rounds "
                     f"per trial {sorted((len(g) for g in trials.values()), reverse=True)}")
    fine_tuned = {schedule_key(g.iloc[0]): g
                  for _, g in full[full["phase"] == "full"].groupby("trial_id")}
    screened = {t: g for t, g in two[two["phase"] == "screen"].groupby("trial_id")}
    picks = spread_picks(screened, count, baseline, floor)
    known = [fine_tuned.get(schedule_key(screened[t].iloc[0])) for t in picks]
    found = sum(k is not None for k in known)
    if found == len(picks):
        union = own_hypervolume(*known, stage0, **area)
        result = f"their fine-tuned points {union:.3f}"
    else:
        result = f"{found} of {len(picks)} fine-tuned in {full_arm}"
    lines.append(f"  spread-seeking picks: {'; '.join(describe(screened[t]) for t in picks)}"
                 f" -> {result}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", required=True, help="a search_hypervolume.py --work-dir")
    p.add_argument("--setting", required=True, metavar="MODEL:DATASET")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--full", default="full-random", help="full-search arm folder")
    p.add_argument("--screened", default="screen-gp", help="two-phase arm folder")
    p.add_argument("--floor", type=float, default=5.0, help="as search_hypervolume.py's")
    p.add_argument("--finalists", type=int, default=3, help="picks of the simulated rule")
    args = p.parse_args(argv)
    for seed in args.seeds:
        run = Path(args.work_dir) / f"{args.setting.replace(':', '-')}-seed{seed}"
        if not run.is_dir():
            p.error(f"--work-dir/--setting: no run folder {run}")
        print(f"seed {seed}")
        print("\n".join(review(run, args.full, args.screened, args.floor, args.finalists)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
