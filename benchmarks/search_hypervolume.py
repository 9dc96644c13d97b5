"""Benchmark: hypervolume vs compute of the full search and the two-phase search.

Arms (each a real `search/run.py` run, in this process, on a local Ray):
- full:<sampler>: every trial fine-tunes after every round (--num-samples T);
- screen:<sampler>: the two-phase search (--screen N --finalists K): N schedules sampled by
  Optuna and screened with adaptive-BN evaluation only, then the K nearest the screened
  frontier fine-tuned;
- a third part, e.g. screen:tpe:asha, adds --early-stop asha (or median); screen:gp:eval2000
  adds --screen-eval-images 2000 (screened rounds evaluated on a fixed 2000 test images),
  screen:gp:start4 adds --startup-trials 4 (the model picks after 4 random trials, not 10).
Per model, dataset and seed, stage 0 is trained once and shared by every arm (its cache is
keyed by its settings, which are equal).

Compute is measured, not estimated: each trial reports the CPU-seconds (GPU-seconds on GPUs)
it has used by each round (ccpcsa/search/compute.py). An arm's trials are laid end to end in the
order Tune created them (screening first), so each fine-tuned point becomes available at the
compute spent before its trial plus its trial's compute by that round; the hypervolume of
the deployable points available at each budget is the arm's curve. Stage 0 (the same for
every arm) and Ray's own processes are not counted. Hypervolume: area dominated in (fraction
of the baseline's FLOPs saved) x (accuracy points above baseline - FLOOR) (search.pareto).

Resumable: each finished arm is kept in <work-dir>/arms.json and its run folder under
<work-dir>; an arm interrupted mid-way is continued with --resume. A cache made with other
settings is refused.

Usage: python benchmarks/search_hypervolume.py --help   (commands: docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/sections.py

from resumable import load_cache, save_cache  # noqa: E402
from sections import write_section  # noqa: E402

from ccpcsa.search.config import EARLY_STOPS as SEARCH_EARLY_STOPS  # noqa: E402
from ccpcsa.search.pareto import hypervolume, read_frontier  # noqa: E402

SECTION = "## Search: two-phase (adaptive-BN screening + fine-tuned finalists) vs full search"
OLD_SECTION = "## Search: Optuna vs random search vs the paper's fixed schedule"
CACHE_FILE = "arms.json"
# The reduced default grid (docs/benchmarks.md states why and what the full one costs).
DEFAULT_SETTINGS = ["resnet20:digits", "resnet20:fashion-mnist", "resnet56:digits"]
DEFAULT_ARMS = ["full:random", "full:tpe", "full:nsga2", "screen:random", "screen:tpe",
                "screen:nsga2", "screen:gp", "screen:tpe:asha"]
DATASET_FLAGS = {"fashion-mnist": "--train-subset 6000 --image-size 16"}
SETTINGS = ("trials", "screen", "finalists", "floor", "extra", "dataset_flags")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/search_hypervolume.py",
        description="Hypervolume vs measured compute of the full search and the two-phase "
                    "search, per sampler, model, dataset and seed; writes its section of "
                    "--out. Resumable through --work-dir.")
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, metavar="MODEL:DATASET",
                   help="model and dataset pairs (default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="seeds; each gets its own stage 0, shared by its arms "
                        "(default: %(default)s)")
    p.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, metavar="KIND:SAMPLER[:STOP]",
                   help="full:<sampler> or screen:<sampler>, optionally :asha or :median "
                        "(early stopping), for screen arms :evalN (screened rounds "
                        "evaluated on N test images), for tpe and gp :startN (N random "
                        "trials before the model) (default: %(default)s)")
    p.add_argument("--trials", type=int, default=12, help="trials of a full search "
                   "(default: %(default)s)")
    p.add_argument("--screen", type=int, default=48,
                   help="screened schedules of a two-phase search (default: %(default)s)")
    p.add_argument("--finalists", type=int, default=4,
                   help="fine-tuned finalists of a two-phase search (default: %(default)s)")
    p.add_argument("--floor", type=float, default=5.0,
                   help="hypervolume counts accuracy above baseline - FLOOR points "
                        "(default: %(default)s)")
    p.add_argument("--extra", default="--baseline-epochs 10 --attention-epochs 3 "
                   "--max-rounds 6 --tolerance 1.0",
                   help="flags passed to every search (default: %(default)s)")
    p.add_argument("--dataset-flags", default=json.dumps(DATASET_FLAGS),
                   help="JSON: dataset -> more flags for its searches (default: %(default)s)")
    p.add_argument("--work-dir", default="runs/bench-search",
                   help="run folders and the cache of finished arms (default: %(default)s)")
    p.add_argument("--budget-arms", nargs="+", metavar="ARM",
                   help="arms whose smallest total compute, per seed, is the equal-compute "
                        "budget (default: every arm of --arms without early stopping)")
    p.add_argument("--reference", metavar="WORK_DIR",
                   help="the --work-dir of another run of this benchmark with the same "
                        "model, data, seeds, --floor, --extra and --dataset-flags (e.g. a "
                        "full search with more --trials): also report, per seed, the compute "
                        "each two-phase arm took to reach its best full search's final "
                        "hypervolume, as a share of that search's compute")
    p.add_argument("--plot-dir", metavar="DIR",
                   help="also draw each model and dataset's hypervolume against compute, one "
                        "panel per seed, every arm a step line (dashed: full searches; "
                        "dotted vertical: the equal-compute budget), to "
                        "DIR/hypervolume-<model>-<dataset>.png, linked from the report")
    p.add_argument("--out", default="docs/benchmarks.md",
                   help="Markdown file whose section of this benchmark is rewritten "
                        "(default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the searches and exit")
    return p


def check_args(args: argparse.Namespace) -> dict | None:
    """One-line errors for arms, budget arms and a reference that cannot be used; the
    reference's cache, read once here, when there is one."""
    for arm in args.arms:
        arm_flags(arm, args)
    for arm in args.budget_arms or []:
        if arm not in args.arms:
            raise SystemExit(f"error: --budget-arms {arm!r} is not one of --arms "
                             f"({' '.join(args.arms)})")
    return load_reference(args) if args.reference is not None else None


