"""Algorithm 1 of the paper: prepare() is steps 1-2, prune_loop() steps 3-11."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from ccpcsa import storage, weights
from ccpcsa.attention import insert_bam
from ccpcsa.checkpoint import CheckpointInfo, load_checkpoint, read_payload, save_checkpoint
from ccpcsa.flops import count_flops, count_params
from ccpcsa.importance import DEFAULT_IMPORTANCE, IMPORTANCES
from ccpcsa.layout import output_channels
from ccpcsa.models import build_model, get_spec
from ccpcsa.prune import (
    ALLOCATIONS,
    PruneLimits,
    channel_groups,  # noqa: F401 - part of the loop's API (tests, benchmarks)
)
from ccpcsa.pruner import Pruner, Scorer
from ccpcsa.runner import Runner
from ccpcsa.train import seed_everything

log = logging.getLogger("ccpcsa.loop")

REFERENCES = ("baseline", "attention")


@dataclass(frozen=True)
class PrepareConfig:
    """Steps 1-2. Every field changes the trained models, so every field (plus a fingerprint
    of the data under data_root) is part of the stage-0 cache key."""

    model: str
    num_classes: int
    input_shape: tuple[int, int, int]
    dataset: str = "digits"
    baseline_epochs: int = 10
    attention_epochs: int = 5
    lr: float = 0.05
    seed: int = 0
    data_root: str | None = None
    batch_size: int = 64  # global batch
    workers: int = 1  # data-parallel workers: BatchNorm statistics and float sums depend on it
    sync_bn: bool = False
    train_subset: int = 0  # > 0: trained on a fixed random N images (DataConfig.train_subset)
    # trained weights replacing step 1's training (ccpcsa.weights: a file or a torchvision
    # weights name); the key holds their SHA-256 too (stage0_keys)
    weights: str | None = None

    def validate(self) -> None:
        get_spec(self.model, self.input_shape)
        for name in ("baseline_epochs", "attention_epochs"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")


@dataclass(frozen=True)
class LoopConfig:
    groups_per_round: int = 8  # m: channels (each with its coupled channels) removed per round
    tolerance: float = 0.5  # percentage points of top-1 below the reference
    max_rounds: int = 10
    finetune_epochs: int = 1
    finetune_lr: float = 0.01
    importance: str = DEFAULT_IMPORTANCE
    calibration_batches: int = 4
    # how many channels each layer gives per round (prune.select_channels); the score only
    # ranks channels within a layer under "uniform"
    allocation: str = "uniform"
    bn_batches: int = 16  # BatchNorm re-estimated on this many batches after surgery; 0 = off
    # every pruned width a multiple of this (tensor cores); None = 8 when the runner trains on
    # CUDA, else 1
    round_to: int | None = None
    limits: PruneLimits = field(default_factory=PruneLimits)
    # Algorithm 1 compares with Acc of step 1 (the model before BAM); "attention" uses M'.
    reference: str = "baseline"
    seed: int = 0
    # Adaptive-BN screening (EagleEye, MetaPruning): no fine-tune; each round's accuracy is
    # the one after BatchNorm re-estimation, and the loop runs to max_rounds (or until nothing
    # is prunable) whatever that accuracy: screened accuracies rank schedules against each
    # other, they are far below the reference and not held to the tolerance.
    screen: bool = False
    # FLOPs to reach (--target-flops x the baseline's): rounds go on past the tolerance, still
    # reported (not within it), until the model has at most this many; None = stop at the
    # tolerance
    target_flops: int | None = None

    def validate(self) -> None:
        # `not x >= low` also refuses NaN, which every comparison calls False
        if not self.groups_per_round >= 1:
            raise ValueError(f"groups per round (m) must be >= 1, got {self.groups_per_round}")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ValueError(f"tolerance must be a finite number >= 0 percentage points, got "
                             f"{self.tolerance}")
        if not self.max_rounds >= 1:
            raise ValueError(f"max rounds must be >= 1, got {self.max_rounds}")
        if not self.finetune_epochs >= 0:
            raise ValueError(f"fine-tune epochs must be >= 0, got {self.finetune_epochs}")
        if not (math.isfinite(self.finetune_lr) and self.finetune_lr > 0):
            raise ValueError(f"fine-tune lr must be a finite number > 0, got {self.finetune_lr}")
        if self.importance not in IMPORTANCES:
            raise ValueError(
                f"unknown importance {self.importance!r}; choose one of: {', '.join(IMPORTANCES)}")
        if self.calibration_batches < 1:
            raise ValueError(f"calibration batches must be >= 1, got {self.calibration_batches}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; choose one of: "
                             f"{', '.join(ALLOCATIONS)}")
        if self.bn_batches < 0:
            raise ValueError(f"BN recalibration batches must be >= 0, got {self.bn_batches}")
        if self.screen and self.bn_batches < 1:
            raise ValueError("screening evaluates after BatchNorm re-estimation: bn_batches "
                             f"must be >= 1, got {self.bn_batches}")
        if self.round_to is not None and not (isinstance(self.round_to, int)
                                              and self.round_to >= 1):
            raise ValueError(f"round-to must be an integer >= 1, got {self.round_to!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"unknown reference {self.reference!r}; choose one of: "
                             f"{', '.join(REFERENCES)}")
        if self.target_flops is not None and not (isinstance(self.target_flops, int)
                                                  and self.target_flops > 0):
            raise ValueError(f"target FLOPs must be a whole number > 0, got {self.target_flops!r}")
        self.limits.validate()


@dataclass
class Prepared:
    """Steps 1-2, shared by every trial of a search."""

    baseline_accuracy: float
    baseline_flops: int
    baseline_params: int
    attention_accuracy: float
    attention_checkpoint: str  # path of M' (BAM inserted and trained)
    baseline_checkpoint: str = ""  # path of M (step 1), for latency comparisons

    def reference_accuracy(self, reference: str) -> float:
        return self.baseline_accuracy if reference == "baseline" else self.attention_accuracy

    def load_attention_model(self, user_model: str | None = None) -> nn.Module:
        """M'; a MODULE:CALLABLE model only when it is `user_model`, the --model of this run
        (see load_checkpoint)."""
        return load_checkpoint(self.attention_checkpoint, user_model=user_model).train()


@dataclass
class RoundRecord:
    round: int
    accuracy: float  # top-1 % after this round's fine-tune (screening: = accuracy_pruned)
    flops: int
    params: int
    removed: int
    within_tolerance: bool
    widths: dict[str, int]
    seconds_score: float = 0.0
    seconds_prune: float = 0.0
    seconds_finetune: float = 0.0
    # top-1 % right after surgery (BatchNorm re-estimated unless bn_batches = 0), before the
    # fine-tune: what the channels chosen are worth; round 0: the starting accuracy
    accuracy_pruned: float | None = None
    seconds_recalibrate: float = 0.0  # BatchNorm re-estimation + that evaluation


@dataclass
class LoopResult:
    model: nn.Module  # the last model within tolerance
    final_round: int
    records: list[RoundRecord]
    stop_reason: str


# PrepareConfig fields that name files: their content (a cheap fingerprint) is in the key too.
# The weights' key is their SHA-256 (a name may stand for a file in the torch hub cache).
FINGERPRINTED_FIELDS = ("data_root",)


def stage0_keys(cfg: PrepareConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cache keys of step 1 (the baseline) and step 2 (the BAM model): every setting that
    changes what they train to, and a fingerprint of each file or folder a setting names."""
    fields = asdict(cfg)
    if not fields["train_subset"]:  # keys made before the setting existed stay valid
        del fields["train_subset"]
    for name in FINGERPRINTED_FIELDS:
        path = fields.get(name)
        if path and not storage.is_uri(path):
            fields[name] = os.path.abspath(path)
        fields[f"{name}_fingerprint"] = storage.fingerprint(path)
    fields["weights_sha256"] = weights.sha256(cfg.weights) if cfg.weights else ""
    baseline = {k: v for k, v in fields.items() if k != "attention_epochs"}
    return baseline, fields


