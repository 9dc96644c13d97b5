"""The pruning-schedule search: Ray Tune + Optuna (multi-objective) over CCPCSA schedules.

    python search/run.py [flags]                              # local Ray, embedded data
    ray job submit --working-dir . -- python search/run.py ... # on a running cluster

Stage 0 (baseline and BAM training) runs once and is cached under <storage>/<name>/stage0;
every trial then runs the CCPCSA loop with its own m and ratio caps; every round of every
trial is a candidate point, and the accuracy-FLOPs Pareto frontier of all of them is written
to <storage>/<name>/ (frontier.parquet, frontier.png, frontier/*.pt).

With --screen N --finalists K the search has two phases, each its own Tune experiment:
<name>/screen/ runs N schedules sampled by Optuna through the pruning rounds with adaptive-BN
evaluation only (no fine-tune), then <name>/finetune/ runs the K schedules nearest the
screened frontier (finalists.py, saved in <name>/finalists.json) through the full loop.
Only fine-tuned points are deployable and on the frontier.

One search per run folder at a time (a lock file); every setting is checked before Ray
starts; Ctrl-C or SIGTERM stops the trials, writes the frontier of what finished and exits
130 or 143 (exit codes: ccpcsa/exits.py); --resume goes on from the trial folders and the
Optuna study's journal in the run folder, not from Tune's saved state (ccpcsa/search/resume.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from ccpcsa import exits, storage
from ccpcsa.command import OneLineParser, add_config_flag, add_settings, run_guarded, settings_of
from ccpcsa.data import check_dataset
from ccpcsa.loop import PrepareConfig, Prepared
from ccpcsa.results import versions
from ccpcsa.runlock import RunLock
from ccpcsa.search.config import ConfigError, SearchConfig, config_from_dict
from ccpcsa.settings import SettingError

log = logging.getLogger("ccpcsa.search")
CONFIG_FILE = "search_config.json"


SEARCH_GROUPS = ("model and data", "search", "resources", "results", "final fine-tune",
                 "stage 0: training before pruning (steps 1-2)", "the pruning loop")


def build_parser() -> argparse.ArgumentParser:
    """The flags, one per setting of SearchConfig (ccpcsa.settings declares them)."""
    parser = OneLineParser(
        prog="search/run.py",
        description="Search CCPCSA pruning schedules (m and per-stage or per-layer ratio caps) "
                    "with Ray Tune + Optuna, maximising top-1 accuracy and minimising FLOPs "
                    "(multiply-accumulates); writes the Pareto frontier with its checkpoints "
                    "to <storage>/<name>/. Flags override --config; unset flags keep defaults.")
    add_config_flag(parser)
    add_settings(parser, SearchConfig, SEARCH_GROUPS)
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the configuration, print it, and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


# what --resume may change: where the run is, how failed trials are treated, and settings
# that change no result (each one is read again by the resumed session)
# how the run is carried out, not what it computes: a resume after a lost node or head may
# need more patience or retries
RESUME_MAY_CHANGE = ("resume", "retry_failed", "storage", "name", "latency_batch",
                     "loader_workers", "max_failures", "wait_for_resources")


def config_from_argv(argv: list[str] | None) -> tuple[SearchConfig, argparse.Namespace]:
    """The configuration, and the parsed flags with `given`: the settings the user gave
    (flags or --config YAML), which --resume compares with the saved ones."""
    args = build_parser().parse_args(argv)
    try:
        cfg, args.given = settings_of(args, SearchConfig)
    except SettingError as exc:
        raise ConfigError(str(exc)) from None
    return cfg, args


def run_dir_of(cfg: SearchConfig) -> str:
    return storage.join(cfg.storage, cfg.name)


def resolve_storage(cfg: SearchConfig) -> SearchConfig:
    if storage.is_uri(cfg.storage):
        return cfg
    if "/runtime_resources/" in os.getcwd() and not os.path.isabs(cfg.storage):
        # Inside `ray job submit --working-dir`, a relative path would land in a temporary copy.
        cfg.storage = os.path.expanduser(os.path.join("~", "ccpcsa-runs"))
        log.warning("relative --storage inside a Ray job: writing to %s instead", cfg.storage)
    cfg.storage = os.path.abspath(cfg.storage)
    return cfg


def check_run_folder(cfg: SearchConfig, given: frozenset[str] = frozenset()) -> SearchConfig:
    """New run: refuse to overwrite. --resume: the configuration saved with the run, checked
    by the same validation as flags and YAML; ConfigError listing the `given` settings that
    differ from the saved ones, except RESUME_MAY_CHANGE. Call it holding the run's lock."""
    run_dir = run_dir_of(cfg)
    saved = storage.join(run_dir, CONFIG_FILE)
    if cfg.resume:
        # The configuration is saved before stage 0; Tune's state only once the trials start.
        # A search interrupted in between resumes too: stage 0 from its cache, then the trials.
        if not storage.exists(saved):
            raise ConfigError(f"nothing to resume at {run_dir!r}: no search there")
        stored = read_saved_config(saved)
        check_unchanged(cfg, config_from_dict(stored, source=saved), given, saved)
        stored.update({k: getattr(cfg, k) for k in given if k in RESUME_MAY_CHANGE},
                      resume=True, retry_failed=cfg.retry_failed, storage=cfg.storage,
                      name=cfg.name)
        return config_from_dict(stored, source=saved)
    if storage.exists(saved):
        raise ConfigError(f"{run_dir!r} already holds a search; pass --resume to continue it "
                          f"or choose another --name")
    return cfg


