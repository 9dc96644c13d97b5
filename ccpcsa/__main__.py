"""`python -m ccpcsa prune`: prune one model with one schedule (no search)."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import asdict, replace
from typing import Any

from ccpcsa import exits, storage, validation
from ccpcsa.checkpoint import CheckpointError, CheckpointInfo, save_checkpoint
from ccpcsa.data import DATASETS, DataConfig, DataError, check_dataset
from ccpcsa.export import add_export_parser, run_export
from ccpcsa.importance import DEFAULT_IMPORTANCE, IMPORTANCES
from ccpcsa.latency import BATCH
from ccpcsa.loop import REFERENCES, LoopConfig, PrepareConfig, prepare, prune_loop, record_of
from ccpcsa.models import MODELS, check_model_name, get_spec
from ccpcsa.prunable import check_before_training
from ccpcsa.prune import ALLOCATIONS, PruneLimits
from ccpcsa.results import record_row, table_header, table_line, write_config, write_rows
from ccpcsa.runlock import RunInUseError, RunLock
from ccpcsa.runners import make_runner
from ccpcsa.train import TrainConfig, pick_device

log = logging.getLogger("ccpcsa")


class UsageError(validation.SettingError):
    pass


# what one prune run writes
RESULT_FILES = ("rounds.parquet", "final.pt", "final_nobam.pt", "target.pt")


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def parse_caps(items: list[str] | None, flag: str) -> dict[str, float]:
    caps = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            caps[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise UsageError(f"{flag} expects NAME=RATIO, got {item!r}")
    return caps


def add_training_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by `ccpcsa prune` and the search (search/run.py)."""
    p.add_argument("--model", default="resnet20",
                   help=f"architecture to prune: {', '.join(MODELS)}; any torchvision "
                        "classification CNN as torchvision:NAME (e.g. torchvision:resnet34, "
                        "torchvision:efficientnet_b0); or your own as MODULE:CALLABLE, a "
                        "function (num_classes) -> nn.Module importable on every node. BAM "
                        "placement and stages of models outside the registry are traced from "
                        "the input size (default: %(default)s)")
    p.add_argument("--weights", default=None,
                   help="start from trained weights instead of training step 1: a file (a "
                        "state_dict, a training checkpoint with a 'state_dict' or 'model' key, "
                        "or a ccpcsa checkpoint without BAM) or a torchvision weights name "
                        "such as ResNet50_Weights.IMAGENET1K_V2, read from the local torch hub "
                        "cache ($TORCH_HOME), never downloaded. The loaded model is evaluated "
                        "once: its accuracy is the reference. The classifier must have the data "
                        "set's number of classes")
    p.add_argument("--dataset", default="digits",
                   help=f"one of {', '.join(DATASETS)}; digits = the embedded scikit-learn "
                        "digits set, no download; fashion-mnist = the four idx .gz files "
                        "(apt-get install dataset-fashion-mnist) (default: %(default)s)")
    p.add_argument("--data-root", default=None,
                   help="folder holding cifar10/cifar100 (torchvision layout), an ImageNet-"
                        "style imagefolder (train/ and val/), Parquet shards, or the "
                        "Fashion-MNIST idx files (default for fashion-mnist: "
                        "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input side in pixels (default: the dataset's: digits 16, "
                        "fashion-mnist 28, cifar 32, imagefolder 224)")
    p.add_argument("--baseline-epochs", type=int, default=None,
                   help="step 1: epochs to train the model without BAM (default: 10; 0 with "
                        "--weights, which then only evaluates them; more fine-tunes them)")
    p.add_argument("--attention-epochs", type=int, default=5,
                   help="step 2: epochs to train the model with BAM (default: %(default)s)")
    p.add_argument("--lr", type=finite_float, default=0.05,
                   help="SGD learning rate of steps 1-2, cosine-annealed (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="global batch size (default: %(default)s)")
    p.add_argument("--tolerance", type=finite_float, default=0.5,
                   help="stop when top-1 falls more than this many percentage points below the "
                        "reference; the last model within it is returned (default: %(default)s)")
    p.add_argument("--max-rounds", type=int, default=10,
                   help="at most this many prune + fine-tune rounds; with --target-flops the "
                        "pace m is set to reach the target in about this many, and the rounds "
                        "it takes to get there are allowed (default: %(default)s)")
    p.add_argument("--target-flops", type=finite_float, default=None, metavar="FRACTION",
                   help="fraction of the baseline's FLOPs to reach, in (0, 1): 0.33 = -67 %% "
                        "FLOPs. The loop prunes on past --tolerance (those rounds are "
                        "reported as over tolerance; the final model stays the last round "
                        "within it) until the model has at most this many FLOPs. Refused when "
                        "the ratio caps cannot reach it (default: none, stop at the "
                        "tolerance)")
    p.add_argument("--epochs", type=int, default=1,
                   help="fine-tune epochs after each pruning round (default: %(default)s)")
    p.add_argument("--finetune-lr", type=finite_float, default=0.01,
                   help="SGD learning rate of each fine-tune (default: %(default)s)")
    p.add_argument("--importance", default=DEFAULT_IMPORTANCE,
                   help=f"channel scoring, one of {', '.join(IMPORTANCES)}: ccpcsa = the "
                        "paper's strength x (1 - mean |correlation|) on attention-weighted "
                        "maps; strength, maxcorr, dedup = its variants; attention = PCAS-style "
                        "mean attention; l1, bn_scale, taylor, lamp, fpgm, random = "
                        "Torch-Pruning's importances (default: %(default)s, chosen by the "
                        "Fashion-MNIST benchmark in docs/benchmarks.md; ccpcsa reproduces "
                        "the paper)")
    p.add_argument("--allocation", default="uniform",
                   help=f"how many channels each layer gives per round, one of "
                        f"{', '.join(ALLOCATIONS)}: uniform = every layer the same fraction "
                        "of its original width (relative to its cap), the score ranks "
                        "channels within a layer; global = the lowest scores over all layers; "
                        "flops = global ranking of score per MAC saved (default: %(default)s)")
    p.add_argument("--calibration-batches", type=int, default=4,
                   help="training batches (random, unaugmented) streamed to score channels "
                        "each round (default: %(default)s)")
    p.add_argument("--bn-batches", type=int, default=16,
                   help="after each surgery, re-estimate BatchNorm statistics on this many "
                        "training batches (no weight update) before the accuracy right after "
                        "pruning is measured and the fine-tune starts; 0 = off "
                        "(default: %(default)s)")
    p.add_argument("--reference", default="baseline",
                   help=f"one of {', '.join(REFERENCES)}: accuracy the tolerance is measured from: "
                        "baseline = step 1's model (Algorithm 1), attention = the BAM model "
                        "(default: %(default)s)")
    p.add_argument("--min-channels", type=int, default=4,
                   help="never shrink a layer below this many channels (default: %(default)s)")
    p.add_argument("--round-to", type=int, default=None, metavar="N",
                   help="every pruned width is a multiple of N (tensor cores work on multiples "
                        "of 8), within the caps and floor, which round up to a multiple; a "
                        "round removes at least m channels and less than N more (default: 8 "
                        "when training on CUDA, else 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--workers", type=int, default=1,
                   help="data-parallel training workers under Ray Train; 1 = one process, "
                        "no Ray (default: %(default)s)")
    p.add_argument("--gpus-per-worker", type=finite_float, default=None,
                   help="GPUs per Ray Train worker with --workers > 1 (default: 1 when the Ray "
                        "cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-worker", type=finite_float, default=1.0,
                   help="CPUs per Ray Train worker with --workers > 1 (default: %(default)s)")
    p.add_argument("--sync-bn", action="store_true",
                   help="BatchNorm statistics over the global batch of all Ray Train workers "
                        "(SyncBatchNorm on GPUs, an all-reduce BatchNorm on CPUs)")
    p.add_argument("--loader-workers", type=int, default=None,
                   help="DataLoader worker processes that decode images per training process "
                        "(map-style data; default: one per CPU the process may use, minus one, "
                        "at most 8; 0 for digits and on one CPU)")
    p.add_argument("--decode", choices=("cpu", "gpu"), default="cpu",
                   help="parquet with --workers > 1: decode JPEGs in Ray Data tasks on the "
                        "CPUs, or on each worker's GPU (nvJPEG) (default: %(default)s)")
    p.add_argument("--host-copy", choices=("ring", "ray_pin", "pageable"), default="ring",
                   help="parquet with --workers > 1 on GPUs: how batches reach the GPU (a ring "
                        "of reused pinned buffers, Ray Data's fresh pinned copies, pageable "
                        "memory) (default: %(default)s)")
    p.add_argument("--prefetch-batches", type=int, default=2,
                   help="parquet with --workers > 1: batches Ray Data prefetches per worker "
                        "(default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every epoch")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="ccpcsa",
        description="CCPCSA: attention-guided channel pruning (Zhao et al., Electronics 2023). "
                    "`ccpcsa COMMAND --help` explains a command's flags; `python -m ccpcsa` "
                    "is the same command.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    p = sub.add_parser(
        "prune", help="train, insert BAM, then prune + fine-tune until accuracy drops",
        description="Algorithm 1: train the model, insert BAM and train it, then each round "
                    "score channels, physically remove the m lowest-ranked channel groups and "
                    "fine-tune, until top-1 falls more than --tolerance points below the "
                    "reference. Writes rounds.parquet, checkpoints/, final.pt and config.json "
                    "to --out.")
    add_training_flags(p)
    p.add_argument("--groups-per-round", "-m", type=int, default=None,
                   help="m: channel groups removed per round (default: 8; with "
                        "--target-flops, the channels the target takes over --max-rounds)")
    p.add_argument("--max-ratio", type=finite_float, default=0.9,
                   help="default cap on the fraction of a layer's original channels that may be "
                        "removed, in [0, 1) (default: %(default)s)")
    p.add_argument("--stage-cap", action="append", metavar="STAGE=RATIO",
                   help="cap for one stage, e.g. layer1=0.5 (repeatable)")
    p.add_argument("--layer-cap", action="append", metavar="LAYER=RATIO",
                   help="cap for one channel group, named by its root layer (repeatable)")
    p.add_argument("--residual-cap", type=finite_float, default=None, metavar="RATIO",
                   help="cap for every residual-stream group (channels summed by skip "
                        "connections), instead of its stage's (default: the stage's)")
    p.add_argument("--final-epochs", type=int, default=0, metavar="N",
                   help="after the loop, fine-tune the final model N more epochs (with "
                        "--target-flops, the model that reached the target too, written to "
                        "target.pt); final.pt is then the fine-tuned model and records its "
                        "accuracy before (accuracy_before_final). Costs N epochs of training "
                        "per model (default: %(default)s, none)")
    p.add_argument("--final-lr", type=finite_float, default=None,
                   help="learning rate of the final fine-tune (default: --finetune-lr)")
    p.add_argument("--distill", action="store_true",
                   help="knowledge distillation from the unpruned model (step 1's) in the "
                        "final fine-tune: loss = (1 - w) x cross-entropy + w x T^2 x KL of "
                        "the temperature-softened outputs; needs --final-epochs")
    p.add_argument("--distill-rounds", action="store_true",
                   help="also distil in every round's fine-tune")
    p.add_argument("--distill-weight", type=finite_float, default=0.5, metavar="W",
                   help="w, weight of the soft-target term, in [0, 1] (default: %(default)s)")
    p.add_argument("--distill-temperature", type=finite_float, default=4.0, metavar="T",
                   help="T, softmax temperature of the soft targets (default: %(default)s)")
    p.add_argument("--strip-bam", action="store_true",
                   help="also write final_nobam.pt: the final model without BAM, fine-tuned")
    p.add_argument("--latency-batch", type=int, default=BATCH,
                   help="measure the baseline's and the final model's inference latency at "
                        "batch 1 and this batch (median of repeats after warm-up, on the "
                        "training device); 0 skips it (default: %(default)s)")
    p.add_argument("--out", default="runs/prune", help="output folder or URI "
                   "(default: %(default)s); one prune run at a time uses it (a lock file)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --out (rounds.parquet, "
                        "checkpoints/, final*.pt); without it such an --out is refused. The "
                        "stage-0 models in --out/prepared/ are reused when their settings match")
    add_export_parser(sub)
    for name, (_, _, text) in DELEGATED.items():  # listed here, run by run_delegated
        sub.add_parser(name, help=text, add_help=False)
    return parser


