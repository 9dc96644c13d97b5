"""--resume: restore Tune's experiment state only when it is whole and agrees with the trial
folders on disk; otherwise set it aside and go on from the trial folders.

Tune saves its state (tuner.pkl, experiment_state-<session>.json, searcher-state-<session>.pkl)
in place; a full disk or a kill while it writes leaves a file cut short, and Tune's restore
then "restarts the experiment": it forgets finished trials and runs the wrong number of new
ones. So before restoring, the newest state must parse and must count every trial that
finished on disk as finished. When it does not, the state files move to
unrestorable-tune-state-<time>/, the trials on disk are adopted as they are (finished and
failed ones kept; interrupted ones keep their rounds but are not continued, as their Tune
state is gone), Optuna is told the results of the finished ones, and a new Tune run starts
the trials the search still owes.
"""

from __future__ import annotations

import json
import logging
import pickletools
import time
from dataclasses import dataclass, field
from typing import Any

from ccpcsa import storage
from search.ondisk import TrialOnDisk

log = logging.getLogger("ccpcsa.search")

TUNER_FILE = "tuner.pkl"
STATE_PREFIX, STATE_SUFFIX = "experiment_state-", ".json"
TUNE_STATE_PREFIXES = ("experiment_state-", "searcher-state-", "basic-variant-state-")
ADOPTED_FILE = "adopted_trials.json"
ASIDE_PREFIX = "unrestorable-tune-state-"


@dataclass
class Plan:
    """How this session runs its trials."""

    restore: bool  # Tuner.restore from Tune's state
    num_samples: int  # trials a new Tune run starts (when not restoring)
    told: list[TrialOnDisk] = field(default_factory=list)  # finished trials to tell Optuna
    adopted: dict[str, str] = field(default_factory=dict)  # trial id -> status when adopted


def read_adopted(run_dir: str) -> dict[str, str]:
    path = storage.join(run_dir, ADOPTED_FILE)
    return dict(storage.read_json(path)) if storage.exists(path) else {}


def plan_resume(run_dir: str, num_samples: int, trials: list[TrialOnDisk]) -> Plan:
    adopted = read_adopted(run_dir)
    started = [t for t in trials if t.status != "not started"]
    if not storage.exists(storage.join(run_dir, TUNER_FILE)) and not _state_files(run_dir) \
            and not started:
        log.info("no trial of %s had started: starting its trials", run_dir)
        return Plan(False, num_samples, adopted=adopted)
    problem = state_problem(run_dir, trials, adopted)
    if problem is None:
        return Plan(True, 0, adopted=adopted)
    return plan_from_disk(run_dir, num_samples, trials, problem)


def plan_from_disk(run_dir: str, num_samples: int, trials: list[TrialOnDisk], problem: str
                   ) -> Plan:
    """Set Tune's state aside (it cannot be restored: `problem`) and adopt the trials on
    disk as they are; the trials still owed start anew."""
    adopted = read_adopted(run_dir)
    started = [t for t in trials if t.status != "not started"]
    aside = set_aside_tune_state(run_dir)
    adopted.update({t.trial_id: t.status for t in started if t.trial_id not in adopted})
    storage.write_json(storage.join(run_dir, ADOPTED_FILE), adopted)
    # a retried trial's retry is a trial of its own, already counted
    remaining = max(0, num_samples - sum(t.status != "retried" for t in started))
    by_status = {s: sum(t.status == s for t in started) for s in ("finished", "failed",
                                                                   "interrupted")}
    log.warning("Tune's state in %s cannot be restored (%s); it was moved to %s. Continuing "
                "from the %d trial folders on disk (%d finished, %d failed, %d interrupted, "
                "kept as they are) with %d new trial(s)", run_dir, problem, aside,
                len(started), by_status["finished"], by_status["failed"],
                by_status["interrupted"], remaining)
    return Plan(False, remaining, [t for t in started if t.status == "finished"], adopted)


def state_problem(run_dir: str, trials: list[TrialOnDisk], adopted: dict[str, str]
                  ) -> str | None:
    """Why Tune's saved state cannot be trusted, or None if it can."""
    files = {info.base_name: info for info in storage.list_dir(run_dir) if info.is_file}
    tuner = files.get(TUNER_FILE)
    if tuner is None or not tuner.size:
        return f"{TUNER_FILE} is {'missing' if tuner is None else 'empty'}"
    states = _state_files(run_dir)
    if not states:
        return f"no {STATE_PREFIX}*{STATE_SUFFIX}"
    newest = states[-1]
    try:
        state = storage.read_json(storage.join(run_dir, newest))
    except (OSError, ValueError) as exc:
        return str(exc)
    searchers = sorted(n for n in files if n.startswith("searcher-state-"))
    if searchers:
        problem = pickle_problem(storage.join(run_dir, searchers[-1]))
        if problem:  # Tune would restart the experiment, forgetting every trial
            return f"{searchers[-1]} {problem}"
    statuses = _statuses(state)
    if statuses is None:
        return f"{newest} holds no trial list"
    for trial in trials:
        if trial.trial_id in adopted or trial.status != "finished":
            continue
        if statuses.get(trial.trial_id) != "TERMINATED":
            return (f"trial {trial.name} finished on disk but {newest} records it as "
                    f"{statuses.get(trial.trial_id, 'unknown')}")
    return None


def pickle_problem(path: str) -> str:
    """Why the pickle at `path` is not whole ("" when it is), read opcode by opcode up to its
    STOP without running any of it."""
    data = storage.read_bytes(path)
    if not data:
        return "is empty"
    try:
        for _ in pickletools.genops(data):
            pass
    except ValueError as exc:
        return f"is cut short ({type(exc).__name__}: {exc})"
    return ""


def _state_files(run_dir: str) -> list[str]:
    return sorted(info.base_name for info in storage.list_dir(run_dir)
                  if info.is_file and info.base_name.startswith(STATE_PREFIX)
                  and info.base_name.endswith(STATE_SUFFIX))


def _statuses(state: Any) -> dict[str, str] | None:
    """trial id -> Tune status from an experiment state; None if it is not one."""
    try:
        found = {}
        for trial_json, _meta in state["trial_data"]:
            trial = json.loads(trial_json)
            found[str(trial["trial_id"])] = str(trial["status"])
        return found
    except (KeyError, TypeError, ValueError):
        return None


def set_aside_tune_state(run_dir: str) -> str:
    aside = storage.join(run_dir, ASIDE_PREFIX + time.strftime("%Y%m%d-%H%M%S"))
    for info in storage.list_dir(run_dir):
        name = info.base_name
        if info.is_file and (name == TUNER_FILE or name.startswith(TUNE_STATE_PREFIXES)):
            storage.move(storage.join(run_dir, name), storage.join(aside, name))
    return aside