def prepare(cfg: PrepareConfig, runner: Runner, cache_dir: str) -> Prepared:
    """Train M (step 1), then M + BAM (step 2). Each step is cached in cache_dir under a key of
    everything that changes its result (stage0_keys) and reused when the same settings ask
    again: a resumed or second run does not retrain them, and a run killed during step 2 does
    not retrain step 1."""
    cfg.validate()
    baseline_key, attention_key = stage0_keys(cfg)
    meta_path = storage.join(cache_dir, "prepare.json")
    attention_path = storage.join(cache_dir, "attention.pt")
    cached = _cached(meta_path, attention_key, attention_path)
    if cached is not None:
        log.info("reusing prepared models from %s", cache_dir)
        return Prepared(**cached["prepared"])

    model, baseline, baseline_path = _baseline_model(cfg, runner, cache_dir, baseline_key)
    seed_everything(cfg.seed + 1)  # step 2 draws the same numbers whether step 1 ran or loaded
    # BAM's width is the channels there now: weights may come from an already pruned model
    placements = list(get_spec(cfg.model, cfg.input_shape).bam_placements)
    insert_bam(model.cpu(), output_channels(model, placements, cfg.input_shape))
    log.info("step 2: training with BAM for %d epochs", cfg.attention_epochs)
    model = runner.fit(model, cfg.attention_epochs, cfg.lr, label="attention")
    attention = _measure(model, runner, cfg.input_shape)
    log.info("with BAM: accuracy %.2f%%, %s", attention[0], _flops_text(attention))
    _save(model, cfg, True, attention, attention_path, {"round": 0})
    prepared = Prepared(baseline[0], baseline[1], baseline[2], attention[0], attention_path,
                        baseline_path)
    # written after the checkpoint: a prepare.json always describes a complete attention.pt
    storage.write_json(meta_path, {"key": attention_key, "prepared": asdict(prepared)})
    return prepared