def configs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Validate every flag up front; raise UsageError / ValueError naming the bad value."""
    check_model_name(args.model)
    validation.location("--out", args.out)
    validation.whole("--seed", args.seed, 0)
    validation.whole("--latency-batch", args.latency_batch, 0)
    if args.weights is not None:
        validation.text("--weights", args.weights)
    if args.baseline_epochs is None:
        args.baseline_epochs = 0 if args.weights else 10
    validation.whole("--prefetch-batches", args.prefetch_batches, 0)
    data_cfg = DataConfig(args.dataset, args.data_root, args.image_size, decode=args.decode,
                          host_copy=args.host_copy, prefetch_batches=args.prefetch_batches)
    train_cfg = TrainConfig(batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            device=args.device, loader_workers=args.loader_workers,
                            distill_weight=args.distill_weight,
                            distill_temperature=args.distill_temperature)
    train_cfg.validate()
    validation.whole("--final-epochs", args.final_epochs, 0)
    if args.final_lr is not None:
        validation.number("--final-lr", args.final_lr, above=0)
    if args.distill and not args.final_epochs:
        raise UsageError("--distill distils in the final fine-tune: it needs --final-epochs N "
                         "(--distill-rounds distils in every round)")
    pick_device(args.device)
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    validation.per_worker_batch(args.batch_size, args.workers, "--batch-size")
    validation.gpus("--gpus-per-worker", args.gpus_per_worker)
    validation.number("--cpus-per-worker", args.cpus_per_worker, above=0)
    if args.loader_workers is not None and args.loader_workers < 0:
        raise UsageError(f"--loader-workers must be >= 0, got {args.loader_workers}")
    if args.round_to is not None:
        validation.whole("--round-to", args.round_to, 1)
    info = check_dataset(data_cfg)
    prep_cfg = PrepareConfig(args.model, info.num_classes,
                             (info.channels, info.image_size, info.image_size), args.dataset,
                             args.baseline_epochs, args.attention_epochs, args.lr, args.seed,
                             data_root=args.data_root, batch_size=args.batch_size,
                             workers=args.workers, sync_bn=args.sync_bn, weights=args.weights)
    prep_cfg.validate()
    check_before_training(prep_cfg)
    return {"data": data_cfg, "train": train_cfg, "prepare": prep_cfg, "info": info}


def check_layer_caps(layer_caps: dict[str, float], prep_cfg: PrepareConfig) -> None:
    """Every --layer-cap names a channel group of the model (a cap on no group would be
    silently ignored)."""
    if not layer_caps:
        return
    import torch

    from ccpcsa.models import build_model
    from ccpcsa.prune import build_graph, find_groups

    spec = get_spec(prep_cfg.model, prep_cfg.input_shape)
    model = build_model(prep_cfg.model, prep_cfg.num_classes, with_bam=True,
                        input_shape=prep_cfg.input_shape)
    graph = build_graph(model, torch.zeros(1, *prep_cfg.input_shape))
    groups = sorted(g.key for g in find_groups(model, graph, spec.classifier(model),
                                               spec.stage_of))
    unknown = sorted(set(layer_caps) - set(groups))
    if unknown:
        shown = ", ".join(groups[:12]) + (f" ... ({len(groups)} in all)" if len(groups) > 12
                                          else "")
        raise UsageError(f"--layer-cap names unknown layer group(s) {', '.join(unknown)} of "
                         f"{prep_cfg.model}; groups (by root layer): {shown}")


def plan_target(args: argparse.Namespace, prep_cfg: PrepareConfig, limits: PruneLimits
                ) -> tuple[int, int]:
    """(m, rounds) that reach --target-flops under the caps; UsageError when they cannot."""
    from ccpcsa.depth import (
        TargetError,
        check_target,
        flops_at_caps,
        per_round_for,
        ratio_for_target,
        rounds_to_reach,
        unpruned_flops,
    )

    try:
        check_target(args.target_flops, "--target-flops")
    except TargetError as exc:
        raise UsageError(str(exc)) from None
    name, classes, shape = prep_cfg.model, prep_cfg.num_classes, prep_cfg.input_shape
    round_to = args.round_to or 1
    flops, _removed, total = flops_at_caps(name, classes, shape, limits, round_to)
    baseline = unpruned_flops(name, classes, shape)
    if flops > args.target_flops * baseline:
        raise UsageError(f"--target-flops {args.target_flops} cannot be reached: pruned as far "
                         f"as the caps allow, {name} keeps {flops / baseline:.3f} of its FLOPs; "
                         "raise --max-ratio / --stage-cap / --residual-cap or the fraction")
    plan = ratio_for_target(name, classes, shape, args.target_flops, args.min_channels,
                            round_to, max_ratio=max(limits.max_ratio, 0.05))
    m = args.groups_per_round or per_round_for(plan, args.max_rounds)
    caps = [limits.max_ratio, *limits.stage_caps.values(), *limits.layer_caps.values(),
            *([] if limits.residual_cap is None else [limits.residual_cap])]
    rounds = max(args.max_rounds, rounds_to_reach(total, max(caps), m))
    print(f"target: {args.target_flops:g} of the baseline's FLOPs; m = {m} channels per "
          f"round, up to {rounds} rounds", flush=True)
    return m, rounds


def prepare_out_folder(out: str, overwrite: bool) -> None:
    """Refuse an --out holding an earlier run's results, or with --overwrite remove them, so
    no round of another run is left beside this one's."""
    found = [name for name in RESULT_FILES if storage.exists(storage.join(out, name))]
    rounds = [info.base_name for info in storage.list_dir(storage.join(out, "checkpoints"))
              if info.base_name.startswith("round_") and info.base_name.endswith(".pt")]
    if not found and not rounds:
        return
    if not overwrite:
        what = ", ".join([*found, *([f"{len(rounds)} round checkpoints"] if rounds else [])])
        raise UsageError(f"{out} already holds the results of a prune run ({what}); pass "
                         "--overwrite to replace them or choose another --out")
    for name in found:
        storage.remove(storage.join(out, name))
    for name in rounds:
        storage.remove(storage.join(out, "checkpoints", name))
    log.info("--overwrite: removed the earlier run's results from %s", out)


