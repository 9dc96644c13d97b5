"""The final fine-tune (--final-epochs N --final-top K [--distill]): after the search, the
chosen frontier points are fine-tuned for N more epochs, optionally distilling from the
unpruned model (step 1's), and replace their search checkpoints on the frontier.

Each point is fine-tuned in a Ray task that holds one trial's resources and trains through
the same runner a trial uses (this process for one worker, Ray Train over
--workers-per-trial workers). Its result (checkpoint + a JSON record) is written to
<run>/final/ as soon as it is done; a search run again with --resume skips the points whose
record matches the settings, so a kill loses at most the fine-tunes in flight.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from ccpcsa import storage
from ccpcsa.loop import Prepared
from ccpcsa.search.config import SearchConfig
from ccpcsa.search.pareto import frontier_checkpoint_name

log = logging.getLogger("ccpcsa.search")
FINAL_DIR = "final"


@dataclass(frozen=True)
class FinalPoint:
    """One frontier point's final fine-tune: its settings and, once done, its result."""

    trial_id: str
    round: int
    source: str  # the search's checkpoint of the point
    epochs: int
    lr: float
    distill: bool
    accuracy_before: float
    accuracy: float | None = None  # after the final fine-tune
    checkpoint: str = ""  # the fine-tuned model
    seconds: float = 0.0

    def same_settings(self, other: FinalPoint) -> bool:
        return (self.source, self.epochs, self.lr, self.distill) == (
            other.source, other.epochs, other.lr, other.distill)


def choose_points(frame: pd.DataFrame, top: int) -> pd.DataFrame:
    """The frontier points (fine-tuned in the search, not the unpruned stage 0) that get the
    final fine-tune: all when top is 0 or more than there are, else `top` of them spread
    evenly along the frontier by FLOPs, the one with the fewest FLOPs always among them."""
    front = frame[frame["pareto"].astype(bool) & (frame["trial_id"] != "stage0")]
    if "deployable" in front.columns:
        front = front[front["deployable"].astype(bool)]
    front = front[front["checkpoint"].astype(str).str.len() > 0]
    front = front.sort_values(["flops", "accuracy"], ascending=[True, False])
    if top == 0 or top >= len(front):
        return front
    picks = sorted({int(round(i)) for i in np.linspace(0, len(front) - 1, top)})
    return front.iloc[picks]


def record_path(run_dir: str, trial_id: str, round_: int) -> str:
    name = frontier_checkpoint_name(trial_id, round_)
    return storage.join(run_dir, FINAL_DIR, name.replace(".pt", ".json"))


def load_done(run_dir: str) -> dict[tuple[str, int], FinalPoint]:
    """The final fine-tunes finished so far under <run>/final/."""
    done = {}
    for info in storage.list_dir(storage.join(run_dir, FINAL_DIR)):
        if not (info.is_file and info.base_name.endswith(".json")):
            continue
        try:
            point = FinalPoint(**storage.read_json(storage.join(run_dir, FINAL_DIR,
                                                                info.base_name)))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring the final fine-tune record %s: %s", info.base_name, exc)
            continue
        if point.accuracy is not None and storage.exists(point.checkpoint):
            done[(point.trial_id, point.round)] = point
    return done


def plan_points(frame: pd.DataFrame, cfg: SearchConfig) -> list[FinalPoint]:
    lr = cfg.final_lr if cfg.final_lr is not None else cfg.finetune_lr
    return [FinalPoint(str(r["trial_id"]), int(r["round"]), str(r["checkpoint"]),
                       cfg.final_epochs, float(lr), cfg.distill, float(r["accuracy"]))
            for r in choose_points(frame, cfg.final_top).to_dict("records")]


def run_final_finetunes(ray, cfg: SearchConfig, prepared: Prepared, run_dir: str,
                        frame: pd.DataFrame) -> dict[tuple[str, int], FinalPoint]:
    """Fine-tune the chosen frontier points of `frame` (marked, before any final fine-tune)
    that are not done yet, concurrently as Ray tasks; returns every finished one."""
    from ccpcsa.search.trial import trial_resources

    wanted = plan_points(frame, cfg)
    done = load_done(run_dir)
    todo = [p for p in wanted if not ((p.trial_id, p.round) in done
                                      and done[(p.trial_id, p.round)].same_settings(p))]
    print(f"final fine-tune: {len(wanted)} frontier point(s), {cfg.final_epochs} epoch(s) each"
          f"{', distilled from the unpruned model' if cfg.distill else ''}; "
          f"{len(wanted) - len(todo)} already done", flush=True)
    if todo:
        resources = trial_resources(cfg)
        task = ray.remote(num_cpus=resources["cpu"], num_gpus=resources["gpu"] if
                          cfg.workers_per_trial == 1 else 0)(finetune_point)
        teacher = prepared.baseline_checkpoint if cfg.distill else None
        refs = [task.remote(cfg, p, run_dir, teacher) for p in todo]
        for point in ray.get(refs):
            print(f"final fine-tune: {point.trial_id} round {point.round}: "
                  f"{point.accuracy_before:.2f}% -> {point.accuracy:.2f}% top-1 "
                  f"({point.seconds:.0f}s)", flush=True)
    wanted_keys = {(p.trial_id, p.round) for p in wanted}
    return {k: v for k, v in load_done(run_dir).items() if k in wanted_keys}


