"""The parts of the two-phase search that decide, without a cluster: which screened schedules
become finalists, what the early-stopping schedulers stop, the new settings' checks.
(tests/test_search.py runs the whole two-phase search on Ray.)"""

from __future__ import annotations

import numpy as np
import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from ccpcsa.search.config import ConfigError, config_from_dict
from ccpcsa.search.early_stop import GAP, FrontierGap, make_scheduler
from ccpcsa.search.finalists import (
    finalist_config,
    load_finalists,
    pareto_layers,
    save_finalists,
    select_finalists,
)
from ccpcsa.search.ondisk import TrialOnDisk, read_early_stopped


def screened_trial(trial_id: str, points: list[tuple[float, int]], status="finished"):
    trial = TrialOnDisk(trial_id, f"run_trial_{trial_id}_1", 1, f"/x/{trial_id}",
                        params={"groups_per_round": len(trial_id), "cap_layer1": 0.5},
                        phase="screen")
    trial.rounds = {r: {"accuracy": a, "flops": f} for r, (a, f) in enumerate(points, 1)}
    if status == "finished":
        trial.final = {"accuracy": points[-1][0], "flops": points[-1][1]}
    elif status == "failed":
        trial.error = "RuntimeError: boom"
    return trial


def test_pareto_layers_peel_frontiers():
    accuracy = np.array([90.0, 80.0, 85.0, 70.0, 60.0, 80.0])
    flops = np.array([100.0, 50.0, 100.0, 50.0, 40.0, 60.0])
    # layer 1: (90, 100), (80, 50), (60, 40); layer 2: (85, 100), (80, 60), (70, 50)
    assert pareto_layers(accuracy, flops).tolist() == [1, 1, 2, 2, 1, 2]


def test_finalists_are_the_schedules_nearest_the_screened_frontier(tmp_path):
    trials = [
        screened_trial("a", [(90.0, 100), (40.0, 60)]),  # layer 1 (90 @ 100)
        screened_trial("b", [(85.0, 90), (60.0, 50)]),  # layer 1 twice
        screened_trial("c", [(80.0, 95), (30.0, 70)]),  # layer 2
        screened_trial("d", [(70.0, 98)]),  # layer 3
        screened_trial("e", [(99.0, 10)], status="failed"),  # not finished: never chosen
    ]
    chosen = select_finalists(trials, 3, baseline_flops=110)
    assert [(f.screened_trial, f.layer) for f in chosen] == [("b", 1), ("a", 1), ("c", 2)]
    assert chosen[0].hypervolume > chosen[1].hypervolume > 0  # b dominates more area than a
    assert [f.screened_trial for f in select_finalists(trials, 10, 110)] == list("bacd")
    assert select_finalists([], 3, 110) == []
    save_finalists(str(tmp_path), chosen)
    assert load_finalists(str(tmp_path)) == chosen
    assert finalist_config(chosen[0]) == {"groups_per_round": 1, "cap_layer1": 0.5,
                                          "screened_trial": "b"}
    assert load_finalists(str(tmp_path / "none")) is None
    (tmp_path / "finalists.json").write_text("")
    with pytest.raises(ValueError, match="finalists.json"):
        load_finalists(str(tmp_path))


def test_frontier_gap_is_the_distance_below_other_trials_cheaper_points():
    gap = FrontierGap([("a", 90.0, 100), ("a", 80.0, 50), ("b", 85.0, 70)])
    assert gap.gap("c", 95.0, 100) == 0.0  # above every cheaper point: on the frontier
    assert gap.gap("c", 84.0, 70) == pytest.approx(-1.0)  # b has 85 % at 70
    assert gap.gap("c", 70.0, 60) == pytest.approx(-10.0)  # a has 80 % at 50
    assert gap.gap("c", 70.0, 40) == 0.0  # nothing that cheap
    assert gap.gap("a", 79.0, 60) == 0.0  # a trial is not compared with itself


@pytest.mark.parametrize("kind", ["asha", "median"])
def test_early_stopping_stops_the_trial_behind_the_frontier_and_records_it(tmp_path, kind):
    scheduler = make_scheduler(kind, str(tmp_path), max_rounds=9)
    trials = [Trial("run_trial", trial_id=f"t{i}", stub=True) for i in range(5)]
    for trial in trials:
        scheduler.on_trial_add(None, trial)

    def report(trial, rnd, accuracy, flops, final=False):
        result = {"round": rnd, "accuracy": accuracy, "flops": flops, "is_final": final}
        decision = scheduler.on_trial_result(None, trial, result)
        assert GAP in result
        return decision

    # four trials on or near one frontier, then one far below it at the same FLOPs
    for i, trial in enumerate(trials[:4]):
        assert report(trial, 1, 95.0 - 0.1 * i, 100 - i) == TrialScheduler.CONTINUE
        scheduler.on_trial_complete(None, trial, {"round": 1, "accuracy": 95.0 - 0.1 * i,
                                                  "flops": 100 - i})
    assert report(trials[4], 1, 60.0, 100) == TrialScheduler.STOP
    stopped = read_early_stopped(str(tmp_path))
    assert list(stopped) == ["t4"] and stopped["t4"]["round"] == 1
    assert stopped["t4"][GAP] < -30
    # a final report never stops a trial (it is ending anyway)
    late = Trial("run_trial", trial_id="t5", stub=True)
    scheduler.on_trial_add(None, late)
    assert report(late, 1, 10.0, 100, final=True) == TrialScheduler.CONTINUE
    assert make_scheduler("off", str(tmp_path), 9) is None


