"""The search's Optuna study in its journal file (ccpcsa.search.searcher), through public Optuna and
Ray Tune APIs only: what a stopped session leaves in it is brought in line with the trial
folders, a journal cut short by a kill still loads, and a killed holder leaves no lock."""

import os
import signal
import subprocess
import sys
import time

import optuna

from ccpcsa.search.ondisk import TrialOnDisk
from ccpcsa.search.searcher import (
    JOURNAL_FILE,
    FlockLock,
    journal_of,
    make_searcher,
    open_study,
    reconcile,
)

SPACE = {"groups_per_round": optuna.distributions.IntDistribution(1, 10),
         "cap_layer1": optuna.distributions.FloatDistribution(0.0, 0.9)}


def _searcher(folder, points=()):
    return make_searcher(journal_of(str(folder)), SPACE, optuna.samplers.RandomSampler(seed=0),
                         list(points))


def _finished(trial_id: str, params: dict, accuracy: float, flops: int) -> TrialOnDisk:
    return TrialOnDisk(trial_id, f"run_trial_{trial_id}_1", 1, f"/nowhere/{trial_id}",
                       params=dict(params), final={"accuracy": accuracy, "flops": flops})


def _states(study) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def test_a_new_session_finds_the_study_its_predecessor_left(tmp_path):
    searcher = _searcher(tmp_path)
    done = searcher.suggest("a")
    searcher.on_trial_complete("a", {"accuracy": 90.0, "flops": 5, "config": done})
    searcher.suggest("b")  # asked, then the session was killed
    del searcher

    study = open_study(journal_of(str(tmp_path)))
    assert _states(study) == ["COMPLETE", "RUNNING"]
    assert reconcile(study, SPACE, [_finished("a", done, 90.0, 5)]) == 0  # already told
    assert _states(study) == ["COMPLETE", "FAIL"]  # the folders decide what b becomes
    again = _searcher(tmp_path)  # Ray's OptunaSearch loads it (create_study load_if_exists)
    again.suggest("c")
    study = open_study(journal_of(str(tmp_path)))
    assert _states(study) == ["COMPLETE", "FAIL", "RUNNING"]
    assert study.trials[0].values == [90.0, 5.0] and study.trials[0].params == done


def test_enqueued_trials_never_asked_do_not_start_again(tmp_path):
    points = [{"groups_per_round": 3, "cap_layer1": 0.25}, {"groups_per_round": 4,
                                                             "cap_layer1": 0.5}]
    _searcher(tmp_path, points)  # enqueued (WAITING), then the session was killed
    study = open_study(journal_of(str(tmp_path)))
    assert _states(study) == ["WAITING", "WAITING"]
    reconcile(study, SPACE, [])
    assert _states(study) == ["FAIL", "FAIL"]
    searcher = _searcher(tmp_path, points[:1])  # this session owes only the first
    assert searcher.suggest("x") == points[0]
    assert searcher.suggest("y") not in points  # drawn by the sampler


def test_a_trial_finished_on_disk_but_not_told_is_added_once(tmp_path):
    params = {"groups_per_round": 3, "cap_layer1": 0.25}
    study = open_study(journal_of(str(tmp_path)))
    disk = [_finished("a", params, 92.0, 9), _finished("b", params, 92.0, 9),
            _finished("c", {"groups_per_round": 3}, 1.0, 1),  # another space: not told
            TrialOnDisk("d", "run_trial_d_4", 4, "/nowhere/d", params=params)]  # interrupted
    assert reconcile(study, SPACE, disk) == 2
    assert reconcile(open_study(journal_of(str(tmp_path))), SPACE, disk) == 0
    trials = open_study(journal_of(str(tmp_path))).trials
    assert [(t.values, t.params) for t in trials] == [([92.0, 9.0], params)] * 2


def test_a_journal_cut_short_by_a_kill_loads_and_takes_new_operations(tmp_path, caplog):
    params = {"groups_per_round": 3, "cap_layer1": 0.25}
    reconcile(open_study(journal_of(str(tmp_path))), SPACE, [_finished("a", params, 92.0, 9)])
    path = tmp_path / JOURNAL_FILE
    whole = path.read_bytes()
    with path.open("ab") as f:  # the start of an operation Optuna was writing when killed
        f.write(b'{"op_code":5,"worker_id":"x","trial_id":0,"st')
    study = open_study(journal_of(str(tmp_path)))
    assert "cut short" in caplog.text and path.read_bytes().startswith(whole)
    searcher = _searcher(tmp_path)
    config = searcher.suggest("b")
    searcher.on_trial_complete("b", {"accuracy": 80.0, "flops": 4, "config": config})
    study = open_study(journal_of(str(tmp_path)))
    assert [t.values for t in study.trials] == [[92.0, 9.0], [80.0, 4.0]]


def test_an_unreadable_journal_is_set_aside_and_rebuilt_from_disk(tmp_path, caplog):
    params = {"groups_per_round": 3, "cap_layer1": 0.25}
    (tmp_path / JOURNAL_FILE).write_bytes(b"not json\n{}\n")
    study = open_study(journal_of(str(tmp_path)))
    assert "cannot be read" in caplog.text
    assert list(tmp_path.glob(f"{JOURNAL_FILE}.unreadable-*"))
    assert reconcile(study, SPACE, [_finished("a", params, 92.0, 9)]) == 1


def test_tune_can_save_and_load_the_searcher(tmp_path):
    searcher = _searcher(tmp_path)
    searcher.suggest("a")
    searcher.save(str(tmp_path / "searcher.pkl"))  # what Tune does with its state
    restored = _searcher(tmp_path)
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_complete("a", {"accuracy": 1.0, "flops": 2})
    assert _states(open_study(journal_of(str(tmp_path)))) == ["COMPLETE"]


def test_a_killed_holder_leaves_no_lock(tmp_path):
    path = tmp_path / "lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; "
         f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX);"
         " print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    lock = FlockLock(str(path))
    started = time.monotonic()
    assert lock.acquire()
    lock.release()
    assert time.monotonic() - started < 5