# ---------------------------------------------------------------- running the arms


EARLY_STOPS = tuple(s for s in SEARCH_EARLY_STOPS if s != "off")  # what an arm may add


def early_stopped(arm: str) -> bool:
    """Arms with --early-stop end trials early by design: compared apart."""
    return any(part in EARLY_STOPS for part in arm.split(":")[2:])


def arm_flags(arm: str, args: argparse.Namespace) -> list[str]:
    kind, sampler, *stop = arm.split(":")
    flags = ["--sampler", sampler]
    if kind == "full":
        flags += ["--num-samples", str(args.trials)]
    elif kind == "screen":
        flags += ["--screen", str(args.screen), "--finalists", str(args.finalists)]
    else:
        raise SystemExit(f"error: arm {arm!r}: kind must be full or screen")
    for extra in stop:
        if extra.startswith("eval") and extra[4:].isdigit() and kind == "screen":
            flags += ["--screen-eval-images", extra[4:]]
        elif extra.startswith("start") and extra[5:].isdigit():
            flags += ["--startup-trials", extra[5:]]
        elif extra in EARLY_STOPS:
            flags += ["--early-stop", extra]
        else:
            raise SystemExit(f"error: arm {arm!r}: {extra!r} is not asha, median, startN or "
                             "(screen arms) evalN")
    return flags


def search_argv(setting: str, seed: int, arm: str, args: argparse.Namespace) -> list[str]:
    model, dataset = setting.split(":")
    extra = json.loads(args.dataset_flags).get(dataset, "")
    return ["--model", model, "--dataset", dataset, "--seed", str(seed),
            *shlex.split(args.extra), *shlex.split(extra), *arm_flags(arm, args)]