def _baseline_model(cfg: PrepareConfig, runner: Runner, cache_dir: str, key: dict[str, Any]
                    ) -> tuple[nn.Module, tuple[float, int, int], str]:
    """Step 1: M, its (accuracy, FLOPs, params) and its checkpoint's path, from the cache or
    made now: trained, or with --weights loaded and evaluated (then trained only when
    baseline_epochs asks for it)."""
    meta_path = storage.join(cache_dir, "baseline.json")
    path = storage.join(cache_dir, "baseline.pt")
    cached = _cached(meta_path, key, path)
    if cached is not None:
        log.info("step 1: reusing the baseline %s", path)
        accuracy, flops, params = cached["measured"]
        return (load_checkpoint(path, user_model=cfg.model).train(),
                (float(accuracy), int(flops), int(params)), path)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, cfg.num_classes, with_bam=False, input_shape=cfg.input_shape)
    if cfg.weights:  # step 1 is the user's training: evaluate it instead
        classifier = get_spec(cfg.model, cfg.input_shape).classifier(model)
        model = weights.load_weights(model, cfg.weights, classifier, cfg.dataset)
        log.info("step 1: starting from the weights %s (sha256 %s)", cfg.weights,
                 key["weights_sha256"][:12])
    if cfg.baseline_epochs or not cfg.weights:
        log.info("step 1: training the baseline %s for %d epochs", cfg.model,
                 cfg.baseline_epochs)
        model = runner.fit(model, cfg.baseline_epochs, cfg.lr, label="baseline")
    measured = _measure(model, runner, cfg.input_shape)
    log.info("baseline: accuracy %.2f%%, %s", measured[0], _flops_text(measured))
    _save(model, cfg, False, measured, path,
          {"round": -1, "weights": cfg.weights or "", "weights_sha256": key["weights_sha256"]})
    storage.write_json(meta_path, {"key": key, "measured": list(measured)})
    return model, measured, path


