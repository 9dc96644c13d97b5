"""Algorithm 1 end to end on the embedded digits, in one process."""

import io
import json

import pyarrow.parquet as pq
import pytest
import torch

from ccpcsa import load_checkpoint
from ccpcsa.__main__ import main
from ccpcsa.data import DataConfig, build_datasets, dataset_info
from ccpcsa.flops import count_flops, count_params
from ccpcsa.importance import DEFAULT_IMPORTANCE
from ccpcsa.loop import LoopConfig, PrepareConfig, default_round_to, prepare, prune_loop
from ccpcsa.prune import PruneLimits
from ccpcsa.train import LocalRunner, TrainConfig, evaluate


class CountingRunner(LocalRunner):
    """The real single-process runner, counting how often it trains."""

    fits = 0

    def fit(self, model, epochs, lr, label="train"):
        self.fits += 1
        return super().fit(model, epochs, lr, label)


@pytest.fixture(scope="module")
def digits():
    cfg = DataConfig("digits")
    info = dataset_info(cfg)
    train, test = build_datasets(cfg)
    return info, train, test


@pytest.fixture(scope="module")
def prepared(digits, tmp_path_factory):
    info, train, test = digits
    runner = CountingRunner(train, test, TrainConfig(batch_size=64))
    cfg = PrepareConfig("resnet20", info.num_classes, (3, info.image_size, info.image_size),
                        baseline_epochs=4, attention_epochs=2)
    cache = str(tmp_path_factory.mktemp("prep"))
    result = prepare(cfg, runner, cache)
    assert runner.fits == 2
    return cfg, cache, result


def test_prepare_trains_and_is_reused(prepared, digits):
    cfg, cache, result = prepared
    assert result.baseline_accuracy > 80.0  # digits are easy; a broken trainer would not be
    assert result.baseline_flops < count_flops(result.load_attention_model(), cfg.input_shape)
    runner = CountingRunner(digits[1], digits[2], TrainConfig())
    again = prepare(cfg, runner, cache)
    assert runner.fits == 0 and again == result


