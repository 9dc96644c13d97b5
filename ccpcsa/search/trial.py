"""One Tune trial: the CCPCSA loop (Algorithm 1 steps 3-11) with one pruning schedule.

Every round is reported to Tune with its checkpoint and the compute the trial has used so far;
the last report is the trial's returned model (the last round within tolerance), which is what
Optuna's objectives see. A screening trial (phase "screen" of a two-phase search) runs the
rounds with adaptive-BN evaluation only, no fine-tune, and returns its last round.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from ray import tune

from ccpcsa import runners, storage
from ccpcsa.checkpoint import CheckpointInfo, model_from_payload, read_payload, save_checkpoint
from ccpcsa.data import DataConfig
from ccpcsa.loop import Prepared, RoundRecord, prune_loop, record_of
from ccpcsa.prune import PruneLimits
from ccpcsa.search.compute import ComputeMeter
from ccpcsa.search.config import SearchConfig
from ccpcsa.search.space import ModelLayout, cap_bounds, decode, trial_rounds
from ccpcsa.train import TrainConfig

CHECKPOINT_FILE = "model.pt"
# full: the one-phase search; screen / finetune: the two phases of --screen N --finalists K
PHASES = ("full", "screen", "finetune")


@dataclass
class TrialSettings:
    """What every trial shares; sent once through the object store (tune.with_parameters)."""

    cfg: SearchConfig
    layout: ModelLayout
    prepared: Prepared
    num_classes: int
    input_shape: tuple[int, int, int]
    run_dir: str
    phase: str = "full"
    # failed or interrupted trials run again as new trials (ccpcsa/search/retry.py,
    # ccpcsa/search/resume.py): params_key -> the checkpoint to start from ("" = from M')
    start_from: dict[str, str] = field(default_factory=dict)
    # params_key -> the id of the interrupted trial a new trial continues
    continues: dict[str, str] = field(default_factory=dict)


def data_config(cfg: SearchConfig, phase: str = "full") -> DataConfig:
    return cfg.data_config(test_subset=cfg.screen_eval_images if phase == "screen" else 0)


def train_config(cfg: SearchConfig, teacher: str | None = None) -> TrainConfig:
    """Training settings; with `teacher` (a checkpoint) fine-tunes distil from it."""
    return cfg.train_config(teacher)


def make_runner(cfg: SearchConfig, storage_path: str, phase: str = "full",
                teacher: str | None = None, stable_fits: bool = False):
    """One process when workers_per_trial == 1, else Ray Train over that many workers."""
    return runners.make_runner(data_config(cfg, phase), train_config(cfg, teacher),
                               cfg.workers_per_trial, storage_path,
                               gpus_per_worker=cfg.gpus_per_worker,
                               cpus_per_worker=cfg.cpus_per_worker,
                               max_failures=cfg.max_failures, placement=cfg.placement,
                               stable_fits=stable_fits)


def run_trial(params: dict[str, Any], settings: TrialSettings) -> None:
    cfg, prepared = settings.cfg, settings.prepared
    meter = ComputeMeter(cfg.workers_per_trial, cfg.gpus_per_worker or 0.0,
                         cfg.cpus_per_worker).start()  # the trial's whole cost, data included
    trial_id = tune.get_context().get_trial_id() or "trial"
    if not cfg.gpus_per_worker:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    schedule = decode(params, cfg, settings.layout)
    screen = settings.phase == "screen"
    target = (int(cfg.target_flops * prepared.baseline_flops) if cfg.target_flops is not None
              else None)
    loop_cfg = cfg.loop_config(
        schedule.groups_per_round, trial_rounds(cfg, settings.layout, schedule.groups_per_round),
        PruneLimits(cap_bounds(cfg, settings.layout)[1], schedule.stage_caps,
                    schedule.layer_caps, cfg.min_channels, schedule.residual_cap),
        importance=schedule.importance, finetune_epochs=schedule.finetune_epochs,
        finetune_lr=schedule.finetune_lr, screen=screen, target_flops=target)
    reference = prepared.reference_accuracy(cfg.reference)
    teacher = prepared.baseline_checkpoint if cfg.distill_rounds and not screen else None
    runner = make_runner(cfg, storage.join(settings.run_dir, "train", trial_id), settings.phase,
                         teacher)

    # with a target, rounds past the tolerance are part of the walk: a retry goes on from them
    from ccpcsa.search.retry import params_key

    model, start_round, accuracy, meter.offset = _starting_point(
        prepared, screen or target is not None, cfg.model,
        settings.start_from.get(params_key(params), ""))

    def metrics(record: RoundRecord) -> dict[str, Any]:
        return {**_metrics(record, prepared), "phase": settings.phase,
                "importance": schedule.importance,
                "compute_s": meter.seconds(), "compute_unit": meter.unit}

    def on_round(record: RoundRecord, pruned: torch.nn.Module) -> None:
        if record.round == 0:
            return  # the unpruned M' is one shared point; the driver adds it once
        reported = metrics(record)
        numbers = {k: v for k, v in reported.items() if not isinstance(v, str)}
        info = CheckpointInfo(cfg.model, settings.num_classes, True, settings.input_shape,
                              cfg.dataset, numbers,
                              {"round": record.round, "widths": record.widths,
                               "importance": schedule.importance,
                               "within_tolerance": record.within_tolerance,
                               "phase": settings.phase, "compute_unit": meter.unit})
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(pruned, info, os.path.join(tmp, CHECKPOINT_FILE))
            tune.report({**reported, "is_final": False},
                        checkpoint=tune.Checkpoint.from_directory(tmp))

    try:  # one Ray Train worker group for the whole loop (workers_per_trial > 1)
        result = prune_loop(model, cfg.model, settings.input_shape, reference, runner,
                            loop_cfg, on_round, initial_accuracy=accuracy,
                            start_round=start_round, original_widths=settings.layout.widths)
    finally:
        runner.close()
    final = record_of(result, result.final_round)
    tune.report({**metrics(final), "is_final": True,
                 "final_round": result.final_round, "stop_reason": result.stop_reason})


def _starting_point(prepared: Prepared, any_round: bool, model_name: str, retry_from: str = ""
                    ) -> tuple[torch.nn.Module, int, float, float]:
    """(model, round, accuracy, compute seconds spent): M' for a new trial; the last reported
    round when Tune retries a failed trial, or `retry_from` (the checkpoint of a failed trial
    this one runs again) (or M' again if that round had already broken the tolerance: its
    predecessor was not kept; a screening trial, or one walking to a FLOPs target
    (any_round), goes on from any round)."""
    checkpoint = tune.get_checkpoint()
    payload = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            payload = read_payload(os.path.join(folder, CHECKPOINT_FILE))
    elif retry_from:
        payload = read_payload(retry_from)
    if payload is not None:
        if any_round or payload["extra"].get("within_tolerance", False):
            model = model_from_payload(payload, user_model=model_name).train()
            metrics = payload["metrics"]
            return (model, int(payload["extra"]["round"]), float(metrics["accuracy"]),
                    float(metrics.get("compute_s", 0.0)))
    return prepared.load_attention_model(model_name), 0, prepared.attention_accuracy, 0.0


def _metrics(record: RoundRecord, prepared: Prepared) -> dict[str, Any]:
    return {
        "round": record.round,
        "accuracy": record.accuracy,
        "accuracy_pruned": record.accuracy_pruned,
        "flops": record.flops,
        "params": record.params,
        "removed": record.removed,
        "within_tolerance": record.within_tolerance,
        "flops_reduction": 100.0 * (1 - record.flops / prepared.baseline_flops),
        "params_reduction": 100.0 * (1 - record.params / prepared.baseline_params),
    }


def trial_resources(cfg: SearchConfig, driver_nodes: bool = False) -> dict[str, float]:
    """The trial process's own reservation. With Ray Train workers it only drives them: no
    CPU (a fraction would strand the rest of a CPU that decode tasks need), one byte of
    memory (Tune needs a non-empty request) and, where the cluster files set it, one unit of
    the driver resource that keeps drivers on the head/CPU nodes."""
    from ccpcsa.distributed.capacity import DRIVER_RESOURCE

    if cfg.workers_per_trial == 1:
        return {"cpu": cfg.cpus_per_worker, "gpu": cfg.gpus_per_worker or 0.0}
    driver = {"cpu": 0, "memory": 1}
    if driver_nodes:
        driver[DRIVER_RESOURCE] = 1
    return driver


def driver_nodes() -> bool:
    """Whether the cluster's nodes (or node types) offer the trial-driver resource."""
    from ccpcsa.distributed import capacity, connect_ray, started_locally

    ray = connect_ray()
    return capacity.has_driver_resource(ray, capacity.cluster_shape(ray, started_locally()))
