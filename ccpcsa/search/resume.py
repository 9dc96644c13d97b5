"""--resume from the run folder's own records, never from Ray Tune's saved state.

The trial folders (ccpcsa/search/ondisk.py) say what each trial did; the Optuna study in the phase's
journal (ccpcsa/search/searcher.py) holds what the sampler learnt. A session of a search, the first
or a resumed one, is one new Tune run of the trials the phase still owes:

- finished, stopped-early and failed trials are kept as they are (failed ones are run again
  with --retry-failed: ccpcsa/search/retry.py);
- an interrupted trial continues as a new trial with the same parameters from its last round's
  checkpoint; the new trial records the trial it continues (CONTINUES_FILE in its own folder),
  and once it has reported a round the old one counts as "continued" (its rounds stay on the
  frontier). A session stopped before that leaves the old trial interrupted: the next resume
  continues it again;
- an interrupted trial whose parameters the disk lost is replaced by a new trial (marked
  retried, as ccpcsa/search/retry.py does for a failed one);
- the searcher draws the rest: the phase's trials minus those kept and those continued.

Tune's own files in the experiment folder (tuner.pkl, experiment_state-*.json,
searcher-state-*.pkl) are never read, so a file that a full disk or a kill cut short cannot
make Tune restart the experiment or lose a trial, and nothing from them is unpickled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ccpcsa.search.ondisk import TrialOnDisk
from ccpcsa.search.retry import Retries, last_checkpoint, mark_replaced, params_key, plan_retries

log = logging.getLogger("ccpcsa.search")

# trials that hold a place among the phase's num_samples; retried and continued ones gave
# theirs to the trial that runs them again
HOLD_A_PLACE = ("finished", "stopped early", "failed", "interrupted")


@dataclass
class Plan:
    """What one session of a phase runs."""

    new: int  # trials the searcher draws
    again: Retries = field(default_factory=Retries)  # trials run again with known parameters

    @property
    def num_samples(self) -> int:
        """Trials the session's Tune run starts: the ones run again first."""
        return len(self.again.configs) + self.again.fresh + self.new


def plan_session(trials: list[TrialOnDisk], num_samples: int, retry_failed: bool) -> Plan:
    """The session's trials, from the phase's trial folders (all of them "not started" or
    none for a new search)."""
    again = plan_continuations(trials)
    if retry_failed:
        retries = plan_retries(trials)
        again.configs += retries.configs
        again.start_from.update(retries.start_from)
        again.fresh += retries.fresh
    held = sum(t.status in HOLD_A_PLACE for t in trials)
    return Plan(max(0, num_samples - held), again)


def plan_continuations(trials: list[TrialOnDisk]) -> Retries:
    """Every interrupted trial continues as a new trial from its last round's checkpoint; one
    whose parameters are lost is replaced by a new trial (Retries.fresh)."""
    again = Retries()
    for trial in trials:
        if trial.status != "interrupted":
            continue
        if not trial.params:
            again.fresh += 1
            mark_replaced(trial, "interrupted")
            log.info("%s was interrupted and its parameters were not saved: a new trial takes "
                     "its place", trial.name)
            continue
        last, checkpoint = last_checkpoint(trial)
        key = params_key(trial.params)
        again.configs.append(dict(trial.params))
        again.start_from[key] = checkpoint
        again.continues[key] = trial.trial_id
        log.info("%s was interrupted: it continues as a new trial from %s", trial.name,
                 f"round {last}" if last else "the start")
    return again
