"""Early stopping of fine-tuning trials that fall behind the frontier (--early-stop).

Trials prune to different FLOPs, so their accuracies are not comparable round by round. The
scalar Tune's schedulers compare is therefore each round's **frontier gap**: its accuracy
minus the best accuracy any *other* trial has reported at the same or fewer FLOPs (0 when no
other point is that cheap: the round is on the frontier so far; negative when another trial
already has a cheaper and more accurate model). A trial whose gap at round r is among the
worst of the trials that reached round r is stopped by Tune's scheduler:

- asha: ASHA (AsyncHyperBandScheduler), rungs at rounds 1, 3, 9, ... (grace period 1,
  reduction factor 3): at each rung a trial continues only if its gap is in the best third;
- median: the median stopping rule: from round 1 on, a trial stops when its best gap is worse
  than the median of the other trials' mean gaps up to that round (at least 3 of them).

A stopped trial keeps every round it reported (they are frontier candidates like any other);
it is listed in <experiment>/early_stopped.json with the round and gap it was stopped at, and
the frontier's `status` column says "stopped early". Screening trials are never stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from ray.tune.result import DEFAULT_METRIC
from ray.tune.schedulers import AsyncHyperBandScheduler, MedianStoppingRule, TrialScheduler

from ccpcsa import storage
from ccpcsa.search.ondisk import EARLY_STOPPED_FILE, read_early_stopped

log = logging.getLogger("ccpcsa.search")

GAP = "frontier_gap"
TIME_ATTR = "round"
ASHA_REDUCTION = 3
MEDIAN_MIN_TRIALS = 3


class FrontierGap:
    """The frontier of every (accuracy, FLOPs) reported so far, by trial."""

    def __init__(self, points: Iterable[tuple[str, float, int]] = ()) -> None:
        self.points: list[tuple[str, float, int]] = list(points)

    def gap(self, trial_id: str, accuracy: float, flops: int) -> float:
        cheaper = [a for t, a, f in self.points if t != trial_id and f <= flops]
        return min(0.0, accuracy - max(cheaper)) if cheaper else 0.0

    def add(self, trial_id: str, accuracy: float, flops: int) -> None:
        self.points.append((trial_id, float(accuracy), int(flops)))


class _StopsOnFrontierGap:
    """Mixin for a Tune scheduler: adds GAP to every result before the scheduler sees it,
    never stops a trial on its final report, and records the trials it stops."""

    @property
    def metric(self) -> str:
        # Tune checks that every result carries the scheduler's metric *before* handing it to
        # the scheduler, but the gap is computed here, in on_trial_result, from the other
        # trials' points. Answering Tune's default metric skips that check; self._metric
        # (GAP) still drives ASHA / the median rule.
        return DEFAULT_METRIC

    def _setup_gap(self, experiment_dir: str, points: Iterable[tuple[str, float, int]]) -> None:
        self._experiment_dir = experiment_dir
        self._frontier = FrontierGap(points)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if "accuracy" not in result or "flops" not in result:
            return TrialScheduler.CONTINUE
        trial_id = trial.trial_id
        result[GAP] = self._frontier.gap(trial_id, result["accuracy"], result["flops"])
        if result.get("is_final"):  # the trial is ending: nothing left to save
            return TrialScheduler.CONTINUE
        self._frontier.add(trial_id, result["accuracy"], result["flops"])
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP:
            self._record_stop(trial_id, result)
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if result and "accuracy" in result and "flops" in result and GAP not in result:
            result[GAP] = self._frontier.gap(trial.trial_id, result["accuracy"],
                                             result["flops"])
        if result and GAP in result:
            super().on_trial_complete(tune_controller, trial, result)

    def _record_stop(self, trial_id: str, result: dict[str, Any]) -> None:
        log.info("early stopping: trial %s stopped after round %s (frontier gap %.2f points)",
                 trial_id, result.get(TIME_ATTR), result[GAP])
        stopped = read_early_stopped(self._experiment_dir)
        stopped[trial_id] = {"round": result.get(TIME_ATTR), GAP: result[GAP]}
        storage.write_json(storage.join(self._experiment_dir, EARLY_STOPPED_FILE), stopped)


class AshaOnFrontierGap(_StopsOnFrontierGap, AsyncHyperBandScheduler):
    def __init__(self, experiment_dir: str, max_rounds: int,
                 points: Iterable[tuple[str, float, int]] = ()) -> None:
        super().__init__(time_attr=TIME_ATTR, metric=GAP, mode="max", max_t=max_rounds,
                         grace_period=1, reduction_factor=ASHA_REDUCTION,
                         stop_last_trials=False)
        self._setup_gap(experiment_dir, points)


class MedianOnFrontierGap(_StopsOnFrontierGap, MedianStoppingRule):
    def __init__(self, experiment_dir: str, max_rounds: int,
                 points: Iterable[tuple[str, float, int]] = ()) -> None:
        super().__init__(time_attr=TIME_ATTR, metric=GAP, mode="max", grace_period=1,
                         min_samples_required=MEDIAN_MIN_TRIALS)
        self._setup_gap(experiment_dir, points)

    def _on_insufficient_samples(self, tune_controller, trial, time) -> str:
        return TrialScheduler.CONTINUE  # never pause a trial to wait for others


def make_scheduler(kind: str, experiment_dir: str, max_rounds: int,
                   points: Iterable[tuple[str, float, int]] = ()) -> TrialScheduler | None:
    """The scheduler for --early-stop `kind` ("off": None, Tune's FIFO); `points` are the
    (trial id, accuracy, FLOPs) already on disk, so a resumed search compares with them."""
    if kind == "off":
        return None
    cls = {"asha": AshaOnFrontierGap, "median": MedianOnFrontierGap}[kind]
    return cls(experiment_dir, max_rounds, points)
