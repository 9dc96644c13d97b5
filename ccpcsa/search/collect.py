"""The trials on disk -> the points table -> the Pareto frontier files and the summary."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from ccpcsa import storage
from ccpcsa.loop import Prepared
from ccpcsa.search.config import SearchConfig
from ccpcsa.search.finalists import SCREENED_TRIAL
from ccpcsa.search.ondisk import TrialOnDisk, counts
from ccpcsa.search.pareto import (
    collect_checkpoints,
    format_table,
    mark_frontier,
    plot_frontier,
    write_frontier,
)

log = logging.getLogger("ccpcsa.search")
POINT_COLUMNS = ["trial_id", "round", "accuracy", "flops", "params", "checkpoint"]
PHASE_NAMES = {"full": "trials", "screen": "screen", "finetune": "finetune"}


def baseline_of(prepared: Prepared) -> dict[str, Any]:
    return {"accuracy": prepared.baseline_accuracy, "flops": prepared.baseline_flops,
            "params": prepared.baseline_params}


def stage0_point(prepared: Prepared) -> dict[str, Any]:
    """The unpruned model with BAM (M'), shared by every trial as its round 0."""
    from ccpcsa.checkpoint import read_payload

    metrics = read_payload(prepared.attention_checkpoint)["metrics"]
    # its compute is stage 0's, shared by every trial and counted in none
    return {"trial_id": "stage0", "round": 0, "accuracy": prepared.attention_accuracy,
            "flops": int(metrics["flops"]), "params": int(metrics["params"]),
            "accuracy_pruned": prepared.attention_accuracy, "compute_s": None,
            "compute_unit": None, "checkpoint": prepared.attention_checkpoint,
            "status": "stage0", "phase": "stage0", "deployable": True, "screened_trial": "",
            "within_tolerance": True, "importance": ""}


def trial_points(trials: list[TrialOnDisk]) -> list[dict[str, Any]]:
    """Every reported round of every trial (finished, stopped early, failed or interrupted),
    with its checkpoint file, phase, the compute its trial had used by then, and the trial's
    parameters. Screened rounds (no fine-tune) are not deployable."""
    points = []
    for trial in trials:
        params = dict(trial.params)
        screened_trial = str(params.pop(SCREENED_TRIAL, "") or "")
        columns = {f"param_{k}": v for k, v in params.items()}
        for rnd, point in sorted(trial.rounds.items()):
            points.append({"trial_id": trial.trial_id, "round": rnd, **point,
                           "status": trial.status, "phase": trial.phase,
                           "deployable": trial.phase != "screen",
                           "screened_trial": screened_trial, **columns})
    return points


def trial_lines(trials: list[TrialOnDisk]) -> list[str]:
    """One line per trial: its status, and its rounds or its error."""
    lines = []
    for trial in trials:
        if trial.status == "not started":
            continue
        rounds = f"{len(trial.rounds)} round{'s' * (len(trial.rounds) != 1)} reported"
        if trial.status == "failed":
            detail = f"{trial.error} ({rounds})"
        elif trial.status == "retried":
            start = "its last round" if trial.rounds else "the start"
            detail = f"{trial.error} ({rounds}; run again as a new trial from {start})"
        elif trial.status == "continued":
            detail = f"{rounds}; continued as a new trial from its last round"
        elif trial.status == "interrupted":
            detail = f"{rounds}; --resume continues it"
        else:
            detail = rounds
        where = "" if trial.phase == "full" else f"{trial.phase} "
        lines.append(f"{trial.status}: {where}{trial.name}: {detail}")
    return lines


def summary_counts(trials: list[TrialOnDisk], owed: dict[str, int]) -> str:
    """Trials per status, per phase for a two-phase search (`owed`: phase -> trials owed)."""
    parts = []
    for phase, num_samples in owed.items():
        found = counts([t for t in trials if t.phase == phase], num_samples)
        text = (f"{found['finished']} trials finished, {found['failed']} failed, "
                f"{found['interrupted']} interrupted, {found['not started']} not started "
                f"(of {num_samples})")
        if found["stopped early"]:
            text += f", {found['stopped early']} stopped early"
        if found["retried"]:
            text += f", {found['retried']} failed earlier and retried"
        if found["continued"]:
            text += f", {found['continued']} interrupted earlier and continued"
        parts.append(text if phase == "full" else f"{phase}: {text}")
    return "; ".join(parts)


def write_results(trials: list[TrialOnDisk], cfg: SearchConfig, prepared: Prepared,
                  run_dir: str, owed: dict[str, int] | None = None,
                  input_shape: tuple[int, int, int] | None = None,
                  finals: dict | None = None) -> str:
    """frontier.parquet, frontier.png and frontier/*.pt from every point on disk; returns the
    summary to print. `owed`: trials each phase owes (default: the one-phase search's). With
    input_shape (the search ran to its end) and cfg.latency_batch, the frontier's latency is
    measured too (add_latency); an interrupted search is not kept waiting for it. `finals`:
    the final fine-tunes done (ccpcsa/search/final.py), whose results replace their points'."""
    owed = owed or {"full": cfg.num_samples}
    frame = pd.DataFrame([stage0_point(prepared), *trial_points(trials)])
    baseline = baseline_of(prepared)
    frame = mark_frontier(frame, baseline)
    if finals:
        from ccpcsa.search.final import apply_finals

        reference = prepared.reference_accuracy(cfg.reference)
        frame = mark_frontier(apply_finals(frame, finals, reference, cfg.tolerance), baseline)
    frame = collect_checkpoints(frame, run_dir)
    write_frontier(frame, run_dir, baseline)  # first without latency: nothing is lost
    if cfg.latency_batch and input_shape is not None:
        frame, baseline = add_latency(frame, baseline, cfg, prepared, input_shape)
        write_frontier(frame, run_dir, baseline)
    plot = plot_frontier(frame, storage.join(run_dir, "frontier.png"), baseline,
                         title=plot_title(cfg, frame))
    table = format_table(frame, baseline)
    per_trial = "".join(f"\n{line}" for line in trial_lines(trials))
    screened = int((frame["phase"] == "screen").sum())
    points = (f"{len(frame)} points ({screened} screened, not deployable)" if screened
              else f"{len(frame)} points")
    return (f"{summary_counts(trials, owed)}; {points}, "
            f"{int(frame['pareto'].sum())} on the frontier{per_trial}\n{table}\n"
            f"frontier: {storage.join(run_dir, 'frontier.parquet')}\nplot: {plot}")


def plot_title(cfg: SearchConfig, frame: pd.DataFrame) -> str:
    """Model, data, the criterion the frontier's points were pruned with (and those searched),
    and the FLOPs target."""
    front = frame[frame["pareto"].astype(bool)] if "pareto" in frame.columns else frame
    used = sorted({c for c in front.get("importance", pd.Series(dtype=str)).dropna() if c})
    if len(cfg.importances) > 1:
        criterion = (f"criteria searched {', '.join(cfg.importances)}; on the frontier "
                     f"{', '.join(used) or '-'}")
    else:
        criterion = f"criterion {cfg.importances[0]}"
    target = ("" if cfg.target_flops is None
              else f", target {100 * cfg.target_flops:.0f}% of the baseline's FLOPs")
    return f"{cfg.model} on {cfg.dataset}: {criterion}{target}"


def add_latency(frame: pd.DataFrame, baseline: dict[str, Any], cfg: SearchConfig,
                prepared: Prepared, input_shape: tuple[int, int, int]
                ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """latency_* columns for every frontier point (NaN elsewhere) and the baseline, measured
    one after another in one Ray task holding one training worker's CPUs and GPUs: after the
    trials, so no trial competes for the device, and on the kind of device the trials ran on.
    A failed measurement is logged and leaves the columns empty."""
    import ray

    paths = [p for p in frame.loc[frame["pareto"].astype(bool), "frontier_checkpoint"] if p]
    baseline_path = prepared.baseline_checkpoint
    gpus = cfg.gpus_per_worker or 0.0
    task = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=gpus)(measure_checkpoints)
    try:
        measured = ray.get(task.remote([baseline_path, *paths] if baseline_path else paths,
                                       input_shape, cfg.latency_batch, cfg.cpus_per_worker,
                                       cfg.model))
    except Exception as exc:  # a measurement must not cost the search its results
        log.warning("latency not measured: %s", str(exc).strip().splitlines()[-1])
        return frame, baseline
    if baseline_path:
        baseline = {**baseline, **measured.pop(baseline_path)}
    frame = frame.copy()
    for column in ("latency_ms", "latency_batch_ms", "latency_batch", "latency_repeats",
                   "latency_device"):
        frame[column] = [measured.get(p, {}).get(column) for p in frame["frontier_checkpoint"]]
    log.info("latency measured on %s for %d frontier points",
             next(iter(measured.values()), {}).get("latency_device", "?"), len(measured))
    return frame, baseline


def measure_checkpoints(paths: list[str], input_shape: tuple[int, int, int], batch: int,
                        cpus: float, model_name: str) -> dict[str, dict[str, Any]]:
    """Each checkpoint's latency_* columns, on this worker's GPU if it has one, else its CPUs
    (as many torch threads as CPUs reserved)."""
    import torch

    from ccpcsa.checkpoint import load_checkpoint
    from ccpcsa.latency import measure_latency

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cpus)))
    return {path: measure_latency(load_checkpoint(path, user_model=model_name), input_shape,
                                  device, batch).columns()
            for path in paths}
