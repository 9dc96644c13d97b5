"""Tune's results -> the points table -> the Pareto frontier files of a run."""

from __future__ import annotations

import posixpath
import re
from typing import Any

import pandas as pd

from ccpcsa import storage
from ccpcsa.loop import Prepared
from search.config import SearchConfig
from search.pareto import (
    collect_checkpoints,
    format_table,
    mark_frontier,
    plot_frontier,
    write_frontier,
)
from search.trial import CHECKPOINT_FILE

POINT_COLUMNS = ["trial_id", "round", "accuracy", "flops", "params", "checkpoint"]


def baseline_of(prepared: Prepared) -> dict[str, Any]:
    return {"accuracy": prepared.baseline_accuracy, "flops": prepared.baseline_flops,
            "params": prepared.baseline_params}


def stage0_point(prepared: Prepared) -> dict[str, Any]:
    """The unpruned model with BAM (M'), shared by every trial as its round 0."""
    from ccpcsa.checkpoint import read_payload

    metrics = read_payload(prepared.attention_checkpoint)["metrics"]
    return {"trial_id": "stage0", "round": 0, "accuracy": prepared.attention_accuracy,
            "flops": int(metrics["flops"]), "params": int(metrics["params"]),
            "checkpoint": prepared.attention_checkpoint, "status": "stage0"}


def trial_points(grid, storage_root: str) -> tuple[list[dict[str, Any]], int, list[str]]:
    """Every reported round of every trial (finished or errored), with its checkpoint file;
    the number of finished trials and a one-line description of each failed one."""
    points, finished, failed = [], 0, []
    for result in grid:
        status = "error" if result.error else "finished"
        finished += result.error is None
        if result.error is not None:
            failed.append(f"{_trial_name(result.path)}: {_last_line(result.error)}")
        paths = {}
        for checkpoint, metrics in result.best_checkpoints or []:
            paths[int(metrics["round"])] = _uri(storage_root, checkpoint.path)
        frame = result.metrics_dataframe
        if frame is None or frame.empty:
            continue
        rows = frame[frame["is_final"] == False]  # noqa: E712 (pandas mask)
        rows = rows.drop_duplicates("round", keep="last")  # a retried trial re-reports rounds
        params = {f"param_{k}": v for k, v in (result.config or {}).items()}
        for _, row in rows.iterrows():
            rnd = int(row["round"])
            points.append({
                "trial_id": str(row["trial_id"]), "round": rnd,
                "accuracy": float(row["accuracy"]), "flops": int(row["flops"]),
                "params": int(row["params"]),
                "checkpoint": storage.join(paths[rnd], CHECKPOINT_FILE) if rnd in paths else "",
                "status": status, **params})
    return points, finished, failed


def _trial_name(path: str) -> str:
    """run_trial_<id>_<number> from a trial folder run_trial_<id>_<number>_<params>_<date>."""
    name = posixpath.basename(str(path).rstrip("/"))
    found = re.match(r"(.+?_[0-9a-f]{5,}_\d+)(?:_|$)", name)
    return found.group(1) if found else name


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _uri(storage_root: str, path: str) -> str:
    if storage.is_uri(storage_root):
        return f"{storage_root.split('://', 1)[0]}://{path}"
    return path


def write_results(grid, cfg: SearchConfig, prepared: Prepared, run_dir: str) -> str:
    points, finished, failed = trial_points(grid, cfg.storage)
    frame = pd.DataFrame([stage0_point(prepared), *points])
    baseline = baseline_of(prepared)
    frame = mark_frontier(frame, baseline)
    frame = collect_checkpoints(frame, run_dir)
    write_frontier(frame, run_dir, baseline)
    plot = plot_frontier(frame, storage.join(run_dir, "frontier.png"), baseline,
                         title=f"{cfg.model} on {cfg.dataset}: CCPCSA schedules")
    table = format_table(frame, baseline)
    failures = "".join(f"\nfailed: {line}" for line in failed)
    return (f"{finished} trials finished, {len(failed)} failed; {len(frame)} points, "
            f"{int(frame['pareto'].sum())} on the frontier{failures}\n{table}\n"
            f"frontier: {storage.join(run_dir, 'frontier.parquet')}\nplot: {plot}")
