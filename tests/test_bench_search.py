"""benchmarks/search_hypervolume.py's report from cached arms: per-seed hypervolume at equal
compute, --budget-arms and --reference (no search runs: every arm is in the cache)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "search_hypervolume.py"
SETTING = "resnet20:digits"
SIZES = ["--trials", "12", "--screen", "24", "--finalists", "3"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("search_hypervolume", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def arm(name: str, hv_curve: list[tuple[float, float]], compute_s: float) -> dict:
    """A finished arm as the benchmark caches it: its curve ends at its final hypervolume."""
    def phase(trials: int, share: float) -> dict:
        return {"trials": trials, "compute_s": share * compute_s, "stopped_early": 0}

    phases = ({"full": phase(12, 1.0)} if name.startswith("full:")
              else {"screen": phase(24, 0.5), "finetune": phase(3, 0.5)})
    return {"hv": hv_curve[-1][1], "compute_s": compute_s, "unit": "cpu",
            "curve": [list(p) for p in hv_curve], "phases": phases,
            "deployable_points": 3, "best_flops_reduction_1pt": 30.0, "wall_s": 10.0}


# per seed: (curve, total compute). screen:gp is the cheapest arm on both seeds.
ARMS = {
    "full:random": [([(50, 1.0), (100, 2.0)], 100), ([(40, 0.5), (110, 1.5)], 110)],
    "screen:gp": [([(60, 1.5), (80, 2.5)], 80), ([(70, 1.0), (90, 1.2)], 90)],
    "screen:random": [([(90, 3.0), (120, 3.5)], 120), ([(30, 0.2), (100, 2.0)], 100)],
}


def write_cache(bench, folder: Path, arms: dict, argv: list[str]) -> None:
    args = bench.build_parser().parse_args(argv)
    settings = {k: getattr(args, k) for k in bench.SETTINGS}
    cached = {bench.key_of(SETTING, seed, name): arm(name, curve, total)
              for name, runs in arms.items() for seed, (curve, total) in enumerate(runs)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "arms.json").write_text(json.dumps({"settings": settings, "arms": cached}))


def report(bench, tmp_path: Path, *more: str) -> str:
    work = tmp_path / "work"
    argv = ["--settings", SETTING, "--seeds", "0", "1", "--arms", *ARMS, *SIZES,
            "--work-dir", str(work), "--out", str(tmp_path / "out.md")]
    write_cache(bench, work, ARMS, argv)
    assert bench.main([*argv, *more]) == 0
    return (tmp_path / "out.md").read_text()


def per_seed_rows(text: str) -> dict[str, list[float]]:
    start = text.index("Hypervolume at equal compute, per seed")
    rows = {}
    for line in text[start:].splitlines()[4:]:
        if not line.startswith("| "):
            break
        name, *values = [c.strip() for c in line.strip("|").split("|")]
        rows[name] = [float(v) for v in values]
    return rows


def test_per_seed_at_the_cheapest_arms_total(bench, tmp_path):
    text = report(bench, tmp_path)
    assert "budget 80 / 90 cpu-s: the smallest total of every arm without early" in text
    # what each arm had by 80 (seed 0) and 90 (seed 1) compute-seconds
    assert per_seed_rows(text) == {"full:random": [1.0, 0.5], "screen:gp": [2.5, 1.2],
                                   "screen:random": [0.0, 0.2]}
    assert "screen:gp, beat screen:random on 2 of 2 seeds" in text


def test_budget_arms_move_the_budget(bench, tmp_path):
    text = report(bench, tmp_path, "--budget-arms", "full:random", "screen:random")
    assert "budget 100 / 100 cpu-s: the smallest total of full:random, screen:random" in text
    assert per_seed_rows(text) == {"full:random": [2.0, 0.5], "screen:gp": [2.5, 1.2],
                                   "screen:random": [3.0, 2.0]}
    # at 100 s two-phase random sampling is ahead on both seeds
    assert "screen:random, beat full:random on 2 of 2 seeds" in text


def test_reference_reports_the_compute_to_reach_its_full_search(bench, tmp_path):
    reference = tmp_path / "reference"
    write_cache(bench, reference,
                {"full:random": [([(100, 1.0), (200, 2.2)], 200), ([(300, 1.1)], 300)]},
                ["--trials", "24", "--screen", "24", "--finalists", "3"])
    text = report(bench, tmp_path, "--reference", str(reference))
    assert "best full search (24 trials)" in text and "2.200 / 1.100 at 200 / 300 s" in text
    # screen:gp reaches 2.2 at 80 s (40 % of 200) on seed 0, 1.1 at 90 s (30 %) on seed 1
    assert "- screen:gp: compute to reach the reference's final hypervolume, per seed " \
           "(% of the reference's compute): 40 % / 30 %." in text
    assert "- screen:random: compute to reach the reference's final hypervolume, per seed " \
           "(% of the reference's compute): 45 % / 33 %." in text


def test_bad_budget_arm_and_reference_are_one_line_errors(bench, tmp_path):
    argv = ["--settings", SETTING, "--arms", "full:random", "screen:gp", *SIZES,
            "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "o.md")]
    with pytest.raises(SystemExit, match="--budget-arms 'screen:tpe' is not one of --arms"):
        bench.main([*argv, "--budget-arms", "screen:tpe"])
    with pytest.raises(SystemExit, match="--reference .*nowhere.* has no arms.json"):
        bench.main([*argv, "--reference", str(tmp_path / "nowhere")])
    other = tmp_path / "other"
    write_cache(bench, other, {"full:random": ARMS["full:random"]}, [*SIZES, "--floor", "3"])
    with pytest.raises(SystemExit, match="made with other floor; its hypervolumes are not"):
        bench.main([*argv, "--reference", str(other)])


def test_plot_dir_draws_each_setting_and_links_it(bench, tmp_path):
    text = report(bench, tmp_path, "--plot-dir", str(tmp_path / "img"))
    png = tmp_path / "img" / "hypervolume-resnet20-digits.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![hypervolume against compute, resnet20:digits](img/hypervolume-resnet20-digits.png)" \
        in text


def test_steps_hold_the_last_value_to_the_arms_total(bench):
    assert bench.steps(arm("screen:gp", [(0, 0.0), (60, 1.5), (80, 2.5)], 95)) == \
        ([0.0, 60.0, 80.0, 95.0], [0.0, 1.5, 2.5, 2.5])
    assert bench.steps(arm("full:random", [(0, 0.0), (100, 2.0)], 100)) == \
        ([0.0, 100.0], [0.0, 2.0])
