"""Pareto frontier maths, Parquet round trip, plot, checkpoint collection and the report CLI."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ccpcsa.search.pareto import (
    collect_checkpoints,
    format_table,
    human,
    hypervolume,
    mark_frontier,
    pareto_mask,
    plot_frontier,
    read_frontier,
    write_frontier,
)

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BASELINE = {"accuracy": 76.0, "flops": 4_100_000_000, "params": 25_500_000}


def brute_force_mask(accuracy: np.ndarray, flops: np.ndarray) -> np.ndarray:
    n = len(accuracy)
    mask = np.zeros(n, dtype=bool)
    for i in range(n):
        if math.isnan(accuracy[i]) or math.isnan(flops[i]):
            continue
        mask[i] = True
        for j in range(n):
            if j == i or math.isnan(accuracy[j]) or math.isnan(flops[j]):
                continue
            ge = accuracy[j] >= accuracy[i] and flops[j] <= flops[i]
            strict = accuracy[j] > accuracy[i] or flops[j] < flops[i]
            if ge and strict:
                mask[i] = False
                break
    return mask


def as_list(mask: np.ndarray) -> list[bool]:
    return [bool(m) for m in mask]


# --------------------------------------------------------------------------- pareto_mask


def test_pareto_simple_chain_and_dominated():
    acc = [70.0, 75.0, 72.0, 80.0, 74.0]
    flops = [100, 200, 300, 400, 200]
    # (72, 300) dominated by (75, 200); (74, 200) dominated by (75, 200)
    assert as_list(pareto_mask(acc, flops)) == [True, True, False, True, False]


def test_pareto_ties_in_accuracy_keep_only_cheapest():
    acc = [75.0, 75.0, 75.0]
    flops = [300, 100, 200]
    assert as_list(pareto_mask(acc, flops)) == [False, True, False]


def test_pareto_ties_in_flops_keep_only_most_accurate():
    acc = [70.0, 74.0, 72.0]
    flops = [100, 100, 100]
    assert as_list(pareto_mask(acc, flops)) == [False, True, False]


def test_pareto_exact_duplicates_all_marked():
    acc = [75.0, 75.0, 70.0, 80.0, 80.0, 60.0]
    flops = [200, 200, 100, 400, 400, 150]
    assert as_list(pareto_mask(acc, flops)) == [True, True, True, True, True, False]


def test_pareto_duplicates_of_dominated_point_all_dropped():
    acc = [70.0, 70.0, 75.0]
    flops = [200, 200, 100]
    assert as_list(pareto_mask(acc, flops)) == [False, False, True]


def test_pareto_single_point_and_empty():
    assert as_list(pareto_mask([50.0], [10])) == [True]
    assert pareto_mask([], []).shape == (0,)


def test_pareto_nan_rows_never_pareto_and_do_not_dominate():
    acc = [float("nan"), 70.0, 99.0, 60.0]
    flops = [1.0, 100.0, float("nan"), 50.0]
    assert as_list(pareto_mask(acc, flops)) == [False, True, False, True]
    assert as_list(pareto_mask([float("nan")], [1.0])) == [False]


def test_pareto_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        pareto_mask([1.0, 2.0], [1.0])


@pytest.mark.parametrize("seed", range(12))
def test_pareto_matches_brute_force_on_random_sets(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 120))
    # few distinct values -> many ties and exact duplicates
    levels = int(rng.integers(2, 12))
    acc = rng.integers(0, levels, n).astype(float) * 2.5 + 50.0
    flops = rng.integers(1, levels + 1, n).astype(float) * 1e8
    if seed % 3 == 0:
        acc[rng.random(n) < 0.1] = np.nan
        flops[rng.random(n) < 0.1] = np.nan
    if seed % 4 == 1:  # continuous values too
        acc = rng.normal(70, 5, n)
        flops = rng.uniform(1e8, 4e9, n)
        dup = rng.integers(0, n, n // 2)
        acc[: n // 2], flops[: n // 2] = acc[dup], flops[dup]
    np.testing.assert_array_equal(pareto_mask(acc, flops), brute_force_mask(acc, flops))


# --------------------------------------------------------------------------- hypervolume


def test_hypervolume_one_point():
    # x = 1 - 250/1000 = 0.75, y = 80 - 0 = 80
    assert hypervolume([80.0], [250], ref_flops=1000) == pytest.approx(60.0)
    # with a reference accuracy: y = 80 - 70 = 10
    assert hypervolume([80.0], [250], ref_flops=1000, ref_accuracy=70.0) == pytest.approx(7.5)


def test_hypervolume_two_points():
    # A: x=0.75, y=10 ; B: x=0.5, y=20 -> 0.75*10 + 0.5*(20-10) = 12.5
    hv = hypervolume([70.0, 80.0], [250, 500], ref_flops=1000, ref_accuracy=60.0)
    assert hv == pytest.approx(12.5)


def test_hypervolume_dominated_point_adds_nothing():
    base = hypervolume([70.0, 80.0], [250, 500], ref_flops=1000, ref_accuracy=60.0)
    more = hypervolume([70.0, 80.0, 65.0, 80.0], [250, 500, 600, 500], 1000, 60.0)
    assert more == pytest.approx(base)


def test_hypervolume_points_worse_than_reference_give_zero():
    assert hypervolume([50.0], [100], ref_flops=1000, ref_accuracy=60.0) == 0.0
    assert hypervolume([90.0], [1500], ref_flops=1000, ref_accuracy=60.0) == 0.0
    assert hypervolume([90.0], [1000], ref_flops=1000, ref_accuracy=60.0) == 0.0
    assert hypervolume([], [], ref_flops=1000) == 0.0
    # a worse point next to a good one changes nothing
    assert hypervolume([80.0, 50.0], [250, 100], 1000, 60.0) == pytest.approx(0.75 * 20)


def test_hypervolume_rejects_bad_reference():
    with pytest.raises(ValueError):
        hypervolume([80.0], [10], ref_flops=0)


# --------------------------------------------------------------------------- fixtures


def make_points(ckpt_dir: Path | None = None) -> pd.DataFrame:
    rows = [
        ("t0", 0, 76.0, 4_100_000_000, 25_500_000),
        ("t0", 1, 75.8, 3_000_000_000, 20_000_000),
        ("t0", 2, 74.0, 2_000_000_000, 15_000_000),
        ("t1", 0, 76.0, 4_100_000_000, 25_500_000),
        ("t1", 1, 73.0, 3_100_000_000, 19_000_000),  # dominated
        ("t1", 2, 70.5, 900_000_000, 9_000_000),
        ("t2", 1, 71.0, 2_500_000_000, 16_000_000),  # dominated
    ]
    df = pd.DataFrame(rows, columns=["trial_id", "round", "accuracy", "flops", "params"])
    df["param_groups_per_round"] = [4, 4, 4, 8, 8, 8, 2]
    df["param_cap_layer1"] = [0.5, 0.5, 0.5, 0.3, 0.3, 0.3, 0.7]
    if ckpt_dir is None:
        df["checkpoint"] = [
            f"/nowhere/{t}_{r}.pt" for t, r in zip(df.trial_id, df["round"], strict=True)
        ]
        return df
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for t, r in zip(df.trial_id, df["round"], strict=True):
        p = ckpt_dir / f"{t}_r{r}.pt"
        p.write_bytes(f"weights {t} {r}".encode())
        paths.append(str(p))
    df["checkpoint"] = paths
    return df


# t1 round 0 is identical to t0 round 0 (76.0 %, 4.1 G): on the frontier once, as t0 round 0
EXPECTED_PARETO = [True, True, True, False, False, True, False]


def test_mark_frontier_adds_columns_without_mutating():
    df = make_points()
    marked = mark_frontier(df, BASELINE)
    assert "pareto" not in df.columns
    assert as_list(marked["pareto"]) == EXPECTED_PARETO
    assert list(marked["duplicate_of"]) == ["", "", "", "t0 round 0", "", "", ""]
    assert marked["flops_reduction"].iloc[0] == pytest.approx(0.0)
    assert marked["flops_reduction"].iloc[5] == pytest.approx(100 * (1 - 0.9 / 4.1))
    assert mark_frontier(df)["flops_reduction"].isna().all()


def test_identical_points_appear_once_as_the_cheapest_to_reproduce():
    df = make_points()
    df["compute_s"] = [50.0, 60.0, 70.0, 20.0, 30.0, 40.0, 10.0]
    marked = mark_frontier(df, BASELINE)
    # t1 round 0 cost 20 s against t0 round 0's 50 s: t1 round 0 is the one kept
    assert as_list(marked["pareto"]) == [False, True, True, True, False, True, False]
    assert marked["duplicate_of"].iloc[0] == "t1 round 0"
    # a point that was not measured counts as the most expensive
    df["compute_s"] = [math.nan, 60.0, 70.0, 20.0, 30.0, 40.0, 10.0]
    assert mark_frontier(df)["duplicate_of"].iloc[0] == "t1 round 0"


def test_only_deployable_points_make_the_frontier():
    df = make_points()
    df["deployable"] = [True, True, True, True, True, False, True]  # t1 round 2 was screened
    marked = mark_frontier(df, BASELINE)
    # without t1 round 2, t0 round 2 (74 %, 2 G) is the cheapest frontier point
    assert as_list(marked["pareto"]) == [True, True, True, False, False, False, False]
    table = format_table(marked, BASELINE, only_pareto=False)
    assert table.splitlines()[0].split()[-2] == "deployable"
    screened = [line for line in table.splitlines() if "900M" in line]
    assert len(screened) == 1 and " no " in screened[0] and not screened[0].startswith("*")


def test_table_states_phase_and_compute(tmp_path):
    df = make_points()
    df["phase"] = ["finetune"] * 7
    df["compute_s"] = [1.0, 2.0, 3.0, 1500.0, 5.0, 6.0, 7.0]
    df["compute_unit"] = ["gpu"] * 7
    lines = format_table(df, BASELINE).splitlines()
    assert lines[0].split()[:3] == ["trial", "round", "phase"]
    assert lines[0].split()[-2:] == ["compute", "checkpoint"]
    assert "1.5K gpu-s" in lines[-1] or "1 gpu-s" in lines[-1]
    assert lines[2].split()[2] == "finetune" and "6 gpu-s" in lines[2]
    plot_frontier(mark_frontier(df, BASELINE), str(tmp_path / "f.png"), BASELINE)


# --------------------------------------------------------------------------- parquet


def _check_round_trip(run_dir: str, expect_path: str) -> None:
    df = make_points()
    path = write_frontier(df, run_dir, BASELINE)
    assert path == expect_path
    back, baseline = read_frontier(run_dir)
    assert baseline == BASELINE
    assert as_list(back["pareto"]) == EXPECTED_PARETO
    expected = mark_frontier(df, BASELINE)
    pd.testing.assert_frame_equal(back, expected, check_dtype=False)


def test_write_read_round_trip_plain_path(tmp_path):
    run_dir = tmp_path / "runs" / "exp1"  # does not exist yet
    _check_round_trip(str(run_dir), str(run_dir / "frontier.parquet"))
    assert (run_dir / "frontier.parquet").is_file()


def test_write_read_round_trip_file_uri(tmp_path):
    run_dir = tmp_path / "uri-run"
    uri = run_dir.as_uri()
    assert uri.startswith("file://")
    _check_round_trip(uri, uri + "/frontier.parquet")
    assert (run_dir / "frontier.parquet").is_file()


def test_write_without_baseline_and_numpy_baseline(tmp_path):
    write_frontier(make_points(), str(tmp_path / "a"))
    assert read_frontier(str(tmp_path / "a"))[1] is None
    np_base = {"accuracy": np.float64(76.0), "flops": np.int64(4_100_000_000), "params": 3}
    write_frontier(make_points(), str(tmp_path / "b"), np_base)
    assert read_frontier(str(tmp_path / "b"))[1] == {
        "accuracy": 76.0,
        "flops": 4_100_000_000,
        "params": 3,
    }


def test_read_missing_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="run dir not found"):
        read_frontier(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="frontier.parquet"):
        read_frontier(str(tmp_path))


# --------------------------------------------------------------------------- plot & table


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        assert img.size[0] > 0 and img.size[1] > 0


def test_plot_frontier_writes_png(tmp_path):
    out = tmp_path / "plots" / "frontier.png"
    ret = plot_frontier(make_points(), str(out), BASELINE, title="test")
    assert ret == str(out)
    _assert_png(out)


def test_plot_frontier_file_uri_and_narrow_range(tmp_path):
    df = make_points()
    df = df[df["flops"] < 3_200_000_000]  # less than a decade of FLOPs
    uri = (tmp_path / "u" / "f.png").as_uri()
    assert plot_frontier(df, uri) == uri
    _assert_png(tmp_path / "u" / "f.png")


def test_plot_frontier_empty(tmp_path):
    df = make_points().iloc[:0]
    out = tmp_path / "empty.png"
    plot_frontier(df, str(out))
    _assert_png(out)


def test_format_table_pareto_sorted_by_flops():
    text = format_table(make_points(), BASELINE)
    lines = text.splitlines()
    assert "Δacc" in lines[0] and "FLOPs ↓ %" in lines[0] and "checkpoint" in lines[0]
    body = lines[2:]
    assert len(body) == sum(EXPECTED_PARETO)
    assert body[0].split()[:2] == ["t1", "2"]  # cheapest first
    assert "900M" in body[0] and "-5.50" in body[0] and "78.0" in body[0]
    assert body[-1].split()[0] in {"t0", "t1"} and "4.1G" in body[-1]
    col = lines[0].index("checkpoint")
    assert all(line.index("/nowhere/") == col for line in body)  # columns aligned
    assert lines[1].split()[-1] == "-" * len("/nowhere/t1_2.pt")


def test_format_table_all_rows_and_no_baseline():
    text = format_table(make_points(), None, only_pareto=False)
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["pareto", "trial"]
    body = lines[2:]
    assert len(body) == 7
    assert "-" in body[0].split()  # no baseline -> no deltas
    marked = [line.startswith("*") for line in body]
    assert sum(marked) == sum(EXPECTED_PARETO)
    assert not marked[2] and body[2].split()[0] == "t2"  # dominated row unmarked


def test_human_units():
    assert human(900_000_000) == "900M"
    assert human(4_100_000_000) == "4.1G"
    assert human(25_500_000) == "25.5M"
    assert human(1234) == "1.23K"
    assert human(12) == "12"
    assert human(float("nan")) == "-"


# --------------------------------------------------------------------------- checkpoints


def test_collect_checkpoints_copies_only_pareto(tmp_path):
    df = mark_frontier(make_points(tmp_path / "ckpts"), BASELINE)
    run_dir = tmp_path / "run"
    out = collect_checkpoints(df, str(run_dir))
    assert "frontier_checkpoint" not in df.columns
    copied = sorted(p.name for p in (run_dir / "frontier").iterdir())
    assert copied == [
        "t0_round0.pt",
        "t0_round1.pt",
        "t0_round2.pt",
        "t1_round2.pt",  # t1 round 0 is t0 round 0 again: one copy
    ]
    for rec in out.to_dict("records"):
        if rec["pareto"]:
            dest = Path(rec["frontier_checkpoint"])
            assert dest.parent == run_dir / "frontier"
            assert dest.read_bytes() == Path(rec["checkpoint"]).read_bytes()
        else:
            assert rec["frontier_checkpoint"] == ""


def test_collect_checkpoints_file_uri(tmp_path):
    df = make_points(tmp_path / "ckpts")
    df["checkpoint"] = [Path(p).as_uri() for p in df["checkpoint"]]  # URI sources too
    uri = (tmp_path / "urirun").as_uri()
    out = collect_checkpoints(df, uri)
    assert (tmp_path / "urirun" / "frontier" / "t1_round2.pt").read_bytes() == b"weights t1 2"
    assert out.loc[5, "frontier_checkpoint"] == uri + "/frontier/t1_round2.pt"
    assert len(list((tmp_path / "urirun" / "frontier").iterdir())) == sum(EXPECTED_PARETO)


def test_collect_checkpoints_missing_source_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        collect_checkpoints(make_points(), str(tmp_path / "run"))


# --------------------------------------------------------------------------- report CLI


def _run_report(*args: str, module: bool = False, cwd: Path = REPO):
    cmd = (
        [sys.executable, "-m", "ccpcsa.search.report"]
        if module
        else [sys.executable, str(REPO / "search" / "report.py")]
    )
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


def test_report_cli_prints_table_and_plots(tmp_path):
    run_dir = tmp_path / "run"
    write_frontier(make_points(), str(run_dir), BASELINE)
    proc = _run_report(str(run_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Δacc" in proc.stdout and "900M" in proc.stdout
    assert "t2" not in proc.stdout  # dominated-only trial hidden without --all
    _assert_png(run_dir / "frontier.png")

    plot = tmp_path / "elsewhere" / "p.png"
    proc = _run_report(str(run_dir), "--all", "--plot", str(plot), module=True)
    assert proc.returncode == 0, proc.stderr
    assert "t2" in proc.stdout
    _assert_png(plot)


def test_report_cli_missing_dir_exits_2(tmp_path):
    missing = tmp_path / "no-such-run"
    proc = _run_report(str(missing))
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err
    assert proc.stdout == ""


def test_report_main_in_process(tmp_path, capsys):
    from ccpcsa.search.report import main

    run_dir = tmp_path / "run"
    write_frontier(make_points(), str(run_dir), BASELINE)
    assert main([str(run_dir), "--plot", str(tmp_path / "x.png")]) == 0
    assert "t1" in capsys.readouterr().out
    assert main([str(tmp_path)]) == 2  # dir exists, no frontier.parquet
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path) in err