def loop_config_from_args(args: argparse.Namespace, groups_per_round: int, max_ratio: float,
                          stage_caps: dict[str, float], layer_caps: dict[str, float]
                          ) -> LoopConfig:
    cfg = LoopConfig(
        groups_per_round=groups_per_round, tolerance=args.tolerance, max_rounds=args.max_rounds,
        finetune_epochs=args.epochs, finetune_lr=args.finetune_lr, importance=args.importance,
        calibration_batches=args.calibration_batches, allocation=args.allocation,
        bn_batches=args.bn_batches, round_to=args.round_to,
        limits=PruneLimits(max_ratio, stage_caps, layer_caps, args.min_channels,
                           args.residual_cap),
        reference=args.reference, seed=args.seed)
    cfg.validate()
    return cfg


def run_prune(args: argparse.Namespace) -> int:
    configs = configs_from_args(args)
    stage_caps = parse_caps(args.stage_cap, "--stage-cap")
    layer_caps = parse_caps(args.layer_cap, "--layer-cap")
    spec = get_spec(args.model, configs["prepare"].input_shape)
    unknown = sorted(set(stage_caps) - set(spec.stages))
    if unknown:
        raise UsageError(f"--stage-cap names unknown stage(s) {', '.join(unknown)} of "
                         f"{args.model}; stages: {', '.join(spec.stages)}")
    check_layer_caps(layer_caps, configs["prepare"])
    groups_per_round = 8 if args.groups_per_round is None else args.groups_per_round
    if args.target_flops is not None:
        groups_per_round, args.max_rounds = plan_target(
            args, configs["prepare"], PruneLimits(args.max_ratio, stage_caps, layer_caps,
                                                  args.min_channels, args.residual_cap))
    loop_cfg = loop_config_from_args(args, groups_per_round, args.max_ratio, stage_caps,
                                     layer_caps)
    try:
        storage.check_writable(args.out)
    except OSError as exc:
        raise UsageError(str(exc)) from None
    with RunLock(args.out, "python -m ccpcsa prune"):
        prepare_out_folder(args.out, args.overwrite)
        return _prune_locked(args, configs, loop_cfg)