def run_folder(args: argparse.Namespace, setting: str, seed: int, arm: str) -> Path:
    return Path(args.work_dir) / f"{setting.replace(':', '-')}-seed{seed}" / arm.replace(":", "-")


def run_arm(setting: str, seed: int, arm: str, args: argparse.Namespace) -> dict:
    from ccpcsa.search import run as search_run

    folder = run_folder(args, setting, seed, arm)
    argv = ["--storage", str(folder.parent), "--name", folder.name,
            *search_argv(setting, seed, arm, args)]
    if (folder / "search_config.json").exists():
        argv = ["--storage", str(folder.parent), "--name", folder.name, "--resume"]
    else:
        shared = next((p / "stage0" for p in folder.parent.iterdir()
                       if (p / "stage0" / "prepare.json").exists()), None) \
            if folder.parent.exists() else None
        if shared is not None:  # stage 0 once per model, dataset and seed
            shutil.copytree(shared, folder / "stage0")
    start = time.perf_counter()
    code = search_run.main(argv)
    if code in (130, 143):
        raise KeyboardInterrupt
    if code != 0:
        raise SystemExit(f"search {folder} failed with exit code {code}")
    measured = measure(folder, args.floor)
    measured["wall_s"] = time.perf_counter() - start
    return measured


def measure(run_dir: Path, floor: float) -> dict:
    """The arm's final hypervolume, its compute and its hypervolume-vs-compute curve."""
    from ccpcsa.search.ondisk import scan_trials

    frame, baseline = read_frontier(str(run_dir))
    ref_accuracy = baseline["accuracy"] - floor
    phases = ([("screen", run_dir / "screen"), ("finetune", run_dir / "finetune")]
              if (run_dir / "screen").exists() else [("full", run_dir)])
    stage0 = frame[frame["phase"] == "stage0"]
    points = [(0.0, float(a), float(f)) for a, f in zip(stage0["accuracy"], stage0["flops"],
                                                        strict=True)]
    spent, per_phase, unit = 0.0, {}, "cpu"
    for phase, folder in phases:
        trials = scan_trials(str(folder), phase)
        costs = []
        for trial in trials:
            reported = [p["compute_s"] for p in trial.rounds.values()
                        if p.get("compute_s") is not None]
            final = (trial.final or {}).get("compute_s")
            total = float(final if final is not None else max(reported, default=0.0))
            unit = next((p["compute_unit"] for p in trial.rounds.values()
                         if p.get("compute_unit")), unit)
            if phase != "screen":
                points += [(spent + float(p["compute_s"] or 0.0), p["accuracy"], p["flops"])
                           for p in trial.rounds.values()]
            spent += total
            costs.append(total)
        per_phase[phase] = {"trials": len(trials), "compute_s": sum(costs),
                            "stopped_early": sum(t.status == "stopped early" for t in trials)}
    points.sort()
    curve, seen = [], []
    for at, accuracy, flops in points:
        seen.append((accuracy, flops))
        hv = hypervolume([a for a, _ in seen], [f for _, f in seen], baseline["flops"],
                         ref_accuracy)
        if not curve or hv > curve[-1][1]:
            curve.append((at, hv))
    hv_final = hypervolume(frame.loc[frame["pareto"], "accuracy"],
                           frame.loc[frame["pareto"], "flops"], baseline["flops"], ref_accuracy)
    within = frame[frame["pareto"] & (frame["accuracy"] >= baseline["accuracy"] - 1.0)]
    return {"hv": hv_final, "compute_s": spent, "unit": unit, "curve": curve,
            "phases": per_phase, "deployable_points": int(frame["deployable"].sum()),
            "best_flops_reduction_1pt": float(within["flops_reduction"].max())
            if len(within) else 0.0}


def hv_at(result: dict, budget: float) -> float:
    """Hypervolume of what the arm had at `budget` compute-seconds (stage 0 alone at 0)."""
    return max((hv for at, hv in result["curve"] if at <= budget), default=0.0)


def compute_to_reach(result: dict, target: float) -> float | None:
    return next((at for at, hv in result["curve"] if hv >= target - 1e-12), None)