def check_unchanged(cfg: SearchConfig, saved_cfg: SearchConfig, given: frozenset[str],
                    source: str) -> None:
    """ConfigError listing every given setting that --resume may not change and that differs
    from the run's saved configuration."""
    differ = [f"{key.replace('_', '-')} {_value(cfg, key)} (saved: {_value(saved_cfg, key)})"
              for key in sorted(given - set(RESUME_MAY_CHANGE))
              if _value(cfg, key) != _value(saved_cfg, key)]
    if differ:
        may = ", ".join(f"--{k.replace('_', '-')}" for k in RESUME_MAY_CHANGE[1:])
        raise ConfigError(f"--resume continues the search with its saved settings "
                          f"({source}), but these differ: {'; '.join(differ)}; drop them, or "
                          f"start a new search under another --name (resume may change only "
                          f"{may})")


def _value(cfg: SearchConfig, key: str) -> Any:
    value = getattr(cfg, key)
    if key == "weights" and value and not storage.is_uri(value) and os.path.exists(value):
        return os.path.abspath(value)  # saved absolute (stage 0 runs in a worker's folder)
    return value


def read_saved_config(path: str) -> dict[str, Any]:
    try:
        body = storage.read_json(path)
    except ValueError as exc:
        raise ConfigError(f"cannot resume: {exc}; the run's saved configuration is lost "
                          "(start the search under another --name)") from None
    if not isinstance(body, dict) or not isinstance(body.get("config"), dict):
        raise ConfigError(f"cannot resume: {path} holds no 'config' mapping")
    return dict(body["config"])


def connect_ray(cfg: SearchConfig):
    """The running cluster (RAY_ADDRESS, as under `ray job submit`) or a local instance on
    127.0.0.1; checks that one trial fits a node type the cluster can ever have, asks the
    autoscaler for it and waits (--wait-for-resources); on a cluster without an autoscaler,
    caps the concurrent trials at what its nodes hold."""
    from ccpcsa.distributed import (
        DistributedError,
        capacity,
        check_cluster,
        connect_ray,
        plan_of,
        started_locally,
    )

    try:
        cfg.gpus_per_worker = check_cluster(
            cfg.workers_per_trial, cfg.gpus_per_worker, cfg.cpus_per_worker,
            placement=cfg.placement, decode_cpus=decode_cpus_of(cfg),
            wait_s=cfg.wait_for_resources, say=lambda line: print(line, flush=True))
    except DistributedError as exc:
        raise ConfigError(f"a trial does not fit the cluster: {exc}") from None
    ray = connect_ray()
    shape = capacity.cluster_shape(ray, local=started_locally())
    plan = plan_of(cfg.workers_per_trial, cfg.gpus_per_worker, cfg.cpus_per_worker,
                   cfg.placement, decode_cpus_of(cfg))
    most = capacity.concurrent_cap(plan, shape, cfg.max_concurrent_trials)
    if most < cfg.max_concurrent_trials:
        log.warning("the Ray cluster holds %d trial(s) of %s at once (no autoscaler): running "
                    "%d at a time instead of %d", most, plan.describe(), most,
                    cfg.max_concurrent_trials)
        cfg.max_concurrent_trials = most
    resources = ray.cluster_resources()
    log.info("Ray cluster: %g CPUs, %g GPUs; %s", resources.get("CPU", 0.0),
             resources.get("GPU", 0.0), shape.source)
    return ray


