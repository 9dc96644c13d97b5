"""SearchConfig: every setting of one search, from flags and/or a YAML file, checked up front."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from ccpcsa import validation
from ccpcsa.data import DATASETS, NEEDS_ROOT
from ccpcsa.data.common import MIN_IMAGE_SIZE
from ccpcsa.data.jpegdecode import DECODES
from ccpcsa.distributed.capacity import PLACEMENTS
from ccpcsa.distributed.hostcopy import HOST_COPIES
from ccpcsa.importance import DEFAULT_IMPORTANCE, IMPORTANCES
from ccpcsa.loop import REFERENCES
from ccpcsa.models import ModelError, check_model_name
from ccpcsa.prune import ALLOCATIONS

SAMPLERS = ("tpe", "nsga2", "gp", "random")
MODEL_SAMPLERS = ("tpe", "gp")  # those that start with random trials (startup_trials)
EARLY_STOPS = ("off", "asha", "median")
DEFAULT_FINALISTS = 8


class ConfigError(validation.SettingError):
    pass


@dataclass
class SearchConfig:
    # what to prune, on what data
    model: str = "resnet20"  # registry name, torchvision:NAME or module:callable
    weights: str | None = None  # trained weights replacing step 1's training
    dataset: str = "digits"
    data_root: str | None = None
    image_size: int | None = None
    train_subset: int = 0  # > 0: train on a fixed random N images of the training split
    # parquet only (ccpcsa.distributed.ingest): where JPEGs are decoded (cpu: Ray Data tasks;
    # gpu: each worker's GPU, nvJPEG), how batches reach the GPU, Ray Data's prefetch
    decode: str = "cpu"
    host_copy: str = "ring"
    prefetch_batches: int = 2
    # the search
    num_samples: int = 8
    max_concurrent_trials: int = 2
    # the best of tpe, nsga2 and gp in benchmarks/search_hypervolume.py (two-phase search,
    # Fashion-MNIST: gp 2.001, tpe 1.890, nsga2 1.793 hypervolume; random 2.052 — no sampler
    # beat random search there, docs/findings.md says so)
    sampler: str = "gp"
    # tpe / gp: trials sampled at random before the model takes over; None = Optuna's 10,
    # which leaves a 12-trial search almost random
    startup_trials: int | None = None
    # two-phase search: > 0 screens this many schedules with adaptive-BN evaluation only (no
    # fine-tune), then fine-tunes the `finalists` closest to the screened frontier
    # (ccpcsa/search/finalists.py); 0 = every trial fine-tunes every round (num_samples trials)
    screen: int = 0
    finalists: int | None = None  # None: DEFAULT_FINALISTS, at most `screen`
    # > 0: screened rounds are evaluated on a fixed random N images of the test split instead
    # of all of it (evaluation was most of a screened round's cost); fine-tuned trials and
    # the finalists always use the whole split
    screen_eval_images: int = 0
    # stop fine-tuning trials that fall behind the frontier (ccpcsa/search/early_stop.py)
    early_stop: str = "off"
    seed: int = 0
    per_layer: bool = False
    # per-stage mode: residual-stream groups get their own searched ratio (they cost the most
    # accuracy when pruned: docs/design.md), instead of their stage's
    residual_cap: bool = True
    m_range: list[int] | None = None  # None: scaled with the model's channel count
    cap_range: list[float] = field(default_factory=lambda: [0.0, 0.9])
    search_finetune: bool = False  # also search the fine-tune lr and epochs
    lr_range: list[float] = field(default_factory=lambda: [0.001, 0.05])
    epochs_range: list[int] = field(default_factory=lambda: [1, 3])
    # resources
    workers_per_trial: int = 1
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_worker: float = 1.0
    loader_workers: int | None = None  # None: one per spare CPU (ccpcsa.train.loader_workers_for)
    max_failures: int = 1
    # STRICT_PACK: a trial's Ray Train workers on one node (ccpcsa.distributed.capacity)
    placement: str = "STRICT_PACK"
    wait_for_resources: float = 600.0  # seconds the pre-flight waits for the autoscaler
    # where results go
    storage: str = "runs/search"
    name: str = "ccpcsa-search"
    resume: bool = False
    retry_failed: bool = False  # with resume: failed trials run again from their checkpoint
    # stage 0 (Algorithm 1 steps 1-2), once per search
    baseline_epochs: int | None = None  # None: 10, or 0 with weights (evaluated only)
    attention_epochs: int = 5
    lr: float = 0.05
    batch_size: int = 64
    # each trial's loop (steps 3-11)
    # fraction of the baseline's FLOPs to reach (0.33 = -67 %): every trial prunes on past
    # the tolerance down to it (ccpcsa/search/space.py); None = each trial stops at the tolerance
    target_flops: float | None = None
    tolerance: float = 0.5
    max_rounds: int = 6
    epochs: int = 1
    finetune_lr: float = 0.01
    # a criterion, or a comma list (l1,ccpcsa,taylor) that the search treats as a parameter
    importance: str = DEFAULT_IMPORTANCE
    allocation: str = "uniform"
    calibration_batches: int = 4
    bn_batches: int = 16
    min_channels: int = 4
    round_to: int | None = None  # None: 8 when the workers train on CUDA, else 1
    reference: str = "baseline"
    # inference latency of each frontier point, batch 1 and this batch (0: not measured)
    latency_batch: int = 8
    # the final fine-tune of frontier points after the search (ccpcsa/search/final.py): epochs (0 =
    # none), how many frontier points (0 = all), its lr (None: finetune_lr)
    final_epochs: int = 0
    final_top: int = 3
    final_lr: float | None = None
    # knowledge distillation from the unpruned model (step 1's): in the final fine-tune, and
    # with distill_rounds in every round's fine-tune too
    distill: bool = False
    distill_rounds: bool = False
    distill_weight: float = 0.5
    distill_temperature: float = 4.0

    def __post_init__(self) -> None:
        if isinstance(self.importance, list | tuple):  # YAML: importance: [l1, ccpcsa]
            self.importance = ",".join(map(str, self.importance))
        if self.baseline_epochs is None:
            self.baseline_epochs = 0 if self.weights else 10

    def validate(self) -> None:
        """Every setting, whatever it came from (flags, YAML, a saved run): types, finite
        numbers, ranges, names, the storage URI scheme, the batch split over workers. Nothing
        is touched (the search checks its storage, data and weights before Ray starts); a
        user's model module is imported."""
        check = validation
        check.text("model", self.model)
        try:
            check_model_name(self.model)
        except ModelError as exc:
            raise ConfigError(str(exc)) from None
        if self.weights is not None:
            check.location("weights", self.weights)
        check.choice("dataset", self.dataset, DATASETS)
        if self.data_root is not None:
            check.location("data_root", self.data_root)
        if self.dataset in NEEDS_ROOT and self.data_root is None:
            raise ConfigError(f"dataset {self.dataset!r} needs data_root (--data-root)")
        if self.image_size is not None:
            check.whole("image_size", self.image_size, MIN_IMAGE_SIZE)
        check.choice("decode", self.decode, DECODES)
        check.choice("host_copy", self.host_copy, HOST_COPIES)
        check.whole("prefetch_batches", self.prefetch_batches, 0)
        check.choice("sampler", self.sampler, SAMPLERS)
        check.choice("early_stop", self.early_stop, EARLY_STOPS)
        check.text("importance", self.importance)
        for name in self.importances:
            check.choice("importance", name, IMPORTANCES)
        if len(set(self.importances)) != len(self.importances):
            raise ConfigError(f"importance {self.importance!r} names a criterion twice")
        check.choice("allocation", self.allocation, ALLOCATIONS)
        check.choice("reference", self.reference, REFERENCES)
        check.choice("placement", self.placement, PLACEMENTS)
        check.number("wait_for_resources", self.wait_for_resources, low=0)
        for name in ("num_samples", "max_concurrent_trials", "workers_per_trial", "max_rounds",
                     "calibration_batches", "min_channels"):
            check.whole(name, getattr(self, name), 1)
        for name in ("seed", "baseline_epochs", "attention_epochs", "epochs", "max_failures",
                     "bn_batches", "train_subset", "screen", "latency_batch",
                     "screen_eval_images"):
            check.whole(name, getattr(self, name), 0)
        if self.startup_trials is not None:
            check.whole("startup_trials", self.startup_trials, 1)
            if self.sampler not in MODEL_SAMPLERS:
                raise ConfigError(f"startup_trials {self.startup_trials} applies to sampler "
                                  f"{' or '.join(MODEL_SAMPLERS)}, not {self.sampler!r}")
        if self.finalists is not None:
            check.whole("finalists", self.finalists, 1)
            if not self.screen:
                raise ConfigError(f"finalists {self.finalists} needs screen N: finalists are "
                                  "the screened schedules that phase 2 fine-tunes")
            if self.finalists > self.screen:
                raise ConfigError(f"finalists {self.finalists} must be <= screen "
                                  f"{self.screen}: the finalists are picked from the screened "
                                  "schedules")
        if self.screen_eval_images and not self.screen:
            raise ConfigError(f"screen_eval_images {self.screen_eval_images} needs screen N: "
                              "only screened rounds are evaluated on a subset")
        if self.screen_eval_images and self.dataset == "parquet":
            raise ConfigError("screen_eval_images is not supported for dataset 'parquet' (Ray "
                              "Data streams the shards)")
        if self.screen and self.bn_batches == 0:
            raise ConfigError("screen needs bn_batches >= 1: screened schedules are ranked by "
                              "their accuracy after BatchNorm re-estimation")
        if self.train_subset and self.dataset == "parquet":
            raise ConfigError("train_subset is not supported for dataset 'parquet' (Ray Data "
                              "streams the shards)")
        check.whole("batch_size", self.batch_size, 2)
        check.per_worker_batch(self.batch_size, self.workers_per_trial)
        check.number("tolerance", self.tolerance, low=0)
        if self.target_flops is not None:
            check.number("target_flops", self.target_flops, above=0, below=1)
        for name in ("lr", "finetune_lr", "cpus_per_worker"):
            check.number(name, getattr(self, name), above=0)
        check.gpus("gpus_per_worker", self.gpus_per_worker)
        for name in ("per_layer", "residual_cap", "search_finetune", "resume", "retry_failed"):
            check.flag(name, getattr(self, name))
        if self.retry_failed and not self.resume:
            raise ConfigError("retry_failed needs resume: it runs the failed trials of an "
                              "earlier search again (--resume --retry-failed)")
        if self.loader_workers is not None:
            check.whole("loader_workers", self.loader_workers, 0)
        if self.round_to is not None:
            check.whole("round_to", self.round_to, 1)
        if self.m_range is not None:
            low, _ = check.pair("m_range", self.m_range, int)
            check.whole("m_range low", int(low), 1)
        low, high = check.pair("cap_range", self.cap_range)
        check.number("cap_range low", low, low=0)
        check.number("cap_range high", high, below=1)
        check.number("lr_range low", check.pair("lr_range", self.lr_range)[0], above=0)
        check.whole("epochs_range low", int(check.pair("epochs_range", self.epochs_range, int)[0]),
                    0)
        check.whole("final_epochs", self.final_epochs, 0)
        check.whole("final_top", self.final_top, 0)
        if self.final_lr is not None:
            check.number("final_lr", self.final_lr, above=0)
        check.flag("distill", self.distill)
        check.flag("distill_rounds", self.distill_rounds)
        check.number("distill_weight", self.distill_weight, low=0, high=1)
        check.number("distill_temperature", self.distill_temperature, above=0)
        if self.distill and not self.final_epochs:
            raise ConfigError("distill needs final_epochs >= 1: it distils in the final "
                              "fine-tune (--final-epochs N; --distill-rounds for every round)")
        check.location("storage", self.storage)
        check.run_name("name", self.name)

    @property
    def importances(self) -> tuple[str, ...]:
        """The criteria: one, or a comma list that the search samples from (space.py)."""
        return tuple(part.strip() for part in str(self.importance).split(","))

    @property
    def finalist_count(self) -> int:
        """K: the schedules phase 2 fine-tunes (0 without --screen)."""
        if self.finalists is not None:
            return self.finalists
        return min(DEFAULT_FINALISTS, self.screen)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(SearchConfig)]


def load_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path!r} is not valid YAML: {exc}".splitlines()[0]
                          ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of settings")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(field_names()))
    if unknown:
        raise ConfigError(f"unknown key(s) in {path!r}: {', '.join(unknown)}; "
                          f"valid keys: {', '.join(field_names())}")
    return data


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> SearchConfig:
    """Defaults < YAML file < flags given on the command line (None = not given); validated."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    return config_from_dict(merged)


def config_from_dict(values: dict[str, Any], source: str = "") -> SearchConfig:
    """A validated SearchConfig from plain values: the one way in for flags, a YAML file and
    the configuration saved with a run (--resume). ConfigError names the bad setting."""
    where = f" in {source}" if source else ""
    if not isinstance(values, dict):
        raise ConfigError(f"the configuration{where} must be a mapping of settings")
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise ConfigError(f"unknown setting(s){where}: {', '.join(map(str, unknown))}; valid "
                          f"settings: {', '.join(field_names())}")
    cfg = SearchConfig(**values)
    try:
        cfg.validate()
    except validation.SettingError as exc:
        raise ConfigError(f"{exc}{where}") from None
    return cfg