def reach_share(result: dict, target: dict) -> str:
    """The compute `result` took to reach `target`'s final hypervolume, in % of target's."""
    at = compute_to_reach(result, target["hv"])
    return "not reached" if at is None else f"{100 * at / target['compute_s']:.0f} %"


# ---------------------------------------------------------------- cache


def load_arms(args: argparse.Namespace) -> dict:
    return load_cache(str(Path(args.work_dir) / CACHE_FILE),
                      {k: getattr(args, k) for k in SETTINGS}, {"arms": {}}, "--work-dir")


def save_arms(args: argparse.Namespace, cache: dict) -> None:
    save_cache(str(Path(args.work_dir) / CACHE_FILE), cache)


def key_of(setting: str, seed: int, arm: str) -> str:
    return f"{setting}|{seed}|{arm}"


# what must match for two caches' hypervolumes to be comparable (not the searches' sizes)
COMPARABLE = ("floor", "extra", "dataset_flags")


def load_reference(args: argparse.Namespace) -> dict:
    """--reference's cache (settings and finished arms), refused unless comparable."""
    path = Path(args.reference) / CACHE_FILE
    if not path.exists():
        raise SystemExit(f"error: --reference {args.reference!r} has no {CACHE_FILE}")
    stored = json.loads(path.read_text(encoding="utf-8"))
    differs = [k for k in COMPARABLE if stored["settings"].get(k) != getattr(args, k)]
    if differs:
        raise SystemExit(f"error: --reference {args.reference!r} was made with other "
                         f"{', '.join(differs)}; its hypervolumes are not comparable")
    return stored


def best_of(results) -> dict | None:
    """The result with the largest final hypervolume (None when there is none)."""
    return max(results, key=lambda r: r["hv"], default=None)


# ---------------------------------------------------------------- report


