"""A search's trials as they are on disk, read without Tune: the frontier and the summary are
built from these, so whatever a trial reported and checkpointed is counted, whether or not
Tune's own experiment state survived (a full disk, a kill while it was being saved).

A trial folder (<run>/<trainable>_<id>_<number>_<params>_<date>/) holds Tune's result.json
(one JSON report per line; a per-round report names its checkpoint_NNNNNN/ folder), params.json,
error.txt when the trial raised, and the checkpoint folders with our model.pt. A checkpoint
whose report did not reach result.json (the driver died before syncing it) is read from the
checkpoint itself, which carries the round and its metrics. A trial that the early-stopping
scheduler stopped is listed in <experiment>/early_stopped.json (ccpcsa/search/early_stop.py).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from ccpcsa import storage
from ccpcsa.search.failure import FAILURE_FILE

log = logging.getLogger("ccpcsa.search")

RESULT_FILE = "result.json"
PARAMS_FILE = "params.json"
ERROR_FILE = "error.txt"
CHECKPOINT_FILE = "model.pt"  # what ccpcsa.search.trial writes into each reported checkpoint
# trial ids: a searcher's (Optuna: 8 hex digits) or Tune's own variants' (<5 hex>_<5 digits>,
# a two-phase search's fine-tuned finalists)
TRIAL_FOLDER = re.compile(
    r"^(?P<name>.+?_(?P<id>[0-9a-f]{5}_\d{5}|[0-9a-f]{5,})_(?P<number>\d+))(?:_|$)")
EARLY_STOPPED_FILE = "early_stopped.json"  # written by ccpcsa/search/early_stop.py
RETRIED_FILE = "retried.json"  # written by ccpcsa/search/retry.py: run again as a new trial
# written by a trial that continues an interrupted one (ccpcsa/search/resume.py) into its own folder
CONTINUES_FILE = "continues.json"
# an exception's own line in a traceback ("OSError: [Errno 28] ...", "ray.exceptions.X: ...")
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)"
                            r"\b(?:\(\w+\))?(?::.*)?$")
CAUSE_LOST = "its cause was not recorded (error.txt is empty or cut short)"
STATUSES = ("finished", "stopped early", "failed", "retried", "continued", "interrupted",
            "not started")
# statuses of trials whose place another trial took (a retry, a continuation)
REPLACED = ("retried", "continued")


@dataclass
class TrialOnDisk:
    trial_id: str
    name: str  # <trainable>_<id>_<number>, as Tune names the trial in its logs
    number: int  # Tune's creation number of the trial in its session
    folder: str  # path or URI of the trial folder
    params: dict[str, Any] = field(default_factory=dict)
    rounds: dict[int, dict[str, Any]] = field(default_factory=dict)  # round -> metrics + ckpt
    final: dict[str, Any] | None = None  # the last report: the trial's returned model
    error: str = ""  # the trial's recorded cause, else the exception line of error.txt
    phase: str = "full"  # ccpcsa.search.trial.PHASES
    stopped_early: bool = False  # stopped by the early-stopping scheduler
    retried: bool = False  # failed, then run again as a new trial (ccpcsa/search/retry.py)
    continues: str = ""  # the id of the interrupted trial this one continues
    continued: bool = False  # interrupted, then continued by a trial that reported a round

    @property
    def status(self) -> str:
        if self.final is not None:
            return "finished"
        if self.retried:
            return "retried"
        if self.continued:
            return "continued"
        if self.error:
            return "failed"
        if self.stopped_early:
            return "stopped early"
        return "interrupted" if self.rounds else "not started"


def scan_trials(run_dir: str, phase: str = "full") -> list[TrialOnDisk]:
    """Every trial folder under run_dir (one Tune experiment: the whole search, or one phase
    of a two-phase search), in Tune's creation order within each session."""
    stopped = read_early_stopped(run_dir)
    trials = []
    for info in storage.list_dir(run_dir):
        found = TRIAL_FOLDER.match(info.base_name)
        if info.is_file or not found:
            continue
        trial = TrialOnDisk(found["id"], found["name"], int(found["number"]),
                            storage.join(run_dir, info.base_name), phase=phase,
                            stopped_early=found["id"] in stopped)
        _read_trial(trial)
        trials.append(trial)
    continued = {t.continues for t in trials if t.continues and t.status != "not started"}
    for trial in trials:
        trial.continued = trial.trial_id in continued
    # folder names end in the trial's creation time: sessions in order, then Tune's numbers
    return sorted(trials, key=lambda t: (t.folder.rsplit("_", 2)[-2:], t.number))


def read_early_stopped(run_dir: str) -> dict[str, Any]:
    """trial id -> what the early-stopping scheduler recorded when it stopped the trial."""
    path = storage.join(run_dir, EARLY_STOPPED_FILE)
    if not storage.exists(path):
        return {}
    try:
        found = storage.read_json(path)
    except (OSError, ValueError) as exc:
        log.warning("%s", exc)
        return {}
    return found if isinstance(found, dict) else {}