def _prune_locked(args: argparse.Namespace, configs: dict[str, Any], loop_cfg: LoopConfig
                  ) -> int:
    prep_cfg = configs["prepare"]
    write_config(storage.join(args.out, "config.json"),
                 {"command": "prune", **vars(args), "loop": asdict(loop_cfg)}, args.seed)

    runner = make_runner(configs["data"], configs["train"], args.workers,
                         storage.join(args.out, "ray"), gpus_per_worker=args.gpus_per_worker,
                         cpus_per_worker=args.cpus_per_worker, sync_bn=args.sync_bn)
    prepared = prepare(prep_cfg, runner, storage.join(args.out, "prepared"))
    if args.target_flops is not None:
        loop_cfg = replace(loop_cfg,
                           target_flops=int(args.target_flops * prepared.baseline_flops))
    reference = prepared.reference_accuracy(loop_cfg.reference)
    teacher_cfg = replace(configs["train"], teacher=prepared.baseline_checkpoint,
                          teacher_model=args.model)
    if args.distill_rounds:  # the teacher exists only now: the rounds get their own runner
        runner.close()
        runner = make_runner(configs["data"], teacher_cfg, args.workers,
                             storage.join(args.out, "ray"), gpus_per_worker=args.gpus_per_worker,
                             cpus_per_worker=args.cpus_per_worker, sync_bn=args.sync_bn)
    rows: list[dict[str, Any]] = []
    print(f"baseline {prepared.baseline_accuracy:.2f}%  with BAM "
          f"{prepared.attention_accuracy:.2f}%  reference ({loop_cfg.reference}) "
          f"{reference:.2f}%  tolerance {loop_cfg.tolerance} points", flush=True)
    print(table_header(), flush=True)

    def on_round(record, model) -> None:
        path = storage.join(args.out, "checkpoints", f"round_{record.round:03d}.pt")
        save_checkpoint(model, checkpoint_info(prep_cfg, True, record, reference), path)
        rows.append(record_row(record, prepared.baseline_flops, prepared.baseline_params, path))
        write_rows(rows, storage.join(args.out, "rounds.parquet"))
        print(table_line(rows[-1], reference), flush=True)

    result = prune_loop(prepared.load_attention_model(args.model), args.model, prep_cfg.input_shape,
                        reference, runner, loop_cfg, on_round,
                        initial_accuracy=prepared.attention_accuracy)
    final = record_of(result, result.final_round)
    final_path = storage.join(args.out, "final.pt")
    info = checkpoint_info(prep_cfg, True, final, reference)
    if args.final_epochs:
        if args.distill != args.distill_rounds:
            runner.close()
            runner = make_runner(configs["data"],
                                 teacher_cfg if args.distill else configs["train"],
                                 args.workers, storage.join(args.out, "ray"),
                                 gpus_per_worker=args.gpus_per_worker,
                                 cpus_per_worker=args.cpus_per_worker, sync_bn=args.sync_bn)
        final, info = final_finetune(result.model, final, info, runner, args, "final")
        deepest = result.records[-1]
        if args.target_flops is not None and deepest.round != result.final_round:
            from ccpcsa.checkpoint import load_checkpoint

            model = load_checkpoint(storage.join(args.out, "checkpoints",
                                                 f"round_{deepest.round:03d}.pt"),
                                    user_model=args.model).train()
            record, target_info = final_finetune(
                model, deepest, checkpoint_info(prep_cfg, True, deepest, reference), runner,
                args, f"round {deepest.round} (target)")
            save_checkpoint(model, target_info, storage.join(args.out, "target.pt"))
    save_checkpoint(result.model, info, final_path)
    row = rows[result.final_round]
    print(f"stopped: {result.stop_reason}; final model = round {result.final_round}: "
          f"{final.accuracy:.2f}% top-1, FLOPs {_versus_baseline(row['flops_reduction'])} and "
          f"params {_versus_baseline(row['params_reduction'])} the baseline -> {final_path}"
          f"{'' if final.within_tolerance else ' (over tolerance: no round stayed within it)'}",
          flush=True)
    if args.latency_batch:
        report_latency(prepared, result.model, final, rows, result.final_round, prep_cfg,
                       args, final_path, reference)
    if args.strip_bam:
        write_stripped(result.model, runner, prep_cfg, loop_cfg, args.out)
    runner.close()  # Ray Train workers, if any (also closed at exit after an error)
    if result.final_round == 0:  # the last line, so that a script's log shows it
        print(f"warning: nothing was pruned: no pruned round stayed within the tolerance, so "
              f"{final_path} is the unpruned model with BAM (more FLOPs than the baseline); "
              f"allow a larger --tolerance, prune less per round (-m) or fine-tune longer",
              file=sys.stderr, flush=True)
    return 0