def _ms(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def render_setting(setting: str, cache: dict, args: argparse.Namespace,
                   reference: dict | None = None) -> list[str]:
    arms = [a for a in args.arms if all(key_of(setting, s, a) in cache["arms"]
                                        for s in args.seeds)]
    if not arms:
        return []
    res = {a: [cache["arms"][key_of(setting, s, a)] for s in args.seeds] for a in arms}
    full = [a for a in arms if a.startswith("full:")]
    screened = [a for a in arms if a.startswith("screen:") and not early_stopped(a)]
    seeds = range(len(args.seeds))
    unit = res[arms[0]][0]["unit"]
    # the target: each seed's best full search, and the compute it took
    target = [best_of(res[a][i] for a in full) for i in seeds]
    # early-stopped arms end early by design and are compared apart, unless named
    plain = [a for a in arms if not early_stopped(a)] or arms
    budget = budget_arms(setting, arms, args) or plain
    equal = [min(res[a][i]["compute_s"] for a in budget) for i in seeds]
    comparable = [a for a in arms if a in plain or a in budget]

    def at_equal(arm: str) -> str:
        if arm not in comparable:
            return "not comparable: early stopping, see below"
        return _ms([hv_at(res[arm][i], equal[i]) for i in seeds])

    rows = []
    for arm in arms:
        reach = []
        for i in seeds:
            if target[i] is None or arm in full:
                continue
            reach.append(reach_share(res[arm][i], target[i]))
        rows.append(
            f"| {arm} | {_ms([r['hv'] for r in res[arm]])} | "
            f"{' / '.join(format(r['hv'], '.3f') for r in res[arm])} | "
            f"{_ms([r['compute_s'] for r in res[arm]], 0)} | "
            f"{at_equal(arm)} | "
            f"{' / '.join(reach) or '-'} | "
            f"{_ms([r['best_flops_reduction_1pt'] for r in res[arm]], 1)} | "
            f"{_ms([r['wall_s'] for r in res[arm]], 0)} |")
    lines = [f"### {setting.replace(':', ' on ')}", "",
             f"| arm | hypervolume (mean ± std) | per seed | compute ({unit}-s) | "
             "hypervolume at equal compute | compute to reach the best full search's "
             "hypervolume, per seed (% of its compute) | best FLOPs↓ % within 1 point | "
             "wall s |",
             "|---|---|---|---|---|---|---|---|", *rows, ""]
    lines += per_seed_at_equal(res, comparable, budget, equal, args, unit)
    if args.plot_dir:
        path = plot_setting(setting, res, arms, equal, args, unit)
        link = os.path.relpath(path, os.path.dirname(os.path.abspath(args.out)))
        lines += [f"![hypervolume against compute, {setting}]({link})", ""]
    lines += _verdicts(res, full, screened, equal, target, seeds, args, budget)
    if reference is not None:
        lines += against_reference(setting, res, screened, args, reference)
    return lines


def steps(result: dict) -> tuple[list[float], list[float]]:
    """The arm's hypervolume curve as step points, held to the compute it ended at."""
    xs = [float(at) for at, _ in result["curve"]]
    ys = [float(hv) for _, hv in result["curve"]]
    if xs and result["compute_s"] > xs[-1]:
        xs.append(float(result["compute_s"]))
        ys.append(ys[-1])
    return xs, ys


def plot_setting(setting: str, res, arms: list[str], equal: list[float],
                 args: argparse.Namespace, unit: str) -> str:
    """One PNG per model and dataset: a panel per seed, hypervolume against compute."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.4 * len(args.seeds), 4.2), dpi=110)
    axes = fig.subplots(1, len(args.seeds), sharey=True, squeeze=False)[0]
    for i, (ax, seed) in enumerate(zip(axes, args.seeds, strict=True)):
        for arm in arms:
            xs, ys = steps(res[arm][i])
            ax.step(xs, ys, where="post", label=arm, linewidth=1.4,
                    linestyle="--" if arm.startswith("full:") else "-")
        ax.axvline(equal[i], color="0.4", linestyle=":", linewidth=1)
        ax.set_title(f"seed {seed}")
        ax.set_xlabel(f"compute ({unit}-s)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("hypervolume of the deployable points")
    columns = min(len(arms), 4)
    rows = -(-len(arms) // columns)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=columns,
               fontsize="small", frameon=False)
    fig.suptitle(f"{setting}: hypervolume against compute")
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    path = Path(args.plot_dir) / f"hypervolume-{setting.replace(':', '-')}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return str(path)


def budget_arms(setting: str, arms: list[str], args: argparse.Namespace) -> list[str]:
    """--budget-arms, each of which must have finished on every seed of `setting`."""
    missing = [a for a in args.budget_arms or [] if a not in arms]
    if missing:
        raise SystemExit(f"error: --budget-arms {missing[0]!r} has not finished on every "
                         f"seed of {setting}")
    return list(args.budget_arms or [])


def per_seed_at_equal(res, arms, budget, equal, args, unit) -> list[str]:
    """Each arm's hypervolume at each seed's equal-compute budget, and the budget itself."""
    head = " | ".join(f"seed {s}" for s in args.seeds)
    rows = [f"| {arm} | " + " | ".join(f"{hv_at(res[arm][i], e):.3f}"
                                        for i, e in enumerate(equal)) + " |" for arm in arms]
    budgets = " / ".join(f"{e:.0f}" for e in equal)
    return [f"Hypervolume at equal compute, per seed (budget {budgets} {unit}-s: the smallest "
            f"total of {budget_label(budget, args)}):", "",
            f"| arm | {head} |", "|---|" + "---|" * len(equal), *rows, ""]


def budget_label(budget: list[str], args: argparse.Namespace) -> str:
    return ", ".join(budget) if args.budget_arms else "every arm without early stopping"


def against_reference(setting: str, res, screened, args, reference: dict) -> list[str]:
    """Per seed, the compute each two-phase arm took to reach --reference's best full search."""
    targets = [best_of(r for k, r in reference["arms"].items()
                       if k.startswith(key_of(setting, s, "full:"))) for s in args.seeds]
    if any(t is None for t in targets):
        return [f"- --reference {args.reference}: no full search of {setting} on every seed.",
                ""]
    trials = reference["settings"].get("trials")
    out = [f"- Reference: the best full search ({trials} trials) in {args.reference}, per seed "
           "hypervolume " + " / ".join(f"{t['hv']:.3f}" for t in targets) + " at "
           + " / ".join(f"{t['compute_s']:.0f}" for t in targets) + " s."]
    for arm in screened:
        reach = [reach_share(res[arm][i], target) for i, target in enumerate(targets)]
        out.append(f"- {arm}: compute to reach the reference's final hypervolume, per seed "
                   f"(% of the reference's compute): {' / '.join(reach)}.")
    return [*out, ""]


def _against(res, arm: str, plain: str, seeds) -> tuple[list[float], list[float]]:
    """Per seed: the fraction of `plain`'s compute that `arm` saved, and its hypervolume
    minus `plain`'s."""
    saved = [1 - res[arm][i]["compute_s"] / res[plain][i]["compute_s"] for i in seeds]
    return saved, [res[arm][i]["hv"] - res[plain][i]["hv"] for i in seeds]


def _wins_at(res, arm: str, rival: str, equal: list[float], seeds) -> int:
    """Seeds on which `arm` had the larger hypervolume at the seed's equal-compute budget."""
    return sum(hv_at(res[arm][i], equal[i]) > hv_at(res[rival][i], equal[i]) for i in seeds)


def _verdicts(res, full, screened, equal, target, seeds, args, budget) -> list[str]:
    out = []
    n = len(args.seeds)
    for arm in screened:
        fractions = []
        for i in seeds:
            at = compute_to_reach(res[arm][i], target[i]["hv"]) if target[i] else None
            fractions.append(None if at is None else at / target[i]["compute_s"])
        met = sum(f is not None and f <= 0.25 for f in fractions)
        out.append(f"- {arm} reached the best full search's final hypervolume within 25 % "
                   f"of its compute on {met} of {n} seeds.")
    if screened:
        best = max(screened, key=lambda a: statistics.mean(hv_at(res[a][i], equal[i])
                                                            for i in seeds))
        rivals = [r for r in ("screen:random", "full:random") if r in res and r != best]
        for rival in rivals:
            wins = _wins_at(res, best, rival, equal, seeds)
            budgets = ", ".join(f"{e:.0f}" for e in equal)
            out.append(f"- At equal compute (per seed the smallest total of "
                       f"{budget_label(budget, args)}: {budgets} s) the best two-phase "
                       f"sampler, {best}, beat {rival} on {wins} of {n} seeds"
                       f"{' (target: every seed)' if rival == 'screen:random' else ''}.")
    for prefix, what in (("eval", "Screening on a test subset"),
                         ("start", "Fewer random start-up trials")):
        for arm in [a for a in res if a.split(":")[-1].startswith(prefix)]:
            plain = arm.rsplit(":", 1)[0]
            if plain not in res:
                continue
            saved, delta = _against(res, arm, plain, seeds)
            wins = _wins_at(res, arm, plain, equal, seeds)
            out.append(f"- {what} ({arm} vs {plain}): compute "
                       f"{_ms([100 * s for s in saved], 0)} % lower, final hypervolume "
                       f"{_ms(delta)} (higher on {sum(d > 0 for d in delta)} of {n} seeds), "
                       f"ahead at equal compute on {wins} of {n} seeds.")
    for arm in [a for a in res if early_stopped(a)]:
        plain = ":".join(p for p in arm.split(":") if p not in EARLY_STOPS)
        if plain not in res:
            continue
        saved, delta = _against(res, arm, plain, seeds)
        stopped = [sum(p.get("stopped_early", 0) for p in res[arm][i]["phases"].values())
                   for i in seeds]
        keep = all(d >= 0 for d in delta) and all(s > 0 for s in saved)
        out.append(f"- Early stopping ({arm} vs {plain}): {sum(stopped)} trial(s) stopped, "
                   f"compute {_ms([100 * s for s in saved], 0)} % lower, final hypervolume "
                   f"{_ms(delta)} ({'no loss on any seed' if keep else 'lower on some seed'});"
                   f" so --early-stop stays {'a candidate default' if keep else 'off'}.")
    tuned_costs = [r["phases"][p]["compute_s"] / max(1, r["phases"][p]["trials"])
                   for a in res for r in res[a] for p in ("full", "finetune")
                   if p in r["phases"] and r["phases"][p]["trials"]]
    for arm in screened:
        screen_costs = [r["phases"]["screen"]["compute_s"]
                        / max(1, r["phases"]["screen"]["trials"]) for r in res[arm]]
        if tuned_costs:
            out.append(f"- {arm}: mean compute per screened trial "
                       f"{statistics.mean(screen_costs):.1f} s, per fine-tuned trial (all arms) "
                       f"{statistics.mean(tuned_costs):.1f} s (ratio "
                       f"{statistics.mean(screen_costs) / statistics.mean(tuned_costs):.2f}).")
    return [*out, ""]


def render(cache: dict, args: argparse.Namespace, wall_s: float,
           reference: dict | None = None) -> str:
    from ccpcsa.search.config import SearchConfig

    body = [line for setting in args.settings
            for line in render_setting(setting, cache, args, reference)]
    command = "python benchmarks/search_hypervolume.py " + shlex.join(sys.argv[1:])
    return "\n".join([
        SECTION, "",
        f"Command: `{command}`  ",
        f"Machine: {os.cpu_count()}-core {platform.machine()} CPU, no GPU; wall time of this "
        f"run {wall_s / 60:.1f} min (finished arms are cached in {args.work_dir}).", "",
        f"Full search: {args.trials} trials, each fine-tuning after every round. Two-phase: "
        f"{args.screen} schedules screened (adaptive-BN evaluation, no fine-tune), then "
        f"{args.finalists} finalists fine-tuned. Flags of every search: `{args.extra}`; per "
        f"dataset: `{args.dataset_flags}`. Seeds {args.seeds}; stage 0 shared by the arms of "
        f"a seed and not counted. Compute: measured CPU-seconds of the trial processes, "
        "trials laid end to end in creation order (Ray's own processes not counted). "
        f"Hypervolume of the deployable points in (fraction of baseline FLOPs saved) x "
        f"(accuracy points above baseline - {args.floor}); larger is better. *Equal "
        "compute*: per seed, every arm's hypervolume at the total compute of the cheapest "
        "arm (or of --budget-arms). ccpcsa/search/config.py's default sampler: "
        f"{SearchConfig().sampler}.", "",
        "Reduced grid (the full one — resnet20 and resnet56 on both datasets, the whole "
        "Fashion-MNIST training split at 28 px — would take well over 3 h on 2 cores): "
        f"{', '.join(args.settings)}; Fashion-MNIST with the per-dataset flags above (a "
        "fixed training subset; the 10,000-image test split whole).", "",
        *body])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reference = check_args(args)  # fails early, before any search runs
    cache = load_arms(args)
    todo = [(setting, seed, arm) for setting in args.settings for seed in args.seeds
            for arm in args.arms if key_of(setting, seed, arm) not in cache["arms"]]
    if args.dry_run:
        for setting, seed, arm in todo:
            print("python search/run.py " + shlex.join(search_argv(setting, seed, arm, args)))
        print(f"{len(todo)} arm(s) to run, {len(cache['arms'])} cached")
        return 0
    start = time.perf_counter()
    for setting, seed, arm in todo:
        result = run_arm(setting, seed, arm, args)
        cache["arms"][key_of(setting, seed, arm)] = result
        save_arms(args, cache)
        print(f"{setting} seed {seed} {arm}: hypervolume {result['hv']:.3f}, compute "
              f"{result['compute_s']:.0f} {result['unit']}-s, wall {result['wall_s']:.0f} s",
              flush=True)
    text = render(cache, args, time.perf_counter() - start, reference)
    write_section(args.out, SECTION, text, replaces=OLD_SECTION)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
