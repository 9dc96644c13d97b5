"""One Tune trial: the CCPCSA loop (Algorithm 1 steps 3-11) with one pruning schedule.

Every round is reported to Tune with its checkpoint; the last report is the trial's returned
model (the last round within tolerance), which is what Optuna's objectives see.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from ray import tune

from ccpcsa import runners, storage
from ccpcsa.checkpoint import CheckpointInfo, model_from_payload, read_payload, save_checkpoint
from ccpcsa.data import DataConfig
from ccpcsa.loop import LoopConfig, Prepared, RoundRecord, prune_loop, record_of
from ccpcsa.prune import PruneLimits
from ccpcsa.train import TrainConfig
from search.config import SearchConfig
from search.space import ModelLayout, decode

CHECKPOINT_FILE = "model.pt"


@dataclass
class TrialSettings:
    """What every trial shares; sent once through the object store (tune.with_parameters)."""

    cfg: SearchConfig
    layout: ModelLayout
    prepared: Prepared
    num_classes: int
    input_shape: tuple[int, int, int]
    run_dir: str


def data_config(cfg: SearchConfig) -> DataConfig:
    return DataConfig(cfg.dataset, cfg.data_root, cfg.image_size)


def train_config(cfg: SearchConfig) -> TrainConfig:
    return TrainConfig(batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                       loader_workers=cfg.loader_workers)


def make_runner(cfg: SearchConfig, storage_path: str):
    """One process when workers_per_trial == 1, else Ray Train over that many workers."""
    return runners.make_runner(data_config(cfg), train_config(cfg), cfg.workers_per_trial,
                             storage_path, gpus_per_worker=cfg.gpus_per_worker,
                             cpus_per_worker=cfg.cpus_per_worker)


def run_trial(params: dict[str, Any], settings: TrialSettings) -> None:
    cfg, prepared = settings.cfg, settings.prepared
    trial_id = tune.get_context().get_trial_id() or "trial"
    if not cfg.gpus_per_worker:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    schedule = decode(params, cfg, settings.layout)
    loop_cfg = LoopConfig(
        groups_per_round=schedule.groups_per_round, tolerance=cfg.tolerance,
        max_rounds=cfg.max_rounds, finetune_epochs=schedule.finetune_epochs,
        finetune_lr=schedule.finetune_lr, importance=cfg.importance,
        calibration_batches=cfg.calibration_batches, allocation=cfg.allocation,
        bn_batches=cfg.bn_batches, round_to=cfg.round_to,
        limits=PruneLimits(max(cfg.cap_range), schedule.stage_caps, schedule.layer_caps,
                           cfg.min_channels, schedule.residual_cap),
        reference=cfg.reference, seed=cfg.seed)
    reference = prepared.reference_accuracy(cfg.reference)
    runner = make_runner(cfg, storage.join(settings.run_dir, "train", trial_id))

    model, start_round, accuracy = _starting_point(prepared)

    def on_round(record: RoundRecord, pruned: torch.nn.Module) -> None:
        if record.round == 0:
            return  # the unpruned M' is one shared point; the driver adds it once
        info = CheckpointInfo(cfg.model, settings.num_classes, True, settings.input_shape,
                              cfg.dataset, _metrics(record, prepared),
                              {"round": record.round, "widths": record.widths,
                               "within_tolerance": record.within_tolerance})
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(pruned, info, os.path.join(tmp, CHECKPOINT_FILE))
            tune.report({**_metrics(record, prepared), "is_final": False},
                        checkpoint=tune.Checkpoint.from_directory(tmp))

    try:  # one Ray Train worker group for the whole loop (workers_per_trial > 1)
        result = prune_loop(model, cfg.model, settings.input_shape, reference, runner,
                            loop_cfg, on_round, initial_accuracy=accuracy,
                            start_round=start_round, original_widths=settings.layout.widths)
    finally:
        runner.close()
    final = record_of(result, result.final_round)
    tune.report({**_metrics(final, prepared), "is_final": True,
                 "final_round": result.final_round, "stop_reason": result.stop_reason})


def _starting_point(prepared: Prepared) -> tuple[torch.nn.Module, int, float]:
    """M' for a new trial; the last reported round when Tune retries a failed trial (or M'
    again if that round had already broken the tolerance: its predecessor was not kept)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            payload = read_payload(os.path.join(folder, CHECKPOINT_FILE))
        if payload["extra"].get("within_tolerance", False):
            model = model_from_payload(payload).train()
            return model, int(payload["extra"]["round"]), float(payload["metrics"]["accuracy"])
    return prepared.load_attention_model(), 0, prepared.attention_accuracy


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