def _read_trial(trial: TrialOnDisk) -> None:
    files = set(storage.list_files(trial.folder))
    referenced = set()
    for report in _reports(storage.join(trial.folder, RESULT_FILE), files):
        trial.params = report.get("config") or trial.params
        if report.get("is_final"):
            trial.final = report
            continue
        checkpoint = ""
        folder = report.get("checkpoint_dir_name")
        if folder and f"{folder}/{CHECKPOINT_FILE}" in files:
            checkpoint = storage.join(trial.folder, folder, CHECKPOINT_FILE)
            referenced.add(folder)
        trial.rounds[int(report["round"])] = _point(report, checkpoint)  # a retry: last wins
    for name in sorted(files):
        folder, _, base = name.partition("/")
        if base == CHECKPOINT_FILE and folder.startswith("checkpoint_") and \
                folder not in referenced:
            _add_unreported_checkpoint(trial, storage.join(trial.folder, name))
    if not trial.params and PARAMS_FILE in files:
        try:
            trial.params = storage.read_json(storage.join(trial.folder, PARAMS_FILE))
        except (OSError, ValueError) as exc:
            log.warning("%s", exc)
    trial.retried = RETRIED_FILE in files
    if CONTINUES_FILE in files:
        trial.continues = _continued_id(storage.join(trial.folder, CONTINUES_FILE))
    recorded = ""
    if FAILURE_FILE in files:  # the trial's own exception (ccpcsa/search/failure.py), whole even
        # when a full disk cut error.txt short; blank unless its latest attempt raised
        recorded = storage.read_text(storage.join(trial.folder, FAILURE_FILE)).strip()
    if ERROR_FILE in files:
        text = storage.read_text(storage.join(trial.folder, ERROR_FILE))
        trial.error = recorded or error_line(text) or CAUSE_LOST
    elif recorded and trial.final is None:  # Tune could not even create error.txt
        trial.error = recorded


def _continued_id(path: str) -> str:
    try:
        return str(storage.read_json(path)["trial"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: %s", path, exc)
        return ""


def error_line(text: str) -> str:
    """The last exception line of Tune's error.txt; "" when a full disk cut it off before one
    (what is left may end in a source line or its ^^^^ markers, which name no cause)."""
    for line in reversed(text.splitlines()):
        if EXCEPTION_LINE.match(line.strip()):
            return line.strip()
    return ""


def _reports(path: str, files: set[str]) -> list[dict[str, Any]]:
    if RESULT_FILE not in files:
        return []
    reports = []
    for number, line in enumerate(storage.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            report = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d is cut short (the driver stopped while writing it); "
                        "its checkpoint is read instead", path, number)
            continue
        if isinstance(report, dict) and ("round" in report or report.get("is_final")):
            reports.append(report)
    return reports


def _point(report: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """A reported round: its measurements, the compute its trial had used by then (reports
    written before compute was measured have none) and its checkpoint."""
    pruned = report.get("accuracy_pruned")
    compute = report.get("compute_s")
    return {"accuracy": float(report["accuracy"]), "flops": int(report["flops"]),
            "params": int(report["params"]),
            "accuracy_pruned": None if pruned is None else float(pruned),
            "compute_s": None if compute is None else float(compute),
            "compute_unit": report.get("compute_unit"), "checkpoint": checkpoint,
            "within_tolerance": bool(report.get("within_tolerance", True)),
            "importance": report.get("importance") or ""}


def _add_unreported_checkpoint(trial: TrialOnDisk, path: str) -> None:
    from ccpcsa.checkpoint import CheckpointError, read_payload

    try:
        payload = read_payload(path)
        rnd = int(payload["extra"]["round"])
        metrics = {**payload["metrics"],
                   "compute_unit": payload["extra"].get("compute_unit"),
                   "within_tolerance": payload["extra"].get("within_tolerance", True),
                   "importance": payload["extra"].get("importance", "")}
    except (CheckpointError, KeyError, TypeError, ValueError) as exc:
        log.warning("skipping %s: %s", path, exc)
        return
    if rnd not in trial.rounds:
        log.info("%s: round %d read from its checkpoint (its report was not saved)",
                 trial.name, rnd)
        trial.rounds[rnd] = _point(metrics, path)


def remove_unstarted(trials: list[TrialOnDisk]) -> list[TrialOnDisk]:
    """For a phase whose owed trials all ran: delete the folders of trials Tune created but
    never started (a kill between creating a trial and starting it; the resume ran the trial
    owed under a new id) and return the other trials."""
    kept = []
    for trial in trials:
        if trial.status != "not started":
            kept.append(trial)
            continue
        log.info("removing %s: Tune created that trial but never started it before the search "
                 "was stopped; the trial it owed ran under another id", trial.folder)
        storage.remove_tree(trial.folder)
    return kept


def counts(trials: list[TrialOnDisk], num_samples: int) -> dict[str, int]:
    """Trials per status; those the search never started (no folder) are "not started"."""
    found = {status: 0 for status in STATUSES}
    for trial in trials:
        found[trial.status] += 1
    # a retry or a continuation is a trial of its own
    started = len(trials) - found["not started"] - sum(found[s] for s in REPLACED)
    found["not started"] = max(0, num_samples - started)
    return found

