"""ResumableOptunaSearch: a trial unknown to a restored study is told to Optuna, not a crash."""

import optuna

from search.searcher import ResumableOptunaSearch

SPACE = {"groups_per_round": optuna.distributions.IntDistribution(1, 10),
         "cap_layer1": optuna.distributions.FloatDistribution(0.0, 0.9)}


def _searcher() -> ResumableOptunaSearch:
    return ResumableOptunaSearch(space=SPACE, metric=["accuracy", "flops"], mode=["max", "min"],
                                 sampler=optuna.samplers.RandomSampler(seed=0), seed=0)


def test_known_trial_completes_as_usual():
    searcher = _searcher()
    config = searcher.suggest("a")
    searcher.on_trial_complete("a", {"accuracy": 90.0, "flops": 5, "config": config})
    trials = searcher._ot_study.get_trials()
    assert [t.values for t in trials] == [[90.0, 5.0]]


def test_unknown_trial_after_restore_is_added_with_its_params():
    searcher = _searcher()
    config = {"groups_per_round": 4, "cap_layer1": 0.5}
    searcher.on_trial_result("lost", {"accuracy": 91.0, "flops": 7, "config": config})
    searcher.on_trial_complete("lost", {"accuracy": 91.0, "flops": 7, "config": config})
    searcher.on_trial_complete("lost", {"accuracy": 91.0, "flops": 7, "config": config})  # twice
    trials = searcher._ot_study.get_trials()
    assert len(trials) == 1
    assert trials[0].values == [91.0, 7.0] and trials[0].params == config


def test_unknown_failed_trial_is_skipped():
    searcher = _searcher()
    searcher.on_trial_complete("lost", None, error=True)
    searcher.on_trial_complete("other", {"accuracy": 91.0, "config": {}})  # no flops, no params
    assert searcher._ot_study.get_trials() == []


def test_finished_trial_adopted_from_disk_is_told_to_the_study():
    searcher = _searcher()
    config = {"groups_per_round": 3, "cap_layer1": 0.25}
    assert searcher.tell_finished(config, {"accuracy": 92.0, "flops": 9})
    assert not searcher.tell_finished({"groups_per_round": 3}, {"accuracy": 1.0, "flops": 1})
    assert not searcher.tell_finished(config, {"accuracy": 92.0})  # no flops reported
    (trial,) = searcher._ot_study.get_trials()
    assert trial.values == [92.0, 9.0] and trial.params == config