@pytest.mark.parametrize("values, words", [
    ({"screen": 4, "finalists": 5}, ["finalists 5", "screen 4"]),
    ({"screen": 0, "finalists": 5}, ["finalists", "screen"]),
    ({"screen": 4, "bn_batches": 0}, ["screen needs bn_batches"]),
    ({"screen": -1}, ["screen"]),
    ({"finalists": 0}, ["finalists"]),
    ({"early_stop": "hyperband"}, ["early_stop", "hyperband"]),
    ({"sampler": "cmaes"}, ["sampler", "cmaes"]),
    ({"train_subset": -5}, ["train_subset"]),
    ({"screen_eval_images": 50}, ["screen_eval_images 50", "needs screen"]),
    ({"screen": 4, "screen_eval_images": -1}, ["screen_eval_images"]),
    ({"screen": 4, "screen_eval_images": 50, "dataset": "parquet", "data_root": "x"},
     ["screen_eval_images", "parquet"]),
    ({"startup_trials": 0}, ["startup_trials", "0"]),
    ({"startup_trials": 4, "sampler": "random"}, ["startup_trials 4", "'random'"]),
    ({"startup_trials": 4, "sampler": "nsga2"}, ["startup_trials 4", "'nsga2'"]),
])
def test_two_phase_settings_are_checked(values, words):
    with pytest.raises(ConfigError) as error:
        config_from_dict(values)
    for word in words:
        assert word in str(error.value), str(error.value)
    assert config_from_dict({"screen": 4, "finalists": 4, "sampler": "gp",
                             "early_stop": "asha"}).finalist_count == 4
    assert config_from_dict({"screen": 4}).finalist_count == 4  # the default 8, capped at N
    assert config_from_dict({"screen": 64}).finalist_count == 8


@pytest.mark.parametrize("kind", ["asha", "median"])
def test_early_stopping_runs_inside_tune_and_stops_the_trial_behind(tmp_path, kind):
    """Through Tune's own controller (which checks every result for the scheduler's metric
    before the scheduler sees it): trials report accuracy and FLOPs only, never the gap."""
    import ray
    from ray import tune

    def trainable(config):
        for rnd in range(1, 4):
            tune.report({"round": rnd, "accuracy": config["accuracy"] - rnd, "flops": 100,
                         "is_final": False})

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        experiment = tmp_path / "exp"
        experiment.mkdir()
        scheduler = make_scheduler(kind, str(experiment), max_rounds=3)
        accuracies = [95.0, 94.9, 94.8, 94.7, 40.0]
        grid = tune.Tuner(
            trainable,
            param_space={"accuracy": tune.grid_search(accuracies)},
            tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=1),
            run_config=tune.RunConfig(storage_path=str(tmp_path), name="run", verbose=0),
        ).fit()
    finally:
        ray.shutdown()
    assert not grid.errors
    rounds = {r.config["accuracy"]: r.metrics["round"] for r in grid}
    assert rounds[95.0] == 3  # the first trial is the frontier: it runs every round
    assert rounds[40.0] < 3  # 55 points below the others at the same FLOPs: stopped
    stopped = read_early_stopped(str(experiment))
    assert len(stopped) >= 1 and all(v[GAP] < 0 for v in stopped.values())


@pytest.mark.parametrize("sampler", ["tpe", "gp"])
def test_startup_trials_hands_over_to_the_model_after_n_random_trials(sampler):
    import optuna

    from ccpcsa.search.run import make_sampler

    def suggested(startup: int | None) -> list[float]:
        cfg = config_from_dict({"sampler": sampler, "startup_trials": startup, "seed": 3})
        study = optuna.create_study(directions=["maximize", "minimize"],
                                    sampler=make_sampler(cfg, 12))
        picked = []
        for _ in range(4):
            trial = study.ask()
            x = trial.suggest_float("x", 0.0, 1.0)
            study.tell(trial, [x, (x - 0.3) ** 2])
            picked.append(x)
        return picked

    default, early = suggested(None), suggested(2)
    assert early[:2] == default[:2]  # the same seeded random start
    assert early[2:] != default[2:]  # then the model picks; the default is still random