def decode_cpus_of(cfg: SearchConfig) -> float:
    """CPUs a trial's Ray Data decode tasks need beside its workers (Parquet only)."""
    from ccpcsa.distributed.ingest import DECODE_CPUS

    return DECODE_CPUS if cfg.dataset == "parquet" and cfg.workers_per_trial > 1 else 0.0


def run_stage0(ray, cfg: SearchConfig, prep_cfg: PrepareConfig, run_dir: str) -> Prepared:
    """Algorithm 1 steps 1-2 as a Ray task on a worker with the trial's resources (the head
    node of a GPU cluster often has no GPU); cached, so a resumed search skips it."""
    from ccpcsa.loop import prepare
    from ccpcsa.search.trial import make_runner

    def stage0() -> Prepared:
        logging.basicConfig(level=logging.INFO)
        # stable fit folders: a driver started again resumes a fit from its last epoch
        runner = make_runner(cfg, storage.join(run_dir, "train", "stage0"), stable_fits=True)
        try:
            return prepare(prep_cfg, runner, storage.join(run_dir, "stage0"))
        finally:
            runner.close()

    if cfg.workers_per_trial > 1:  # Ray Train places its own workers
        return stage0()
    task = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker)(stage0)
    return ray.get(task.remote())


@dataclass(frozen=True)
class Phase:
    """One Tune experiment of the search: the whole one-phase search in the run folder, or
    one phase of a two-phase search in its own subfolder."""

    name: str  # ccpcsa.search.trial.PHASES
    folder: str  # the experiment folder (Tune's storage_path/name)
    num_samples: int  # trials this phase owes


def phases_of(cfg: SearchConfig) -> tuple[Phase, ...]:
    run_dir = run_dir_of(cfg)
    if not cfg.screen:
        return (Phase("full", run_dir, cfg.num_samples),)
    return (Phase("screen", storage.join(run_dir, "screen"), cfg.screen),
            Phase("finetune", storage.join(run_dir, "finetune"), cfg.finalist_count))


def make_sampler(cfg: SearchConfig, num_samples: int, seed_offset: int = 0):
    """The phase's Optuna sampler. `seed_offset`: trials the study already holds (0 for a new
    search), so that a resumed session does not draw its predecessors' random trials again."""
    import optuna

    # NSGA-II's default population (50) would leave a small search in its random first
    # generation; scale it so a search sees a few generations.
    population = max(4, min(50, num_samples // 4))
    startup = {} if cfg.startup_trials is None else {"n_startup_trials": cfg.startup_trials}
    seed = cfg.seed + seed_offset
    return {
        "nsga2": lambda: optuna.samplers.NSGAIISampler(population_size=population, seed=seed),
        # multivariate off, as measured in docs/benchmarks.md; stated so that an Optuna release
        # that changes the default for multi-objective studies does not change the search
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=False, **startup),
        # log expected hypervolume improvement on a Gaussian process per objective
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, **startup),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),  # a baseline
    }[cfg.sampler]()


def make_tuner(cfg: SearchConfig, trainable, search, num_samples: int,
               phase: Phase | None = None, param_space: dict[str, Any] | None = None,
               points: list[tuple[str, float, int]] | None = None,
               rounds: int | None = None, callbacks=None):
    """A new Tune run, in the phase's experiment folder, of `num_samples` trials drawn by
    `search` (optuna_search, given_configs). `points` (trial id, accuracy, FLOPs) already on
    disk seed the early-stopping scheduler; `rounds`: the most rounds a trial may run (default
    --max-rounds)."""
    from ray import tune

    from ccpcsa.search.early_stop import make_scheduler

    phase = phase or phases_of(cfg)[0]
    early_stop = "off" if phase.name == "screen" else cfg.early_stop
    storage_path, name = phase.folder.rstrip("/").rsplit("/", 1) if storage.is_uri(
        phase.folder) else os.path.split(phase.folder.rstrip(os.sep))
    return tune.Tuner(
        trainable,
        param_space=param_space or {},
        tune_config=tune.TuneConfig(
            search_alg=search, num_samples=num_samples,
            scheduler=make_scheduler(early_stop, phase.folder, rounds or cfg.max_rounds,
                                     points or ()),
            max_concurrent_trials=cfg.max_concurrent_trials),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_path,
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            callbacks=callbacks, verbose=1),
    )


