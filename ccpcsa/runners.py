"""Where the loop trains: the factory that picks one process (train.LocalRunner) or Ray Train
workers (distributed.RayRunner) behind the Runner interface (runner.py). Sits above both."""

from __future__ import annotations

from dataclasses import replace

from ccpcsa.data import DataConfig, build_datasets
from ccpcsa.runner import Runner
from ccpcsa.train import LocalRunner, TrainConfig


def make_runner(data: DataConfig, cfg: TrainConfig, workers: int, storage_path: str, *,
                gpus_per_worker: float | None = None, cpus_per_worker: float = 1.0,
                sync_bn: bool = False, max_failures: int = 2, placement: str = "STRICT_PACK",
                stable_fits: bool = False) -> Runner:
    """The loop's training backend: this process for one worker (no Ray), else one group of
    `workers` Ray Train workers (runs under `storage_path`) that trains, evaluates, scores
    channels and re-estimates BatchNorm. Channels are scored and BatchNorm is re-estimated on
    unaugmented training data. max_failures: restarts of the worker group after a worker
    or node is lost; placement and stable_fits: see RayRunner."""
    if workers == 1:
        train_set, test_set = build_datasets(data)
        calibration_set = build_datasets(replace(data, augment=False))[0]
        return LocalRunner(train_set, test_set, cfg, calibration_set)
    from ccpcsa.distributed import RayRunner

    return RayRunner(data, cfg, workers, storage_path, gpus_per_worker=gpus_per_worker,
                     cpus_per_worker=cpus_per_worker, sync_bn=sync_bn,
                     max_failures=max_failures, placement=placement, stable_fits=stable_fits)
