"""`python -m ccpcsa prune`: prune one model with one schedule (no search)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, replace
from typing import Any

from ccpcsa import storage, validation
from ccpcsa.checkpoint import CheckpointInfo, save_checkpoint
from ccpcsa.command import (
    OneLineParser,
    add_config_flag,
    add_settings,
    refusing,
    run_guarded,
    settings_of,
)
from ccpcsa.data import check_dataset
from ccpcsa.export import add_export_parser, run_export
from ccpcsa.loop import LoopConfig, PrepareConfig, prepare, prune_loop, record_of
from ccpcsa.models import get_spec
from ccpcsa.prunable import check_before_training
from ccpcsa.prune import PruneLimits
from ccpcsa.results import record_row, table_header, table_line, write_config, write_rows
from ccpcsa.runlock import RunLock
from ccpcsa.runners import make_runner
from ccpcsa.settings import FINAL, LOOP, MODEL, PRUNE, RESOURCES, RESULTS, STAGE0, PruneConfig
from ccpcsa.train import pick_device

log = logging.getLogger("ccpcsa")


class UsageError(validation.SettingError):
    pass


PRUNE_GROUPS = (MODEL, PRUNE, LOOP, STAGE0, FINAL, RESOURCES, RESULTS)
# what one prune run writes
RESULT_FILES = ("rounds.parquet", "final.pt", "final_nobam.pt", "target.pt")


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
    add_config_flag(p)
    add_settings(p, PruneConfig, PRUNE_GROUPS)
    p.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    add_export_parser(sub)
    for name, (_, _, text) in DELEGATED.items():  # listed here, run by run_delegated
        sub.add_parser(name, help=text, add_help=False)
    return parser


def configs_from_args(cfg: PruneConfig) -> dict[str, Any]:
    """What the settings need beyond their own checks: a device that exists, the data, a
    model outside the registry that prunes consistently; SettingError naming the bad value."""
    pick_device(cfg.device)
    train_cfg = cfg.train_config(device=cfg.device)
    train_cfg.validate()
    data_cfg = cfg.data_config()
    info = check_dataset(data_cfg)
    prep_cfg = cfg.prepare_config(info, sync_bn=cfg.sync_bn)
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


def plan_target(cfg: PruneConfig, prep_cfg: PrepareConfig, limits: PruneLimits
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
        check_target(cfg.target_flops, "--target-flops")
    except TargetError as exc:
        raise UsageError(str(exc)) from None
    name, classes, shape = prep_cfg.model, prep_cfg.num_classes, prep_cfg.input_shape
    round_to = cfg.round_to or 1
    flops, _removed, total = flops_at_caps(name, classes, shape, limits, round_to)
    baseline = unpruned_flops(name, classes, shape)
    if flops > cfg.target_flops * baseline:
        raise UsageError(f"--target-flops {cfg.target_flops} cannot be reached: pruned as far "
                         f"as the caps allow, {name} keeps {flops / baseline:.3f} of its FLOPs; "
                         "raise --max-ratio / --stage-cap / --residual-cap or the fraction")
    plan = ratio_for_target(name, classes, shape, cfg.target_flops, cfg.min_channels,
                            round_to, max_ratio=max(limits.max_ratio, 0.05))
    m = cfg.groups_per_round or per_round_for(plan, cfg.max_rounds)
    caps = [limits.max_ratio, *limits.stage_caps.values(), *limits.layer_caps.values(),
            *([] if limits.residual_cap is None else [limits.residual_cap])]
    rounds = max(cfg.max_rounds, rounds_to_reach(total, max(caps), m))
    print(f"target: {cfg.target_flops:g} of the baseline's FLOPs; m = {m} channels per "
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


def run_prune(cfg: PruneConfig) -> int:
    with refusing():  # everything checked before stage 0 trains
        configs = configs_from_args(cfg)
        limits = cfg.limits()
        spec = get_spec(cfg.model, configs["prepare"].input_shape)
        unknown = sorted(set(limits.stage_caps) - set(spec.stages))
        if unknown:
            raise UsageError(f"--stage-cap names unknown stage(s) {', '.join(unknown)} of "
                             f"{cfg.model}; stages: {', '.join(spec.stages)}")
        check_layer_caps(limits.layer_caps, configs["prepare"])
        groups_per_round = 8 if cfg.groups_per_round is None else cfg.groups_per_round
        max_rounds = cfg.max_rounds
        if cfg.target_flops is not None:
            groups_per_round, max_rounds = plan_target(cfg, configs["prepare"], limits)
        loop_cfg = cfg.loop_config(groups_per_round, max_rounds, limits)
        try:
            storage.check_writable(cfg.out)
        except OSError as exc:
            raise UsageError(str(exc)) from None
    with RunLock(cfg.out, "python -m ccpcsa prune"):
        prepare_out_folder(cfg.out, cfg.overwrite)
        return _prune_locked(cfg, configs, loop_cfg)


def _prune_locked(cfg: PruneConfig, configs: dict[str, Any], loop_cfg: LoopConfig
                  ) -> int:
    prep_cfg = configs["prepare"]
    write_config(storage.join(cfg.out, "config.json"),
                 {"command": "prune", **cfg.to_dict(), "loop": asdict(loop_cfg)}, cfg.seed)

    with refusing():  # Ray Train workers the cluster cannot hold are refused here
        runner = make_runner(configs["data"], configs["train"], cfg.workers,
                             storage.join(cfg.out, "ray"), gpus_per_worker=cfg.gpus_per_worker,
                             cpus_per_worker=cfg.cpus_per_worker, sync_bn=cfg.sync_bn)
    prepared = prepare(prep_cfg, runner, storage.join(cfg.out, "prepared"))
    if cfg.target_flops is not None:
        loop_cfg = replace(loop_cfg,
                           target_flops=int(cfg.target_flops * prepared.baseline_flops))
    reference = prepared.reference_accuracy(loop_cfg.reference)
    teacher_cfg = replace(configs["train"], teacher=prepared.baseline_checkpoint,
                          teacher_model=cfg.model)
    if cfg.distill_rounds:  # the teacher exists only now: the rounds get their own runner
        runner.close()
        runner = make_runner(configs["data"], teacher_cfg, cfg.workers,
                             storage.join(cfg.out, "ray"), gpus_per_worker=cfg.gpus_per_worker,
                             cpus_per_worker=cfg.cpus_per_worker, sync_bn=cfg.sync_bn)
    rows: list[dict[str, Any]] = []
    print(f"baseline {prepared.baseline_accuracy:.2f}%  with BAM "
          f"{prepared.attention_accuracy:.2f}%  reference ({loop_cfg.reference}) "
          f"{reference:.2f}%  tolerance {loop_cfg.tolerance} points", flush=True)
    print(table_header(), flush=True)

    def on_round(record, model) -> None:
        path = storage.join(cfg.out, "checkpoints", f"round_{record.round:03d}.pt")
        save_checkpoint(model, checkpoint_info(prep_cfg, True, record, reference), path)
        rows.append(record_row(record, prepared.baseline_flops, prepared.baseline_params, path))
        write_rows(rows, storage.join(cfg.out, "rounds.parquet"))
        print(table_line(rows[-1], reference), flush=True)

    result = prune_loop(prepared.load_attention_model(cfg.model), cfg.model, prep_cfg.input_shape,
                        reference, runner, loop_cfg, on_round,
                        initial_accuracy=prepared.attention_accuracy)
    final = record_of(result, result.final_round)
    final_path = storage.join(cfg.out, "final.pt")
    info = checkpoint_info(prep_cfg, True, final, reference)
    if cfg.final_epochs:
        if cfg.distill != cfg.distill_rounds:
            runner.close()
            runner = make_runner(configs["data"],
                                 teacher_cfg if cfg.distill else configs["train"],
                                 cfg.workers, storage.join(cfg.out, "ray"),
                                 gpus_per_worker=cfg.gpus_per_worker,
                                 cpus_per_worker=cfg.cpus_per_worker, sync_bn=cfg.sync_bn)
        final, info = final_finetune(result.model, final, info, runner, cfg, "final")
        deepest = result.records[-1]
        if cfg.target_flops is not None and deepest.round != result.final_round:
            from ccpcsa.checkpoint import load_checkpoint

            model = load_checkpoint(storage.join(cfg.out, "checkpoints",
                                                 f"round_{deepest.round:03d}.pt"),
                                    user_model=cfg.model).train()
            record, target_info = final_finetune(
                model, deepest, checkpoint_info(prep_cfg, True, deepest, reference), runner,
                cfg, f"round {deepest.round} (target)")
            save_checkpoint(model, target_info, storage.join(cfg.out, "target.pt"))
    save_checkpoint(result.model, info, final_path)
    row = rows[result.final_round]
    print(f"stopped: {result.stop_reason}; final model = round {result.final_round}: "
          f"{final.accuracy:.2f}% top-1, FLOPs {_versus_baseline(row['flops_reduction'])} and "
          f"params {_versus_baseline(row['params_reduction'])} the baseline -> {final_path}"
          f"{'' if final.within_tolerance else ' (over tolerance: no round stayed within it)'}",
          flush=True)
    if cfg.latency_batch:
        report_latency(prepared, result.model, final, rows, result.final_round, prep_cfg,
                       cfg, final_path, reference)
    if cfg.strip_bam:
        write_stripped(result.model, runner, prep_cfg, loop_cfg, cfg.out)
    runner.close()  # Ray Train workers, if any (also closed at exit after an error)
    if result.final_round == 0:  # the last line, so that a script's log shows it
        print(f"warning: nothing was pruned: no pruned round stayed within the tolerance, so "
              f"{final_path} is the unpruned model with BAM (more FLOPs than the baseline); "
              f"allow a larger --tolerance, prune less per round (-m) or fine-tune longer",
              file=sys.stderr, flush=True)
    return 0


def final_finetune(model, record, info: CheckpointInfo, runner, cfg: PruneConfig,
                   label: str):
    """Fine-tune `model` in place for --final-epochs; returns its record and checkpoint info
    with the accuracy after, the accuracy before kept as accuracy_before_final."""
    from dataclasses import replace as replace_record

    lr = cfg.final_lr if cfg.final_lr is not None else cfg.finetune_lr
    runner.fit(model, cfg.final_epochs, lr, label=f"final fine-tune {label}")
    accuracy = runner.evaluate(model)
    print(f"final fine-tune of {label}: {cfg.final_epochs} epoch(s)"
          f"{' distilled from the unpruned model' if cfg.distill else ''}: "
          f"{record.accuracy:.2f}% -> {accuracy:.2f}% top-1", flush=True)
    info.metrics.update(accuracy=accuracy, accuracy_before_final=record.accuracy)
    info.extra.update(final_epochs=cfg.final_epochs, final_distill=bool(cfg.distill))
    return replace_record(record, accuracy=accuracy), info


def _versus_baseline(reduction: float) -> str:
    """'12.3% below' or, for the unpruned model with BAM, '0.9% above'."""
    return f"{reduction:.1f}% below" if reduction >= 0 else f"{-reduction:.1f}% above"


def report_latency(prepared, model, final, rows, final_round: int, prep_cfg: PrepareConfig,
                   cfg: PruneConfig, final_path: str, reference: float) -> None:
    """Measure the baseline (step 1's model) and the final model on the training device; add
    the final model's latency_* columns to its rounds.parquet row and its checkpoint."""
    from ccpcsa.checkpoint import load_checkpoint
    from ccpcsa.latency import measure_latency

    device = pick_device(cfg.device)
    baseline = load_checkpoint(prepared.baseline_checkpoint, user_model=prep_cfg.model)
    base = measure_latency(baseline, prep_cfg.input_shape, device, cfg.latency_batch)
    ours = measure_latency(model, prep_cfg.input_shape, device, cfg.latency_batch)
    for row in rows:  # every row gets the columns (Parquet's schema), the final one values
        row.update(ours.columns() if row["round"] == final_round else
                   dict.fromkeys(ours.columns()))
    write_rows(rows, storage.join(cfg.out, "rounds.parquet"))
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
    out = {"dir": None}

    def command(_termination) -> int:
        if args.command == "export":
            return run_export(args)
        cfg, _ = settings_of(args, PruneConfig)
        out["dir"] = cfg.out
        return run_prune(cfg)

    def interrupted(_exc: BaseException) -> str:
        if out["dir"] is None:
            return "interrupted"
        return (f"interrupted; the rounds finished so far are in {out['dir']} "
                "(rounds.parquet, checkpoints/)")

    return run_guarded(command, interrupted)


if __name__ == "__main__":
    sys.exit(main())