class LoggingRunner(LocalRunner):
    """The real single-process runner, logging what the loop asks of it, in order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def fit(self, model, epochs, lr, label="train"):
        self.calls.append("fit")
        return super().fit(model, epochs, lr, label)

    def evaluate(self, model):
        self.calls.append("evaluate")
        return super().evaluate(model)

    def calibration_batches(self, count):
        self.calls.append(f"calibration {count}")
        return super().calibration_batches(count)

    def recalibrate_bn(self, model, batches):
        self.calls.append(f"recalibrate {batches}")
        return super().recalibrate_bn(model, batches)


def run_loop(prepared, digits, reference, **overrides):
    cfg, _cache, result = prepared
    runner = LoggingRunner(digits[1], digits[2], TrainConfig(batch_size=64))
    loop_cfg = LoopConfig(**{"groups_per_round": 6, "max_rounds": 2, "finetune_epochs": 1,
                             **overrides})
    return prune_loop(result.load_attention_model(), cfg.model, cfg.input_shape, reference,
                      runner, loop_cfg, initial_accuracy=result.attention_accuracy), runner


def test_loop_runs_max_rounds_when_within_tolerance(prepared, digits):
    cfg = prepared[0]
    result, runner = run_loop(prepared, digits, reference=0.0, importance="ccpcsa")
    assert result.stop_reason == "max_rounds" and result.final_round == 2
    assert [r.round for r in result.records] == [0, 1, 2]
    flops = [r.flops for r in result.records]
    assert flops[0] > flops[1] > flops[2]
    assert all(r.removed == 6 for r in result.records[1:])
    # each round: score, remove, re-estimate BN, evaluate (accuracy_pruned), fine-tune, evaluate
    round_calls = ["calibration 4", "recalibrate 16", "calibration 16", "evaluate", "fit",
                   "evaluate"]
    assert runner.calls == round_calls * 2
    assert all(0.0 <= r.accuracy_pruned <= 100.0 for r in result.records)
    assert all(m.momentum == 0.1 for m in result.model.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    assert result.records[-1].flops == count_flops(result.model, cfg.input_shape)
    assert result.records[-1].params == count_params(result.model)
    assert evaluate(result.model, digits[2], runner.cfg) == pytest.approx(
        result.records[-1].accuracy)


def test_default_criterion_is_data_free_and_reads_no_calibration_batches(prepared, digits):
    # l1 (the benchmark's pick) scores weights: a round draws batches only to re-estimate BN
    assert LoopConfig().importance == DEFAULT_IMPORTANCE == "l1"
    result, runner = run_loop(prepared, digits, reference=0.0, max_rounds=1)
    assert runner.calls == ["recalibrate 16", "calibration 16", "evaluate", "fit", "evaluate"]
    assert result.records[1].removed == 6


def test_loop_returns_last_model_within_tolerance(prepared, digits):
    cfg = prepared[0]
    # A reference no pruned model can reach: round 1 breaks the tolerance, round 0 is returned.
    result, _ = run_loop(prepared, digits, reference=100.0, tolerance=0.5)
    assert result.stop_reason == "tolerance"
    assert result.final_round == 0
    assert not result.records[1].within_tolerance
    assert count_flops(result.model, cfg.input_shape) == result.records[0].flops


def test_loop_without_bn_recalibration_and_with_global_allocation(prepared, digits):
    result, runner = run_loop(prepared, digits, reference=0.0, bn_batches=0, max_rounds=1,
                              allocation="global", importance="taylor")
    assert runner.calls == ["calibration 4", "evaluate", "fit", "evaluate"]
    assert result.records[1].removed == 6


def test_bn_recalibration_gives_back_what_stale_statistics_cost(prepared, digits):
    """A heavy cut (every layer loses 60 %): right after surgery the BN statistics are stale;
    re-estimating them on a few training batches must recover accuracy, not lose it."""
    cfg, _cache, result = prepared
    kwargs = dict(groups_per_round=200, max_rounds=1, finetune_epochs=0, importance="ccpcsa")
    stale, _ = run_loop(prepared, digits, reference=0.0, bn_batches=0, **kwargs)
    fresh, _ = run_loop(prepared, digits, reference=0.0, bn_batches=16, **kwargs)
    assert stale.records[1].widths == fresh.records[1].widths  # the same channels went
    assert fresh.records[1].accuracy_pruned > stale.records[1].accuracy_pruned + 5.0


def test_screening_loop_reports_adaptive_bn_accuracy_and_never_fine_tunes(prepared, digits):
    """Screening (adaptive-BN evaluation only): no fit, one evaluation per round after BN is
    re-estimated, and a reference nothing reaches does not stop it: it runs every round. The
    widths are the full loop's (uniform allocation does not depend on the scores), so the
    screened round and the fine-tuned round of one schedule are at the same FLOPs."""
    screened, runner = run_loop(prepared, digits, reference=100.0, screen=True, max_rounds=3)
    assert runner.calls == ["recalibrate 16", "calibration 16", "evaluate"] * 3  # l1: no data
    assert screened.stop_reason == "max_rounds" and screened.final_round == 3
    assert [r.round for r in screened.records] == [0, 1, 2, 3]
    for record in screened.records[1:]:
        assert record.accuracy == record.accuracy_pruned and record.seconds_finetune == 0.0
        assert not record.within_tolerance
    full, _ = run_loop(prepared, digits, reference=0.0, max_rounds=2)
    assert [r.flops for r in full.records] == [r.flops for r in screened.records[:3]]
    assert full.records[1].accuracy_pruned == pytest.approx(screened.records[1].accuracy)
    with pytest.raises(ValueError, match="bn_batches must be >= 1"):
        run_loop(prepared, digits, reference=0.0, screen=True, bn_batches=0)


def test_loop_widths_are_multiples_of_round_to(prepared, digits):
    result, runner = run_loop(prepared, digits, reference=0.0, round_to=8, bn_batches=0,
                              finetune_epochs=0)
    original = result.records[0].widths
    for record in result.records[1:]:
        changed = {k: w for k, w in record.widths.items() if w != original[k]}
        assert changed and all(w % 8 == 0 for w in changed.values()), record.widths
        assert 6 <= record.removed < 6 + 8
    assert not runner.uses_cuda and default_round_to(runner) == 1  # the default on a CPU


def test_loop_stops_when_nothing_is_prunable(prepared, digits):
    result, _ = run_loop(prepared, digits, reference=0.0, groups_per_round=10_000,
                         max_rounds=3, limits=PruneLimits(max_ratio=0.5))
    assert result.stop_reason == "nothing_prunable"
    assert result.final_round == 1


def test_cli_prune_writes_rounds_checkpoints_config(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["prune", "--model", "resnet20", "--baseline-epochs", "3",
                 "--attention-epochs", "1", "--max-rounds", "2", "-m", "4",
                 "--tolerance", "100", "--out", str(out), "--seed", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "round" in printed and "stopped: max_rounds" in printed
    rows = pq.read_table(out / "rounds.parquet").to_pylist()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["accuracy_pruned"] is not None for r in rows)
    assert rows[0]["accuracy_pruned"] == rows[0]["accuracy"]
    assert rows[2]["flops"] < rows[1]["flops"] < rows[0]["flops"]
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 1 and config["versions"]["torch"].startswith("2.14")
    for row in rows:
        payload = torch.load(io.BytesIO(open(row["checkpoint"], "rb").read()),
                             weights_only=True)
        assert payload["metrics"]["flops"] == row["flops"]
    final = load_checkpoint(str(out / "final.pt"))
    assert count_flops(final, (3, 16, 16)) == rows[2]["flops"]
    _train, test = build_datasets(DataConfig("digits"))
    assert evaluate(final, test, TrainConfig()) == pytest.approx(rows[2]["accuracy"])


@pytest.mark.parametrize("argv, message", [
    (["-m", "-2"], "groups_per_round must be >= 1, got -2"),
    (["--tolerance", "-0.1"], "tolerance"),
    (["--max-ratio", "1.0"], "max_ratio must be < 1"),
    (["--stage-cap", "layer1=1.2"], "stage_cap layer1 must be < 1"),
    (["--stage-cap", "layer1"], "NAME=RATIO"),
    (["--model", "resnet21"], "unknown model 'resnet21'"),
    (["--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--importance", "magic"], "unknown importance"),
    (["--importance", "l1,taylor"], "prune takes one criterion"),
    (["--allocation", "magic"], "invalid choice: 'magic'"),
    (["--bn-batches", "-1"], "bn_batches must be >= 0"),
    (["--residual-cap", "1.0"], "residual_cap must be < 1"),
    (["--workers", "0"], "workers must be >= 1"),
    (["--round-to", "0"], "round_to must be >= 1, got 0"),
    (["--max-rounds", "0"], "max_rounds must be >= 1"),
    (["-m", "abc"], "invalid int value"),
    (["--lr", "nan"], "expected a finite number"),
])
def test_bad_input_one_line_error_before_training(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    try:
        code = main(["prune", "--out", str(out), *argv])
    except SystemExit as exited:  # refused by the flag parser
        code = exited.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (out / "prepared").exists()


def test_unwritable_out_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["prune", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write" in err and str(blocker) in err and len(err.splitlines()) == 1