def final_finetune(model, record, info: CheckpointInfo, runner, args: argparse.Namespace,
                   label: str):
    """Fine-tune `model` in place for --final-epochs; returns its record and checkpoint info
    with the accuracy after, the accuracy before kept as accuracy_before_final."""
    from dataclasses import replace as replace_record

    lr = args.final_lr if args.final_lr is not None else args.finetune_lr
    runner.fit(model, args.final_epochs, lr, label=f"final fine-tune {label}")
    accuracy = runner.evaluate(model)
    print(f"final fine-tune of {label}: {args.final_epochs} epoch(s)"
          f"{' distilled from the unpruned model' if args.distill else ''}: "
          f"{record.accuracy:.2f}% -> {accuracy:.2f}% top-1", flush=True)
    info.metrics.update(accuracy=accuracy, accuracy_before_final=record.accuracy)
    info.extra.update(final_epochs=args.final_epochs, final_distill=bool(args.distill))
    return replace_record(record, accuracy=accuracy), info


def _versus_baseline(reduction: float) -> str:
    """'12.3% below' or, for the unpruned model with BAM, '0.9% above'."""
    return f"{reduction:.1f}% below" if reduction >= 0 else f"{-reduction:.1f}% above"


def report_latency(prepared, model, final, rows, final_round: int, prep_cfg: PrepareConfig,
                   args: argparse.Namespace, final_path: str, reference: float) -> None:
    """Measure the baseline (step 1's model) and the final model on the training device; add
    the final model's latency_* columns to its rounds.parquet row and its checkpoint."""
    from ccpcsa.checkpoint import load_checkpoint
    from ccpcsa.latency import measure_latency

    device = pick_device(args.device)
    baseline = load_checkpoint(prepared.baseline_checkpoint, user_model=prep_cfg.model)
    base = measure_latency(baseline, prep_cfg.input_shape, device, args.latency_batch)
    ours = measure_latency(model, prep_cfg.input_shape, device, args.latency_batch)
    for row in rows:  # every row gets the columns (Parquet's schema), the final one values
        row.update(ours.columns() if row["round"] == final_round else
                   dict.fromkeys(ours.columns()))
    write_rows(rows, storage.join(args.out, "rounds.parquet"))
    info = checkpoint_info(prep_cfg, True, final, reference)
    info.metrics.update({k: v for k, v in ours.columns().items() if k != "latency_device"})
    info.extra["latency_device"] = ours.device
    info.extra["baseline_latency"] = base.columns()
    save_checkpoint(model, info, final_path)
    fewer = prepared.baseline_flops / final.flops
    one, many = base.batch1_ms / ours.batch1_ms, base.batch_ms / ours.batch_ms
    print(f"latency on {ours.device} (baseline without BAM -> final model): "
          f"{base.batch1_ms:.2f} -> {ours.batch1_ms:.2f} ms at batch 1 ({one:.2f}x faster), "
          f"{base.batch_ms:.2f} -> {ours.batch_ms:.2f} ms at batch {ours.batch} ({many:.2f}x); "
          f"FLOPs {fewer:.2f}x fewer; measured speed-up / FLOPs reduction = "
          f"{one / fewer:.2f} (batch 1), {many / fewer:.2f} (batch {ours.batch})", flush=True)


