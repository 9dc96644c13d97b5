"""SearchConfig: every setting of one search, from flags and/or a YAML file, checked up front."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from ccpcsa.data import DATASETS
from ccpcsa.importance import IMPORTANCES
from ccpcsa.loop import REFERENCES
from ccpcsa.models import MODELS
from ccpcsa.prune import ALLOCATIONS

SAMPLERS = ("nsga2", "tpe", "random")


class ConfigError(ValueError):
    pass


@dataclass
class SearchConfig:
    # what to prune, on what data
    model: str = "resnet20"
    dataset: str = "digits"
    data_root: str | None = None
    image_size: int | None = None
    # the search
    num_samples: int = 8
    max_concurrent_trials: int = 2
    sampler: str = "nsga2"
    seed: int = 0
    per_layer: bool = False
    # per-stage mode: residual-stream groups get their own searched ratio (they cost the most
    # accuracy when pruned: shared/paper-notes.md), instead of their stage's
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
    # where results go
    storage: str = "runs/search"
    name: str = "ccpcsa-search"
    resume: bool = False
    # stage 0 (Algorithm 1 steps 1-2), once per search
    baseline_epochs: int = 10
    attention_epochs: int = 5
    lr: float = 0.05
    batch_size: int = 64
    # each trial's loop (steps 3-11)
    tolerance: float = 0.5
    max_rounds: int = 6
    epochs: int = 1
    finetune_lr: float = 0.01
    importance: str = "ccpcsa"
    allocation: str = "uniform"
    calibration_batches: int = 4
    bn_batches: int = 16
    min_channels: int = 4
    reference: str = "baseline"

    def validate(self) -> None:
        _choice("model", self.model, tuple(MODELS))
        _choice("dataset", self.dataset, DATASETS)
        _choice("sampler", self.sampler, SAMPLERS)
        _choice("importance", self.importance, IMPORTANCES)
        _choice("allocation", self.allocation, ALLOCATIONS)
        _choice("reference", self.reference, REFERENCES)
        for name in ("num_samples", "max_concurrent_trials", "workers_per_trial", "max_rounds",
                     "calibration_batches", "min_channels"):
            _at_least(name, getattr(self, name), 1)
        for name in ("baseline_epochs", "attention_epochs", "epochs", "max_failures",
                     "bn_batches"):
            _at_least(name, getattr(self, name), 0)
        _at_least("batch_size", self.batch_size, 2)
        _at_least("tolerance", self.tolerance, 0)
        for name in ("lr", "finetune_lr", "cpus_per_worker"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        lw = self.loader_workers
        if lw is not None and (not isinstance(lw, int) or isinstance(lw, bool) or lw < 0):
            raise ConfigError(f"loader_workers must be an integer >= 0, got {lw!r}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ConfigError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.m_range is not None:
            _range("m_range", self.m_range, low=1, integer=True)
        _range("cap_range", self.cap_range, low=0.0, high_below=1.0)
        _range("lr_range", self.lr_range, low_above=0.0)
        _range("epochs_range", self.epochs_range, low=0, integer=True)
        if not self.name or "/" in self.name:
            raise ConfigError(f"name must be a non-empty folder name, got {self.name!r}")

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
    """Defaults < YAML file < flags given on the command line (None = not given)."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    try:
        cfg = SearchConfig(**merged)
    except TypeError as exc:
        raise ConfigError(f"bad configuration: {exc}") from None
    cfg.validate()
    return cfg


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def _at_least(name: str, value: Any, low: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} must be a number >= {low}, got {value!r}")


def _range(name: str, value: Any, low: float | None = None, high_below: float | None = None,
           low_above: float | None = None, integer: bool = False) -> None:
    if not isinstance(value, list | tuple) or len(value) == 0:
        raise ConfigError(f"{name} is empty; give [low, high]")
    if len(value) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                  for v in value):
        raise ConfigError(f"{name} must be two numbers [low, high], got {value!r}")
    lo, hi = value
    if integer and not all(float(v).is_integer() for v in value):
        raise ConfigError(f"{name} must be whole numbers, got {value!r}")
    if lo > hi:
        raise ConfigError(f"{name} has low > high: {value!r}")
    if low is not None and lo < low:
        raise ConfigError(f"{name} must start at >= {low}, got {value!r}")
    if low_above is not None and lo <= low_above:
        raise ConfigError(f"{name} must start above {low_above}, got {value!r}")
    if high_below is not None and hi >= high_below:
        raise ConfigError(f"{name} must end below {high_below}, got {value!r}")
