"""SearchConfig: every setting of one search, declared once (ccpcsa.settings), from flags
and/or a YAML file or the configuration saved with a run, checked up front."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ccpcsa import settings, validation
from ccpcsa.distributed.capacity import PLACEMENTS
from ccpcsa.settings import TrainingSettings, choice, number, optional, setting, whole

SAMPLERS = ("tpe", "nsga2", "gp", "random")
MODEL_SAMPLERS = ("tpe", "gp")  # those that start with random trials (startup_trials)
EARLY_STOPS = ("off", "asha", "median")
DEFAULT_FINALISTS = 8

SEARCH, RESOURCES, RESULTS, FINAL = ("search", settings.RESOURCES, settings.RESULTS,
                                     settings.FINAL)


class ConfigError(validation.SettingError):
    pass


@dataclass
class SearchConfig(TrainingSettings):
    """A search: the shared settings (model, data, stage 0, the loop, final fine-tune,
    resources) and the search's own."""

    num_samples: int = setting(8, "trials to run without --screen", SEARCH, check=whole(1))
    screen: int = setting(
        0, "two-phase search: phase 1 runs N sampled schedules through the pruning rounds "
        "with adaptive-BN evaluation only (BatchNorm re-estimated on --bn-batches batches, no "
        "fine-tune), phase 2 fine-tunes the --finalists nearest the screened frontier through "
        "the full loop; --num-samples is then unused; 0 = one phase", SEARCH, metavar="N",
        check=whole(0))
    finalists: int | None = setting(
        None, "with --screen: schedules fine-tuned in phase 2, taken from the Pareto layers of "
        "the screened points (layer 1 = the screened frontier)", SEARCH, metavar="K",
        check=optional(whole(1)), default_text=f"{DEFAULT_FINALISTS}, at most N")
    # evaluation was most of a screened round's cost
    screen_eval_images: int = setting(
        0, "with --screen: evaluate screened rounds on a fixed random N images of the test "
        "split, not all of it (cheaper, noisier screening; fine-tuned rounds always use the "
        "whole split; not for parquet); 0 = the whole split", SEARCH, metavar="N",
        check=whole(0))
    early_stop: str = setting(
        "off", "stop fine-tuning trials whose rounds fall behind the frontier (accuracy minus "
        "the best other trial's at the same or fewer FLOPs): asha = Tune's ASHA, median = "
        "Tune's median stopping rule; never applied to screening", SEARCH, choices=EARLY_STOPS,
        check=choice(EARLY_STOPS))
    max_concurrent_trials: int = setting(2, "trials running at once", SEARCH, check=whole(1))
    # gp: the best of tpe, nsga2 and gp in benchmarks/search_hypervolume.py (two-phase,
    # Fashion-MNIST: gp 2.001, tpe 1.890, nsga2 1.793 hypervolume; random 2.052 — no sampler
    # beat random search there, docs/findings.md says so)
    sampler: str = setting(
        "gp", "Optuna multi-objective sampler (gp = Gaussian process with expected "
        "hypervolume improvement; random = the baseline that ignores results)", SEARCH,
        choices=SAMPLERS, check=choice(SAMPLERS))
    # None = Optuna's 10, which leaves a 12-trial search almost random
    startup_trials: int | None = setting(
        None, "with --sampler tpe or gp: trials (screened schedules with --screen) sampled at "
        "random before the sampler's model picks the rest", SEARCH, metavar="N",
        check=optional(whole(1)), default_text="Optuna's 10")
    per_layer: bool = setting(False, "search one ratio cap per layer group instead of one per "
                              "stage", SEARCH, check=validation.flag)
    # residual-stream groups cost the most accuracy when pruned (docs/design.md)
    search_residual_cap: bool = setting(
        True, "per-stage mode: one more searched ratio, for the residual-stream groups, "
        "instead of their stage's", SEARCH, check=validation.flag)
    m_range: list[int] | None = setting(
        None, "range of m, channel groups removed per round", SEARCH, metavar="LOW,HIGH",
        default_text="0.5%%-4%% of the model's prunable channels")
    cap_range: list[float] = setting([0.0, 0.9], "range of each ratio cap, in [0, 1)", SEARCH,
                                     metavar="LOW,HIGH")
    search_finetune: bool = setting(False, "also search the fine-tune learning rate and epochs",
                                    SEARCH, check=validation.flag)
    lr_range: list[float] = setting([0.001, 0.05], "fine-tune lr range with --search-finetune",
                                    SEARCH, metavar="LOW,HIGH")
    epochs_range: list[int] = setting([1, 3], "fine-tune epochs range with --search-finetune",
                                      SEARCH, metavar="LOW,HIGH")
    final_top: int = setting(
        3, "frontier points that get the final fine-tune (--final-epochs): K spread evenly "
        "along the frontier by FLOPs, the deepest always among them; 0 = every frontier point",
        FINAL, metavar="K", check=whole(0))

    workers_per_trial: int = setting(
        1, "Ray Train data-parallel workers per trial; 1 = train inside the trial process",
        RESOURCES, check=whole(1))
    max_failures: int = setting(
        1, "retries of a crashed trial, from its last checkpoint, and restarts of a trial's "
        "Ray Train worker group after a lost worker or node, from its last epoch", RESOURCES,
        check=whole(0))
    # STRICT_PACK: a trial's Ray Train workers on one node (ccpcsa.distributed.capacity)
    placement: str = setting(
        "STRICT_PACK", "how a trial's Ray Train workers are placed: STRICT_PACK (all on one "
        "node), PACK, SPREAD, STRICT_SPREAD", RESOURCES, choices=PLACEMENTS,
        check=choice(PLACEMENTS))
    wait_for_resources: float = setting(
        600.0, "before stage 0, ask the autoscaler for one trial's resources and wait this "
        "long for them (a trial no node type can hold is refused at once)", RESOURCES,
        metavar="SECONDS", check=number(low=0))

    storage: str = setting("runs/search", "results folder or URI: local path, file://, s3://, "
                           "gs://, NFS", RESULTS, check=validation.location)
    name: str = setting("ccpcsa-search", "run name; results in <storage>/<name>", RESULTS,
                        check=validation.run_name)
    resume: bool = setting(
        False, "continue the interrupted search <storage>/<name>: finished trials are kept, "
        "unfinished ones continue; the saved configuration is used (and checked like flags); "
        "other settings given with it must equal the saved ones, except --retry-failed, "
        "--storage, --latency-batch, --loader-workers, --max-failures and "
        "--wait-for-resources", RESULTS, check=validation.flag)
    retry_failed: bool = setting(
        False, "with --resume: run the failed trials again, as new trials with the same "
        "parameters, from their last checkpoint (e.g. after a full disk), instead of keeping "
        "them as failed", RESULTS, check=validation.flag)

    WORKERS: ClassVar[str] = "workers_per_trial"

    @staticmethod
    def upgrade(values: dict[str, Any]) -> dict[str, Any]:
        """Settings saved by an earlier version: the search's on/off `residual_cap` is
        `search_residual_cap` now (`residual_cap` is a ratio, as in `ccpcsa prune`)."""
        if isinstance(values.get("residual_cap"), bool):
            values["search_residual_cap"] = values.pop("residual_cap")
        return values

    def check_together(self) -> None:
        super().check_together()
        check = validation
        if self.startup_trials is not None and self.sampler not in MODEL_SAMPLERS:
            raise ConfigError(f"startup_trials {self.startup_trials} applies to sampler "
                              f"{' or '.join(MODEL_SAMPLERS)}, not {self.sampler!r}")
        if self.finalists is not None:
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
        if self.retry_failed and not self.resume:
            raise ConfigError("retry_failed needs resume: it runs the failed trials of an "
                              "earlier search again (--resume --retry-failed)")
        if self.m_range is not None:
            low, _ = check.pair("m_range", self.m_range, int)
            check.whole("m_range low", int(low), 1)
        low, high = check.pair("cap_range", self.cap_range)
        check.number("cap_range low", low, low=0)
        check.number("cap_range high", high, below=1)
        check.number("lr_range low", check.pair("lr_range", self.lr_range)[0], above=0)
        check.whole("epochs_range low", int(check.pair("epochs_range", self.epochs_range, int)[0]),
                    0)

    @property
    def finalist_count(self) -> int:
        """K: the schedules phase 2 fine-tunes (0 without --screen)."""
        if self.finalists is not None:
            return self.finalists
        return min(DEFAULT_FINALISTS, self.screen)


def field_names() -> list[str]:
    return settings.setting_names(SearchConfig)


def load_yaml(path: str) -> dict[str, Any]:
    try:
        data = settings.load_yaml(path, SearchConfig)
    except validation.SettingError as exc:
        raise ConfigError(str(exc)) from None
    unknown = sorted(set(SearchConfig.upgrade(dict(data))) - set(field_names()))
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
    try:
        return settings.from_dict(SearchConfig, values, source)
    except validation.SettingError as exc:
        raise ConfigError(str(exc)) from None
