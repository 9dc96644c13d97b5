"""The search's Optuna study, kept by Optuna in a journal file in the run folder.

Ray Tune's OptunaSearch is given an Optuna JournalStorage (optuna-journal.log, one JSON
operation per line, appended under a lock) and a study name, and loads the study from it
(create_study with load_if_exists). A resumed search therefore starts from the sampler's whole
history without Tune's own state. Before a session's Tune run the study is brought in line
with the trial folders, which are the search's record (ccpcsa/search/ondisk.py):

- a trial asked in a session that was stopped (RUNNING in the journal) is told it failed:
  the trial folders decide what happens to it (ccpcsa/search/resume.py), not the journal;
- a trial enqueued but never asked (WAITING) is asked and failed, so it cannot start as an
  extra trial; this session enqueues what it owes itself;
- a trial finished on disk whose result the journal lacks (stopped between the report and
  Optuna's tell) is added to the study with its parameters and objectives.

A kill while Optuna appends can leave the journal's last line cut short. Optuna skips such a
line when reading, but the next append would be glued to it and make the file unreadable, so
the cut-short tail is removed first. A journal that still cannot be read is set aside, and the
study is rebuilt from the finished trials on disk.

The lock is an flock() on a file beside the journal: the kernel releases it when the process
holding it dies, so a killed search leaves no stale lock. On object-store storage (s3://,
gs://) Optuna cannot lock or append in place: the journal is kept in a local folder and copied
to the run folder after every finished trial and at the end of the session.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState
from ray import tune

from ccpcsa import storage
from ccpcsa.search.ondisk import TrialOnDisk
from ccpcsa.search.retry import params_key

log = logging.getLogger("ccpcsa.search")

JOURNAL_FILE = "optuna-journal.log"
LOCK_FILE = "optuna-journal.flock"
STUDY_NAME = "ccpcsa"
METRICS = ["accuracy", "flops"]
MODES = ["max", "min"]
LOCAL_JOURNALS = os.path.join(tempfile.gettempdir(), "ccpcsa-optuna-journals")


class FlockLock(JournalFileOpenLock):
    """Optuna's journal lock as an exclusive flock() on `path`, released by the kernel when
    its holder dies (Optuna's own lock files stay behind after a kill, and a resume would wait
    out their grace period)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


@dataclass(frozen=True)
class Journal:
    """Where a phase's journal lives: `path` on this machine (the run folder's own file, or a
    local copy of it when `remote`, the run folder's file on an object store, is set)."""

    path: str
    remote: str = ""

    def sync(self) -> None:
        """Copy the local journal to the run folder (object stores only)."""
        if self.remote and os.path.exists(self.path):
            with open(self.path, "rb") as f:
                storage.write_bytes(self.remote, f.read())


def journal_of(folder: str) -> Journal:
    """The journal of the phase whose experiment folder is `folder`."""
    local = storage.local_path(folder)
    if local is not None:
        os.makedirs(local, exist_ok=True)
        return Journal(os.path.join(local, JOURNAL_FILE))
    remote = storage.join(folder, JOURNAL_FILE)
    place = os.path.join(LOCAL_JOURNALS, hashlib.sha256(folder.encode()).hexdigest()[:16])
    os.makedirs(place, exist_ok=True)
    journal = Journal(os.path.join(place, JOURNAL_FILE), remote)
    if storage.exists(remote):  # the run folder's copy is the one that counts
        data = storage.read_bytes(remote)
        with open(journal.path, "wb") as f:
            f.write(data)
    return journal


def repair_journal(path: str) -> bool:
    """Cut a last line that a kill left unfinished off the journal; True if one was."""
    if not os.path.exists(path):
        return False
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return False
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
    log.warning("%s: its last operation was cut short (%d bytes, the search was stopped while "
                "Optuna wrote it); removed", path, len(data) - keep)
    return True


def journal_storage(journal: Journal) -> JournalStorage:
    folder = os.path.dirname(journal.path)
    return JournalStorage(JournalFileBackend(journal.path,
                                             FlockLock(os.path.join(folder, LOCK_FILE))))


def open_study(journal: Journal) -> optuna.Study:
    """The study in the journal (a new one when there is none), after repair_journal; a
    journal Optuna still cannot read is set aside, and a new study started."""
    repair_journal(journal.path)
    try:
        return _load(journal)
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        aside = f"{journal.path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(journal.path, aside)
        log.warning("%s cannot be read (%s); moved to %s: the study is rebuilt from the "
                    "finished trials on disk", journal.path, exc, aside)
        return _load(journal)


def _load(journal: Journal) -> optuna.Study:
    return optuna.create_study(
        storage=journal_storage(journal), study_name=STUDY_NAME, load_if_exists=True,
        directions=["maximize" if m == "max" else "minimize" for m in MODES],
        sampler=optuna.samplers.RandomSampler())  # used only to pop waiting trials


def reconcile(study: optuna.Study, space: dict[str, Any], trials: list[TrialOnDisk]) -> int:
    """Bring the study in line with the trial folders (see the module's docstring); returns
    how many finished trials were added to it."""
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(stale.number, state=TrialState.FAIL)
    while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.tell(study.ask(), state=TrialState.FAIL)
    told = Counter(params_key(t.params) for t in
                   study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    added = 0
    for trial in trials:
        values = objectives(trial, space)
        if values is None:
            continue
        params = {k: trial.params[k] for k in space}
        if told[params_key(params)]:
            told[params_key(params)] -= 1
            continue
        study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, values=values,
                                                  params=params, distributions=space))
        added += 1
    return added


def objectives(trial: TrialOnDisk, space: dict[str, Any]) -> list[float] | None:
    """A finished trial's objectives, or None when it has none to tell (not finished, its
    parameters or results lost, or another search space)."""
    if trial.status != "finished" or set(trial.params) != set(space):
        return None
    values = [trial.final.get(m) for m in METRICS]
    return None if None in values else [float(v) for v in values]


def make_searcher(journal: Journal, space: dict[str, Any], sampler: optuna.samplers.BaseSampler,
                  points: list[dict[str, Any]]):
    """Ray Tune's OptunaSearch over the journal's study; `points` are asked first."""
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(space=space, metric=METRICS, mode=MODES, sampler=sampler,
                        storage=journal_storage(journal), study_name=STUDY_NAME,
                        points_to_evaluate=[dict(p) for p in points] or None)


class JournalSync(tune.Callback):
    """Copies an object-store run's journal to the run folder as trials finish."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.journal.sync()

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.journal.sync()