def _cached(meta_path: str, key: dict[str, Any], checkpoint: str) -> dict[str, Any] | None:
    """The cache entry at meta_path if it was made under `key` and its checkpoint exists."""
    if not storage.exists(meta_path):
        return None
    try:
        meta = storage.read_json(meta_path)
    except (OSError, ValueError) as exc:
        log.warning("ignoring the stage-0 cache entry %s: %s", meta_path, exc)
        return None
    stored = meta.get("key") if isinstance(meta, dict) else None
    if _canonical(stored) == _canonical(key) and storage.exists(checkpoint):
        return meta
    changed = sorted(k for k in key if not isinstance(stored, dict)
                     or _canonical(stored.get(k)) != _canonical(key[k]))
    log.info("%s was made with other settings (%s differ); making it again", meta_path,
             ", ".join(changed) or "checkpoint missing")
    return None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def prune_loop(
    model: nn.Module,
    model_name: str,
    input_shape: tuple[int, int, int],
    reference_accuracy: float,
    runner: Runner,
    cfg: LoopConfig,
    on_round: Callable[[RoundRecord, nn.Module], None] | None = None,
    initial_accuracy: float | None = None,
    start_round: int = 0,
    original_widths: dict[str, int] | None = None,
) -> LoopResult:
    """Each round: score channels -> remove m of them (allocation, then the lowest scores)
    -> adaptive-BN evaluation (BatchNorm re-estimated, then top-1: accuracy_pruned) ->
    fine-tune -> evaluate, until the accuracy falls more than `tolerance` below the reference,
    max_rounds pass, or nothing is prunable. With cfg.screen there is no fine-tune: a round's
    accuracy is its adaptive-BN accuracy and only max_rounds or nothing prunable stop it.
    With cfg.target_flops the tolerance does not stop the loop: it goes on (rounds past the
    tolerance are reported as such) until the model has at most that many FLOPs; the model
    returned is still the last one within the tolerance.

    To continue an interrupted loop, pass the model of round `start_round` and the group widths
    of the unpruned model (`original_widths`, which the ratio caps refer to); the record of the
    starting round is then not passed to `on_round` again."""
    cfg.validate()
    spec = get_spec(model_name, input_shape)
    round_to = cfg.round_to or default_round_to(runner)
    if cfg.round_to is None:
        cfg = replace(cfg, round_to=round_to)
    log.info("pruned widths are multiples of %d%s", round_to,
             "" if round_to > 1 else " (any width)")
    seed_everything(cfg.seed + start_round)
    pruner = Pruner(model, spec, input_shape, limits=cfg.limits, allocation=cfg.allocation,
                    round_to=round_to, original_widths=original_widths or None)
    widths_now = pruner.widths()  # this trace serves the first round too
    accuracy = runner.evaluate(model) if initial_accuracy is None else initial_accuracy
    first = RoundRecord(start_round, accuracy, count_flops(model, input_shape),
                        count_params(model), 0, reference_accuracy - accuracy <= cfg.tolerance,
                        widths_now, accuracy_pruned=accuracy)
    records = [first]
    if not first.within_tolerance and not cfg.screen:
        log.warning("the starting model (%.2f%%) is already more than %.2f points below the "
                    "reference (%.2f%%): if no round gets back within the tolerance, the "
                    "unpruned model is returned (train stage 0 longer, or --reference "
                    "attention)", accuracy, cfg.tolerance, reference_accuracy)
    if on_round and start_round == 0:
        on_round(first, model)
    best, best_round, reason = copy.deepcopy(model).cpu(), start_round, "max_rounds"
    for rnd in range(start_round + 1, cfg.max_rounds + 1):
        t0 = time.perf_counter()
        step = pruner.step(runner_scorer(runner, cfg, seed=cfg.seed + rnd), cfg.groups_per_round)
        if not step.removed:
            reason = "nothing_prunable"
            log.info("round %d: every layer is at its cap or floor; stopping", rnd)
            break
        removed, seconds_score = step.removed, step.seconds_trace + step.seconds_score
        t1 = time.perf_counter()
        model, accuracy_pruned = adaptive_bn_accuracy(pruner.model, runner, cfg.bn_batches)
        t2 = time.perf_counter()
        if cfg.screen:
            accuracy, t3 = accuracy_pruned, t2
        else:
            model = runner.fit(model, cfg.finetune_epochs, cfg.finetune_lr,
                               label=f"round {rnd}")
            accuracy = runner.evaluate(model)
            t3 = time.perf_counter()
        pruner.model = model
        within = reference_accuracy - accuracy <= cfg.tolerance
        record = RoundRecord(rnd, accuracy, count_flops(model, input_shape), count_params(model),
                             removed, within, step.widths, seconds_score,
                             t1 - t0 - seconds_score, t3 - t2, accuracy_pruned, t2 - t1)
        records.append(record)
        if cfg.screen:
            log.info("round %d: removed %d channels; accuracy %.2f%% after BN re-estimation "
                     "(screening, no fine-tune), %s", rnd, removed, accuracy,
                     _flops_text((accuracy, record.flops, record.params)))
        else:
            log.info("round %d: removed %d channels; accuracy %.2f%% right after pruning%s, "
                     "%.2f%% after fine-tuning (reference %.2f%%), %s", rnd, removed,
                     accuracy_pruned, " (BN re-estimated)" if cfg.bn_batches else "", accuracy,
                     reference_accuracy, _flops_text((accuracy, record.flops, record.params)))
        if on_round:
            on_round(record, model)
        reached = cfg.target_flops is not None and record.flops <= cfg.target_flops
        if within or cfg.screen:
            best, best_round = copy.deepcopy(model).cpu(), rnd
        elif cfg.target_flops is None:
            reason = "tolerance"
            log.info("round %d dropped %.2f points (> %.2f): returning round %d", rnd,
                     reference_accuracy - accuracy, cfg.tolerance, best_round)
            break
        if reached:
            reason = "target"
            log.info("round %d reached the FLOPs target (%s <= %s); the last round within the "
                     "tolerance is %d", rnd, record.flops, cfg.target_flops, best_round)
            break
    return LoopResult(best, best_round, records, reason)


