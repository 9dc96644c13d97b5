"""OptunaSearch that survives Tuner.restore (an interrupted search resumed with --resume).

The searcher's state is saved periodically; a trial it suggested after the last save is
unknown to the restored Optuna study, and Ray's OptunaSearch raises KeyError when that trial
reports or completes. Here such a trial's final result is told to the study as a finished
trial with its parameters instead, so Optuna still learns from it and the search goes on.
"""

from __future__ import annotations

import logging

import optuna
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger("ccpcsa.search")


class ResumableOptunaSearch(OptunaSearch):
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._ot_trials or isinstance(self.metric, list):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in self._ot_trials or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        self._completed_trials.add(trial_id)
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        config = (result or {}).get("config", {})
        values = [(result or {}).get(m) for m in metrics]
        if error or None in values or set(config) != set(self._space):
            log.warning("trial %s was started before the search was interrupted; its result "
                        "stays in the run but is not told to Optuna", trial_id)
            return
        self._ot_study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, values=values,
            params={k: config[k] for k in self._space}, distributions=self._space))
        log.info("trial %s (started before the interruption) told to Optuna after resume",
                 trial_id)

    def tell_finished(self, params: dict, result: dict) -> bool:
        """Add a trial that finished outside this searcher (one adopted from disk when Tune's
        state was lost) to the Optuna study, so the sampler learns from it."""
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [result.get(m) for m in metrics]
        if None in values or set(params) != set(self._space):
            return False
        self._ot_study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, values=values,
            params={k: params[k] for k in self._space}, distributions=self._space))
        return True