def write_stripped(model, runner, prep_cfg: PrepareConfig, loop_cfg: LoopConfig, out: str
                   ) -> None:
    from ccpcsa.attention import strip_bam
    from ccpcsa.flops import count_flops, count_params
    from ccpcsa.loop import RoundRecord

    model = runner.fit(strip_bam(model), loop_cfg.finetune_epochs, loop_cfg.finetune_lr,
                       label="without BAM")
    record = RoundRecord(-1, runner.evaluate(model), count_flops(model, prep_cfg.input_shape),
                         count_params(model), 0, True, {})
    path = storage.join(out, "final_nobam.pt")
    save_checkpoint(model, checkpoint_info(prep_cfg, False, record, 0.0), path)
    print(f"without BAM: {record.accuracy:.2f}% top-1 -> {path}", flush=True)


def checkpoint_info(prep_cfg: PrepareConfig, with_bam: bool, record, reference: float
                    ) -> CheckpointInfo:
    return CheckpointInfo(
        prep_cfg.model, prep_cfg.num_classes, with_bam, prep_cfg.input_shape, prep_cfg.dataset,
        {"accuracy": record.accuracy, "flops": record.flops, "params": record.params},
        {"round": record.round, "reference_accuracy": reference, "widths": record.widths})


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not verbose:
        logging.getLogger("ccpcsa.loop").setLevel(logging.INFO)