def finetune_point(cfg: SearchConfig, point: FinalPoint, run_dir: str,
                   teacher: str | None) -> FinalPoint:
    """One point's final fine-tune where the task runs; writes its checkpoint, then its record
    (a record always describes a complete checkpoint)."""
    import logging as _logging
    import time

    import torch

    from ccpcsa.checkpoint import CheckpointInfo, load_checkpoint, read_payload, save_checkpoint
    from ccpcsa.flops import count_flops, count_params
    from ccpcsa.search.trial import make_runner

    _logging.basicConfig(level=_logging.INFO)
    started = time.perf_counter()
    if not cfg.gpus_per_worker:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    payload = read_payload(point.source)
    model = load_checkpoint(point.source, user_model=cfg.model).train()
    name = frontier_checkpoint_name(point.trial_id, point.round)
    runner = make_runner(cfg, storage.join(run_dir, "train", "final", name[:-3]), "full",
                         teacher)
    try:
        model = runner.fit(model, point.epochs, point.lr, label=f"final {name[:-3]}")
        accuracy = runner.evaluate(model)
    finally:
        runner.close()
    shape = tuple(payload["input_shape"])
    metrics = {**payload["metrics"], "accuracy": accuracy,
               "accuracy_before_final": point.accuracy_before,
               "flops": count_flops(model, shape), "params": count_params(model)}
    extra = {**payload["extra"], "final_epochs": point.epochs, "final_distill": point.distill}
    checkpoint = storage.join(run_dir, FINAL_DIR, name)
    save_checkpoint(model, CheckpointInfo(payload["model"], payload["num_classes"],
                                          payload["with_bam"], shape, payload.get("dataset", ""),
                                          metrics, extra), checkpoint)
    done = FinalPoint(**{**asdict(point), "accuracy": accuracy, "checkpoint": checkpoint,
                         "seconds": time.perf_counter() - started})
    storage.write_json(record_path(run_dir, point.trial_id, point.round), asdict(done))
    return done


def apply_finals(frame: pd.DataFrame, finals: dict[tuple[str, int], FinalPoint],
                 reference: float | None = None, tolerance: float | None = None
                 ) -> pd.DataFrame:
    """The points with the final fine-tune's results: `accuracy` after it,
    `accuracy_before_final` (NaN where none ran), `checkpoint` the fine-tuned model (the
    search's in `search_checkpoint`), `final_epochs` and `final_distill`; with `reference`
    and `tolerance`, `within_tolerance` judged again on the new accuracy. The frontier is
    then marked again by the caller."""
    out = frame.drop(columns=[c for c in ("pareto", "duplicate_of", "flops_reduction",
                                          "frontier_checkpoint") if c in frame.columns]).copy()
    before, epochs, distill = [], [], []
    search_ckpt = out["checkpoint"].tolist()
    accuracy, checkpoint = out["accuracy"].tolist(), list(search_ckpt)
    for i, rec in enumerate(out[["trial_id", "round"]].to_dict("records")):
        point = finals.get((str(rec["trial_id"]), int(rec["round"])))
        if point is None:
            before.append(np.nan)
            epochs.append(0)
            distill.append(False)
            continue
        before.append(point.accuracy_before)
        accuracy[i], checkpoint[i] = point.accuracy, point.checkpoint
        if reference is not None and tolerance is not None and "within_tolerance" in out:
            out.iloc[i, out.columns.get_loc("within_tolerance")] = (
                reference - point.accuracy <= tolerance)
        epochs.append(point.epochs)
        distill.append(point.distill)
    out["accuracy_before_final"] = before
    out["accuracy"] = accuracy
    out["search_checkpoint"] = search_ckpt
    out["checkpoint"] = checkpoint
    out["final_epochs"] = epochs
    out["final_distill"] = distill
    return out


def final_summary(finals: dict[tuple[str, int], FinalPoint]) -> dict[str, Any]:
    return {f"{k[0]} round {k[1]}": asdict(v) for k, v in sorted(finals.items())}
