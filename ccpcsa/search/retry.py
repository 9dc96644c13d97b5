"""--retry-failed without Tune's state: failed trials run again as new trials.

Tune's restore reruns errored trials from their last checkpoint, but only from a whole
experiment state, which a full disk can cut short. The trial folders are this search's own
record of what a retry needs: each failed trial's parameters and its last round's
checkpoint. So when Tune's state was set aside, each failed trial is run again as a new trial
with the same parameters (Optuna is given them to evaluate first; phase 2 lists them), which
starts from that checkpoint; the failed trial's folder is marked retried (RETRIED_FILE), so it
is not retried twice and is counted apart, its rounds still on the frontier. A failed trial
whose parameters the disk lost (an empty params.json, no report) cannot be run again as it
was: a new trial, drawn by the searcher, takes its place.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from ccpcsa import storage
from ccpcsa.search.ondisk import RETRIED_FILE, TrialOnDisk

log = logging.getLogger("ccpcsa.search")


@dataclass
class Retries:
    configs: list[dict[str, Any]] = field(default_factory=list)  # one per failed trial
    start_from: dict[str, str] = field(default_factory=dict)  # params_key -> checkpoint or ""
    fresh: int = 0  # failed trials whose parameters were lost: new trials take their place
    continues: dict[str, str] = field(default_factory=dict)  # params_key -> interrupted trial id


def params_key(params: dict[str, Any]) -> str:
    """The same string for the same parameters, however they travelled (JSON, Optuna)."""
    return json.dumps(params, sort_keys=True, default=str)


def last_checkpoint(trial: TrialOnDisk) -> tuple[int | None, str]:
    """(round, checkpoint) of the trial's last checkpointed round; (None, "") if none."""
    last = max((r for r, p in trial.rounds.items() if p.get("checkpoint")), default=None)
    return last, trial.rounds[last]["checkpoint"] if last is not None else ""


def mark_replaced(trial: TrialOnDisk, error: str) -> None:
    """Mark a trial whose parameters were lost as run again: a new trial takes its place."""
    storage.write_json(storage.join(trial.folder, RETRIED_FILE),
                       {"error": error, "from_round": 0, "checkpoint": "",
                        "parameters_lost": True})


def plan_retries(trials: list[TrialOnDisk]) -> Retries:
    """Run every failed trial on disk again (marking its folder retried): from its last
    round's checkpoint, or from the start when it reported none; one whose parameters are
    lost is replaced by a new trial (Retries.fresh)."""
    retries = Retries()
    for trial in trials:
        if trial.status != "failed":
            continue
        if not trial.params:
            retries.fresh += 1
            mark_replaced(trial, trial.error)
            log.info("%s failed (%s) and its parameters were not saved: a new trial takes its "
                     "place", trial.name, trial.error)
            continue
        last, checkpoint = last_checkpoint(trial)
        retries.configs.append(dict(trial.params))
        retries.start_from[params_key(trial.params)] = checkpoint
        storage.write_json(storage.join(trial.folder, RETRIED_FILE),
                           {"error": trial.error, "from_round": last or 0,
                            "checkpoint": checkpoint})
        log.info("%s failed (%s): running it again as a new trial from %s", trial.name,
                 trial.error, f"round {last}" if last else "the start")
    return retries