# subcommands whose own command line lives elsewhere: `ccpcsa search ...` is
# `python search/run.py ...`, and so on; module -> whether it takes the subcommand's name too
DELEGATED = {
    "search": ("ccpcsa.search.run", False, "the Ray Tune + Optuna search for the Pareto frontier "
               "of accuracy against FLOPs (as `python search/run.py`)"),
    "report": ("ccpcsa.search.report", False, "print a search's frontier table again, or follow "
               "a running search (as `python search/report.py`)"),
    "to-parquet": ("ccpcsa.data.cli", True, "convert an ImageFolder split to Parquet shards "
                   "for Ray Data (as `python -m ccpcsa.data to-parquet`)"),
    "imagenet-folders": ("ccpcsa.data.cli", True, "unpack the official ImageNet archives into "
                         "class folders (as `python -m ccpcsa.data imagenet-folders`)"),
}


def run_delegated(argv: list[str]) -> int:
    import importlib

    module, keep_name, _ = DELEGATED[argv[0]]
    return int(importlib.import_module(module).main(argv if keep_name else argv[1:]) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return run_delegated(argv)
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "verbose", False))  # export has no --verbose
    with exits.terminate_as_interrupt():
        try:
            if args.command == "export":
                return run_export(args)
            return run_prune(args)
        except KeyboardInterrupt as exc:
            if args.command == "prune":
                print(f"error: interrupted; the rounds finished so far are in {args.out} "
                      "(rounds.parquet, checkpoints/)", file=sys.stderr)
            else:
                print("error: interrupted", file=sys.stderr)
            return exits.interrupted_code(exc)
        except FloatingPointError as exc:
            print(f"error: training diverged ({exits.one_line(exc)}); lower --lr or "
                  "--finetune-lr", file=sys.stderr)
            return exits.FAILED
        except (UsageError, DataError, CheckpointError, RunInUseError, ValueError) as exc:
            print(f"error: {exits.one_line(exc)}", file=sys.stderr)
            return exits.REFUSED
        except OSError as exc:
            print(f"error: {exits.one_line(exc)}", file=sys.stderr)
            return exits.FAILED
        except Exception as exc:
            if not type(exc).__module__.startswith("ray."):
                raise  # a bug: the traceback says where
            print(f"error: {type(exc).__name__}: {exits.one_line(exc)}", file=sys.stderr)
            return exits.FAILED


if __name__ == "__main__":
    sys.exit(main())