def given_configs(configs: list[dict[str, Any]]):
    """(searcher, param_space) that run exactly `configs`, one trial each (phase 2)."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    keys = sorted({k for c in configs for k in c})
    return (BasicVariantGenerator(points_to_evaluate=[dict(c) for c in configs]),
            {k: tune.choice(sorted({c[k] for c in configs if k in c}, key=str)) for k in keys})


def optuna_search(cfg: SearchConfig, phase: Phase, space: dict[str, Any], trials: list,
                  first: list[dict[str, Any]]):
    """(OptunaSearch over the phase's journal, the journal): the study brought in line with
    the trial folders first (ccpcsa/search/searcher.py); `first`: configurations asked first."""
    from ccpcsa.search.searcher import journal_of, make_searcher, open_study, reconcile

    journal = journal_of(phase.folder)
    study = open_study(journal)
    added = reconcile(study, space, trials)
    if added:
        log.info("%s: told Optuna the results of %d finished trial(s) its journal lacked",
                 phase.name, added)
    sampler = make_sampler(cfg, phase.num_samples, seed_offset=len(study.trials))
    return make_searcher(journal, space, sampler, first), journal


def run_trial(params: dict[str, Any], settings):
    """search.trial.run_trial, keeping the cause of a failure in the trial folder even on a
    full disk (ccpcsa/search/failure.py); a trial that continues an interrupted one says so in its
    folder first (ccpcsa/search/resume.py)."""
    from ray import tune

    from ccpcsa.search import failure, trial
    from ccpcsa.search.ondisk import CONTINUES_FILE
    from ccpcsa.search.retry import params_key

    folder = trial_folder(settings, tune.get_context().get_trial_dir())
    failure.reserve(folder)
    try:
        continued = settings.continues.get(params_key(params))
        if continued:
            storage.write_json(storage.join(folder, CONTINUES_FILE), {"trial": continued})
        return trial.run_trial(params, settings)
    except Exception as exc:
        failure.record(folder, exc)
        raise


def trial_folder(settings, trial_dir: str) -> str:
    """A trial's folder in the run's storage (Tune's trial dir may be a local staging copy)."""
    phase_dir = settings.run_dir if settings.phase == "full" else storage.join(
        settings.run_dir, settings.phase)
    return storage.join(phase_dir, os.path.basename(trial_dir.rstrip("/")))


def run_search(cfg: SearchConfig, termination, given: frozenset[str] = frozenset()) -> int:
    from ccpcsa.distributed import prefer_loopback

    prefer_loopback()  # before Ray is imported
    cfg = resolve_storage(cfg)
    try:  # before the lock, which would fail on it with exit 1: a bad --storage is refused
        storage.check_writable(run_dir_of(cfg))
    except OSError as exc:
        raise ConfigError(str(exc)) from None
    with RunLock(run_dir_of(cfg), "search/run.py") as lock:
        return _run_locked(cfg, termination, given, lock)


def _run_locked(cfg: SearchConfig, termination, given: frozenset[str],
                lock: RunLock | None = None) -> int:
    cfg = check_run_folder(cfg, given)
    if cfg.weights and not storage.is_uri(cfg.weights) and os.path.exists(cfg.weights):
        cfg.weights = os.path.abspath(cfg.weights)  # stage 0 runs in a Ray worker's folder
    run_dir = run_dir_of(cfg)
    # before Ray: the data, the model and the weights
    info = check_dataset(cfg.data_config())
    input_shape = (info.channels, info.image_size, info.image_size)
    prep_cfg = cfg.prepare_config(info)
    check_model_and_weights(prep_cfg)

    from ccpcsa.search import collect
    from ccpcsa.search.space import build_space, describe_model

    ray = connect_ray(cfg)
    termination.install()  # Ray's driver took SIGTERM over: it would abort, losing the state
    if lock is not None:  # a driver on a fresh head can now tell when this one is gone
        lock.record_ray()
    if not cfg.resume:
        storage.write_json(storage.join(run_dir, CONFIG_FILE),
                           {"config": cfg.to_dict(), "versions": versions()})
    started = time.time()
    print(f"stage 0: baseline and BAM training for {cfg.model} on {cfg.dataset} "
          f"(cached in {storage.join(run_dir, 'stage0')})", flush=True)
    try:
        prepared = run_stage0(ray, cfg, prep_cfg, run_dir)
    finally:  # from here the trials' own demands drive the autoscaler
        from ccpcsa.distributed.capacity import release_request

        release_request()
    print(f"stage 0: baseline {prepared.baseline_accuracy:.2f}% top-1, "
          f"with BAM {prepared.attention_accuracy:.2f}%", flush=True)
    layout = describe_model(cfg.model, info.num_classes, input_shape)
    if cfg.target_flops is not None:
        layout = plan_target(cfg, layout, info.num_classes, input_shape)
    space = build_space(cfg, layout)
    context = PhaseContext(cfg, termination, space, layout, prepared, info.num_classes,
                           input_shape)
    print(f"search: params {', '.join(space)}; {cfg.max_concurrent_trials} trials at once",
          flush=True)
    outcomes = run_phases(context)
    trials = [t for outcome in outcomes for t in outcome.trials]
    owed = {o.phase.name: o.phase.num_samples for o in outcomes}
    interrupted = not outcomes[-1].complete or len(outcomes) < len(phases_of(cfg))
    stopped_by = next((o.stopped_by for o in outcomes if o.stopped_by), "")
    final_due = cfg.final_epochs > 0 and not interrupted and not stopped_by
    try:
        print(collect.write_results(trials, cfg, prepared, run_dir, owed,
                                    input_shape=None if interrupted or final_due
                                    else input_shape), flush=True)
        if final_due:  # the search's frontier is on disk first: a kill here loses nothing of it
            from ccpcsa.search.final import run_final_finetunes
            from ccpcsa.search.pareto import read_frontier

            finals = run_final_finetunes(ray, cfg, prepared, run_dir, read_frontier(run_dir)[0])
            print(collect.write_results(trials, cfg, prepared, run_dir, owed,
                                        input_shape=input_shape, finals=finals), flush=True)
    except OSError as exc:  # a full disk: the summary still tells what is on disk
        print("\n".join([collect.summary_counts(trials, owed),
                         *collect.trial_lines(trials)]), flush=True)
        stopped_by = stopped_by or f"the frontier could not be written: {exits.one_line(exc)}"
    resume = f"python search/run.py --storage {cfg.storage} --name {cfg.name} --resume"
    failed = sum(t.status == "failed" for t in trials)
    if stopped_by:
        print(f"error: the search stopped ({stopped_by}); what finished is in {run_dir}; "
              f"once the cause is fixed (e.g. disk space freed), continue with: {resume}"
              f"{' --retry-failed' if failed else ''}", file=sys.stderr, flush=True)
        return exits.FAILED
    if failed:
        print(f"{failed} trial(s) failed; to run them again from their last round once the "
              f"cause is fixed: {resume} --retry-failed", flush=True)
    if interrupted:
        print(f"search interrupted after {time.time() - started:.0f}s; what finished is in "
              f"{run_dir}; continue with: python search/run.py --storage {cfg.storage} "
              f"--name {cfg.name} --resume", flush=True)
        return 128 + (termination.signum or signal.SIGINT)
    print(f"done in {time.time() - started:.0f}s; results in {run_dir}", flush=True)
    return exits.OK


@dataclass
class PhaseContext:
    """What every phase of one search shares."""

    cfg: SearchConfig
    termination: Any
    space: dict[str, Any]
    layout: Any
    prepared: Prepared
    num_classes: int
    input_shape: tuple[int, int, int]


@dataclass
class PhaseOutcome:
    phase: Phase
    trials: list  # ccpcsa.search.ondisk.TrialOnDisk, this phase's folders
    complete: bool  # no trial interrupted, none still owed
    stopped_by: str = ""  # why Ray Tune's driver stopped, when it failed


def run_phases(ctx: PhaseContext) -> list[PhaseOutcome]:
    """One phase; or screening, then (once it completed) the finalists' fine-tuning. The
    finalists are chosen once and saved: a resumed search fine-tunes the same ones."""
    from ccpcsa.search.finalists import load_finalists, save_finalists, select_finalists
    from ccpcsa.search.ondisk import scan_trials

    phases = phases_of(ctx.cfg)
    if len(phases) == 1:
        return [run_phase(ctx, phases[0])]
    screen, finetune = phases
    run_dir = run_dir_of(ctx.cfg)
    finalists = load_finalists(run_dir)
    if finalists is None:
        first = run_phase(ctx, screen)
        if not first.complete:
            return [first]
        finalists = select_finalists(first.trials, ctx.cfg.finalist_count,
                                     ctx.prepared.baseline_flops)
        save_finalists(run_dir, finalists)
        print(f"screening done: {len(finalists)} finalist(s) to fine-tune, by Pareto layer of "
              "their screened points: " + ", ".join(
                  f"{f.screened_trial} (layer {f.layer})" for f in finalists), flush=True)
    else:  # screening completed in an earlier session
        first = PhaseOutcome(screen, scan_trials(screen.folder, screen.name), True)
    finetune = Phase(finetune.name, finetune.folder, len(finalists))
    return [first, run_phase(ctx, finetune, finalists)]


def run_phase(ctx: PhaseContext, phase: Phase, finalists=None) -> PhaseOutcome:
    """Run one phase's trials, or (--resume) the ones it still owes, in a new Tune run
    (ccpcsa/search/resume.py); its trials on disk."""
    from ccpcsa.search.ondisk import CAUSE_LOST, counts, remove_unstarted, scan_trials
    from ccpcsa.search.resume import plan_session

    cfg = ctx.cfg
    trials = scan_trials(phase.folder, phase.name)
    failed = sum(t.status == "failed" for t in trials)
    if cfg.retry_failed and failed:
        log.info("%s: running %d failed trial(s) again from their last checkpoint",
                 phase.name, failed)
    plan = plan_session(trials, phase.num_samples, cfg.retry_failed)
    evaluated = (f"on a fixed {cfg.screen_eval_images} test images" if cfg.screen_eval_images
                 else "on the whole test split")
    what = {"full": "trials", "screen": "screened schedules (adaptive-BN evaluation "
            f"{evaluated}, no fine-tune)", "finetune": "finalists fine-tuned"}[phase.name]
    print(f"{phase.name}: {phase.num_samples} {what}", flush=True)
    stopped_by = ""
    if plan.num_samples > 0:
        stopped_by = _run_session(ctx, phase, plan, trials, finalists)
    trials = scan_trials(phase.folder, phase.name)
    if stopped_by:  # a trial whose error.txt the same fault cut short: say what stopped Tune
        for trial in trials:
            if trial.error == CAUSE_LOST:
                trial.error = f"{CAUSE_LOST}; at the same time {stopped_by}"
    found = counts(trials, phase.num_samples)
    complete = not (found["interrupted"] or found["not started"] or stopped_by)
    if complete:  # created but never started: the trial it owed ran under another id
        trials = remove_unstarted(trials)
    return PhaseOutcome(phase, trials, complete, stopped_by)


def _run_session(ctx: PhaseContext, phase: Phase, plan, trials: list, finalists) -> str:
    """One Tune run of the trials `plan` says this session owes; why Tune's driver stopped,
    or ""."""
    from ray import tune

    from ccpcsa.search.finalists import SCREENED_TRIAL, finalist_config
    from ccpcsa.search.space import search_rounds
    from ccpcsa.search.trial import TrialSettings, driver_nodes, trial_resources
    from ccpcsa.search.watch import FrontierWriter

    cfg = ctx.cfg
    journal = None
    if finalists is not None:  # each finalist once; interrupted and retried ones run again
        started = {t.params.get(SCREENED_TRIAL) for t in trials if t.status != "not started"}
        configs = [finalist_config(f) for f in finalists if f.screened_trial not in started]
        configs += plan.again.configs
        search, param_space = given_configs(configs)
        num_samples = len(configs)
    else:
        search, journal = optuna_search(cfg, phase, ctx.space, trials, plan.again.configs)
        param_space, num_samples = {}, plan.num_samples
    if not num_samples:
        return ""
    settings = TrialSettings(cfg, ctx.layout, ctx.prepared, ctx.num_classes, ctx.input_shape,
                             run_dir_of(cfg), phase=phase.name,
                             start_from=plan.again.start_from, continues=plan.again.continues)
    trainable = tune.with_resources(tune.with_parameters(run_trial, settings=settings),
                                    trial_resources(cfg, driver_nodes()))
    points = [(t.trial_id, p["accuracy"], p["flops"]) for t in trials for p in t.rounds.values()]
    so_far = [(p.folder, p.name) for p in phases_of(cfg)]
    so_far = so_far[:[f for f, _ in so_far].index(phase.folder) + 1]
    callbacks = [FrontierWriter(cfg, ctx.prepared, run_dir_of(cfg), so_far)]
    if journal is not None and journal.remote:
        from ccpcsa.search.searcher import JournalSync

        callbacks.append(JournalSync(journal))
    tuner = make_tuner(cfg, trainable, search, num_samples, phase, param_space, points,
                       search_rounds(cfg, ctx.layout), callbacks)
    ctx.termination.forward_to_sigint = True  # SIGTERM: Tune stops its trials
    try:
        tuner.fit()
    except Exception as exc:  # Tune's driver failed (a full disk): keep what is on disk
        stopped_by = f"Ray Tune failed: {_cause(exc)}"
        from ccpcsa.search.failure import full_disk

        disk = full_disk(phase.folder)  # behind e.g. a pickle that Tune wrote cut short
        if disk and "No space left on device" not in stopped_by:
            stopped_by += f"; {disk}"
        log.error("%s: %s", phase.name, stopped_by)
        return stopped_by
    finally:
        ctx.termination.forward_to_sigint = False
        if journal is not None:
            journal.sync()
    return ""


def _cause(exc: BaseException) -> str:
    """One line for an error raised inside Ray Tune: the first OSError in its chain (a full
    disk behind Tune's own EOFError reading the error file it could not write), else it."""
    chain, seen = exc, set()
    while chain is not None and id(chain) not in seen:
        if isinstance(chain, OSError):
            return f"{type(chain).__name__}: {exits.one_line(chain)}"
        seen.add(id(chain))
        chain = chain.__cause__ or chain.__context__
    return f"{type(exc).__name__}: {exits.one_line(exc)}"


def plan_target(cfg: SearchConfig, layout, num_classes: int,
                input_shape: tuple[int, int, int]):
    """The layout with what --target-flops takes (ccpcsa/search/space.py); ConfigError when the
    caps cannot reach it."""
    from ccpcsa.depth import TargetError, ratio_for_target
    from ccpcsa.search.space import m_bounds, search_rounds, with_target

    try:
        plan = ratio_for_target(cfg.model, num_classes, input_shape, cfg.target_flops,
                                cfg.min_channels, cfg.round_to or 1, max_ratio=cfg.cap_range[1])
    except TargetError as exc:
        raise ConfigError(f"{exc} (--cap-range high)") from None
    layout = with_target(layout, plan)
    low, high = m_bounds(cfg, layout)
    print(f"target: {cfg.target_flops:g} of the baseline's FLOPs ({plan.target_flops:,}); "
          f"caps from {plan.ratio:.3f} (every group at that ratio keeps "
          f"{plan.flops_at_ratio / plan.baseline_flops:.3f}), m in [{low}, {high}], up to "
          f"{search_rounds(cfg, layout)} rounds per trial", flush=True)
    return layout


def check_model_and_weights(prep_cfg: PrepareConfig) -> None:
    """On the driver, before Ray starts: a model outside the registry prunes consistently and
    the weights exist and fit it; else ConfigError, one line."""
    from ccpcsa.prunable import check_before_training

    try:
        check_before_training(prep_cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    def search(termination) -> int:
        cfg, args = config_from_argv(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        if args.dry_run:  # every setting checked; storage and data are not touched
            print(json.dumps(cfg.to_dict(), indent=2))
            return exits.OK
        return run_search(cfg, termination, args.given)

    def interrupted(exc: BaseException) -> str:
        return (f"interrupted by {signal.Signals(exits.interrupted_code(exc) - 128).name}; "
                "what had finished is kept; continue with --resume")

    return run_guarded(search, interrupted)


if __name__ == "__main__":
    sys.exit(main())