def adaptive_bn_accuracy(model: nn.Module, runner: Runner, bn_batches: int
                         ) -> tuple[nn.Module, float]:
    """Adaptive-BN evaluation (EagleEye): re-estimate every BatchNorm's running statistics on
    `bn_batches` seeded training batches (train mode, no gradients, no weight update), then
    top-1 % on the test split. The cheap proxy for what a pruned model is worth once
    fine-tuned; bn_batches = 0 evaluates the model as it is. Returns (model, accuracy)."""
    if bn_batches:
        model = runner.recalibrate_bn(model, bn_batches)
    return model, runner.evaluate(model)


def runner_scorer(runner: Runner, cfg: LoopConfig, seed: int) -> Scorer:
    """Scores channels with cfg.importance on cfg.calibration_batches where the runner
    trains (Runner.score)."""
    return lambda model, groups: runner.score(cfg.importance, model, groups,
                                              cfg.calibration_batches, seed)


def record_of(result: LoopResult, round_number: int) -> RoundRecord:
    return next(r for r in result.records if r.round == round_number)


def default_round_to(runner: Runner) -> int:
    """8 where the runner trains on CUDA (tensor cores work on multiples of 8), else 1."""
    return 8 if getattr(runner, "uses_cuda", False) else 1


def _measure(model: nn.Module, runner: Runner, input_shape) -> tuple[float, int, int]:
    return runner.evaluate(model), count_flops(model, input_shape), count_params(model)


def _flops_text(measured: tuple[float, int, int]) -> str:
    from ccpcsa.flops import human

    return f"FLOPs {human(measured[1])}, params {human(measured[2])}"


def _save(model, cfg: PrepareConfig, with_bam: bool, measured, path: str, extra: dict) -> None:
    info = CheckpointInfo(cfg.model, cfg.num_classes, with_bam, cfg.input_shape, cfg.dataset,
                          {"accuracy": measured[0], "flops": measured[1], "params": measured[2]},
                          extra)
    save_checkpoint(model, info, path)


__all__ = ["LoopConfig", "PrepareConfig", "Prepared", "RoundRecord", "LoopResult", "prepare",
           "prune_loop", "adaptive_bn_accuracy", "read_payload"]
