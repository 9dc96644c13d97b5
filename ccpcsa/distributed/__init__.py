"""Ray Train: the loop's training, evaluation, channel scoring and BatchNorm re-estimation,
data-parallel over N workers of one worker group that lives as long as the runner.

RayRunner starts a TorchTrainer at its first call and keeps its workers (.worker) running
until close(): every fit, evaluate, score and recalibrate_bn is a command they execute on a
model they keep, so a trial's rounds pay Ray Train's start-up once, not once per round. The
model travels through the object store as a checkpoint payload (architecture name + state
dict, no pickled module), only when it changed (after surgery); fits and re-estimations send
rank 0's weights back the same way. A coordinator actor hands out commands and models and
outlives the workers, so a worker that dies mid-epoch is replaced (FailureConfig) and its
group resumes the command in flight from the last epoch checkpoint.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ccpcsa import storage
from ccpcsa.checkpoint import CheckpointInfo, to_payload
from ccpcsa.data import (
    DataConfig,
    ShardIndex,
    check_parquet_splits,
    dataset_info,
    parquet_split_dir,
    shard_index,
    warn_if_class_sorted,
)
from ccpcsa.distributed import capacity, loopback
from ccpcsa.distributed.capacity import PLACEMENTS, TrialPlan
from ccpcsa.distributed.ingest import DECODE_CPUS
from ccpcsa.distributed.worker import Command, GroupSetup, worker_loop
from ccpcsa.prune import ChannelGroup
from ccpcsa.train import TrainConfig

log = logging.getLogger("ccpcsa.distributed")

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-machine mode
STOP_TIMEOUT_S = 120.0  # close(): how long the group may take to wind down


class DistributedError(ValueError):
    pass


@dataclass(frozen=True)
class CommandTiming:
    """One command as the driver saw it: wall seconds vs the seconds the workers spent in it;
    the difference is what Ray costs (dispatch, moving the model, waiting)."""

    op: str
    label: str
    wall_s: float
    worker_s: float


class RayRunner:
    """The loop's backend on one group of N Ray Train workers (see train.LocalRunner for one
    process): started at the first call, kept until close() (or the interpreter's exit)."""

    def __init__(self, data: DataConfig, train: TrainConfig, num_workers: int,
                 storage_path: str, *, gpus_per_worker: float | None = None,
                 cpus_per_worker: float = 1.0, sync_bn: bool = False, max_failures: int = 2,
                 placement: str = "STRICT_PACK", stable_fits: bool = False) -> None:
        """placement: how the worker group is placed (PLACEMENTS; STRICT_PACK = one node).
        stable_fits: every fit keeps its epoch checkpoints under <storage_path>/fits/<label>
        (labels unique per runner, as in stage 0), so a runner started again after the
        driver was lost resumes a fit from its last epoch instead of epoch 0."""
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise DistributedError(f"workers must be an integer >= 1, got {num_workers!r}")
        if train.batch_size % num_workers or train.batch_size // num_workers < 2:
            raise DistributedError(
                f"batch size {train.batch_size} must split into {num_workers} equal per-worker "
                "batches of at least 2")
        if not cpus_per_worker > 0:
            raise DistributedError(f"cpus per worker must be > 0, got {cpus_per_worker}")
        if max_failures < 0:
            raise DistributedError(f"max failures must be >= 0, got {max_failures}")
        if placement not in PLACEMENTS:
            raise DistributedError(f"placement must be one of {', '.join(PLACEMENTS)}, got "
                                   f"{placement!r}")
        self.data, self.train_cfg, self.num_workers = data, train, num_workers
        self.cpus_per_worker, self.sync_bn, self.max_failures = (
            cpus_per_worker, sync_bn, max_failures)
        self.placement, self.stable_fits = placement, stable_fits
        self.storage_path = storage_path if storage.is_uri(storage_path) else os.path.abspath(
            storage_path)
        storage.check_writable(self.storage_path)
        info = dataset_info(data)  # a bad dataset fails here, before any worker starts
        self.input_shape = (info.channels, info.image_size, info.image_size)
        self.gpus_per_worker = check_cluster(
            num_workers, gpus_per_worker, cpus_per_worker, placement=placement,
            decode_cpus=DECODE_CPUS if data.name == "parquet" else 0.0)
        self._parquet = _parquet_indexes(data, num_workers, cpus_per_worker)
        self._group: _WorkerGroup | None = None
        self._held: tuple[int, tuple] | None = None  # (version, fingerprint) the workers hold
        self._evaluated: tuple[tuple, float] | None = None
        self.last_metrics: dict[str, Any] = {}  # the latest fit's, as its workers measured
        self.timings: list[CommandTiming] = []

    @property
    def uses_cuda(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def group_starts(self) -> int:
        """How many times a worker group started (1 + restarts after failures; 0 before the
        first call)."""
        return 0 if self._group is None else self._group.starts()

    def fit(self, model: nn.Module, epochs: int, lr: float, label: str = "train") -> nn.Module:
        """Train `model` in place on the workers, then evaluate it there (the accuracy is
        kept for evaluate(), which the loop calls next)."""
        if epochs <= 0:
            return model
        start = time.perf_counter()
        log.info("%s: %d epoch(s) on %d Ray Train worker(s)%s", label, epochs,
                 self.num_workers, " with GPUs" if self.uses_cuda else "")
        result = self._call(model, Command(0, "fit", epochs=epochs, lr=lr, label=label))
        self._adopt(model, result)
        self.last_metrics = result["metrics"]
        self._evaluated = (fingerprint(model), float(result["accuracy"]))
        log.info("%s: done in %.1fs, accuracy %.2f%%", label, time.perf_counter() - start,
                 result["accuracy"])
        return model

    def evaluate(self, model: nn.Module) -> float:
        if self._evaluated is not None and self._evaluated[0] == fingerprint(model):
            return self._evaluated[1]
        accuracy = float(self._call(model, Command(0, "evaluate"))["accuracy"])
        self._evaluated = (fingerprint(model), accuracy)
        return accuracy

    def score(self, kind: str, model: nn.Module, groups: list[ChannelGroup], batches: int,
              seed: int) -> dict[str, torch.Tensor]:
        """Channel scores computed on the workers (their GPUs where they have them), each on
        its share of `batches` global calibration batches, statistics summed across them."""
        result = self._call(model, Command(0, "score", kind=kind, batches=batches, seed=seed,
                                           input_shape=self.input_shape))
        scores = result["scores"]
        want = {g.key: g.width for g in groups}
        got = {key: int(s.numel()) for key, s in scores.items()}
        if got != want:
            raise DistributedError(f"the workers scored other channel groups than the driver "
                                   f"traced: {sorted(set(got.items()) ^ set(want.items()))[:4]}")
        return scores

    def recalibrate_bn(self, model: nn.Module, batches: int) -> nn.Module:
        """Re-estimate BatchNorm statistics on the workers (each on its share of `batches`
        global calibration batches, averaged); the model gets them in place."""
        self._adopt(model, self._call(model, Command(0, "recalibrate", batches=batches)))
        return model

    def close(self) -> None:
        """Stop the worker group (a later call starts a new one)."""
        if self._group is not None:
            self._group.close()
            self._group, self._held = None, None

    def __enter__(self) -> RayRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, model: nn.Module, command: Command) -> dict[str, Any]:
        if self._group is None:
            self._group = _WorkerGroup(self)
        version = self._push(model)
        started = time.perf_counter()
        result = self._group.call(replace(command, model=version))
        wall = time.perf_counter() - started
        self.timings.append(CommandTiming(command.op, command.label, wall, result["seconds"]))
        log.debug("%s %s: %.2fs (workers %.2fs)", command.op, command.label, wall,
                  result["seconds"])
        return result

    def _push(self, model: nn.Module) -> int:
        """The version of `model` the workers hold; sent through the object store only when
        the workers do not hold it yet (new weights or a new architecture)."""
        assert self._group is not None
        now = fingerprint(model)
        if self._held is None or self._held[1] != now:
            payload = to_payload(model, _payload_info(model, self.input_shape))
            self._held = (self._group.send_model(payload), now)
        return self._held[0]

    def _adopt(self, model: nn.Module, result: dict[str, Any]) -> None:
        """Load the weights a fit or re-estimation sent back; the workers hold them too."""
        import ray

        (ref,) = result["payload"]
        model.load_state_dict(ray.get(ref)["state_dict"])
        self._held = (int(result["version"]), fingerprint(model))


class _WorkerGroup:
    """One TorchTrainer run whose workers execute commands (worker.worker_loop) until
    told to stop; its fit() waits in a background thread while the driver sends commands
    through a Coordinator actor."""

    def __init__(self, runner: RayRunner) -> None:
        import ray
        from ray.train import BackendConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        self._ray = ray
        name = f"group-{uuid.uuid4().hex[:8]}"
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # on the driver's node (the head/CPU node with the driver resource), never on a worker
        # node whose loss would take the group's commands and results with it; hard, as a
        # soft affinity was seen to spill it to a worker node
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                              soft=False)
        self.coordinator = ray.remote(num_cpus=0)(Coordinator).options(
            scheduling_strategy=here).remote()
        fits = "fits" if runner.stable_fits else name
        setup = GroupSetup(runner.data, runner.train_cfg,
                           storage.join(runner.storage_path, fits), runner.sync_bn,
                           runner._parquet, fits_by_label=runner.stable_fits)
        resources = {"CPU": runner.cpus_per_worker}
        if runner.uses_cuda:
            resources["GPU"] = runner.gpus_per_worker
        config = {"setup": setup, "coordinator": self.coordinator}
        self._rendezvous = ""
        if loopback.on_loopback_machine(ray):  # no process-group socket on other interfaces
            config["rendezvous"] = self._rendezvous = loopback.rendezvous_prefix(name)
            trainer_type = loopback.data_parallel_trainer(TorchTrainer)
            backend = {"backend_config": BackendConfig()}
        else:
            trainer_type, backend = TorchTrainer, {}
        trainer = trainer_type(
            worker_loop,
            train_loop_config=config,
            **backend,
            scaling_config=ScalingConfig(num_workers=runner.num_workers,
                                         use_gpu=runner.uses_cuda,
                                         resources_per_worker=resources,
                                         placement_strategy=runner.placement),
            run_config=RunConfig(
                name=name, storage_path=runner.storage_path,
                failure_config=FailureConfig(max_failures=runner.max_failures),
                logging_config=LoggingConfig(log_level="WARNING")),  # epochs: our own log
        )
        self._seq = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._fit, args=(trainer,), daemon=True,
                                        name=f"ccpcsa-{name}")
        self._thread.start()
        atexit.register(self.close)
        log.info("started a group of %d Ray Train worker(s) (%s): it serves every call until "
                 "the runner closes", runner.num_workers, name)

    def _fit(self, trainer) -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # reported by the next call() that waits
            self.error = exc

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def send_model(self, payload: dict[str, Any]) -> int:
        version = self._next()
        self._ray.get(self.coordinator.set_model.remote(version, [self._ray.put(payload)]))
        return version

    def call(self, command: Command) -> dict[str, Any]:
        ray = self._ray
        seq = self._next()
        ray.get(self.coordinator.submit.remote(replace(command, seq=seq)))
        pending = self.coordinator.result.remote(seq)
        while not ray.wait([pending], timeout=1.0)[0]:
            if not self._thread.is_alive():
                error = str(self.error).strip().splitlines() if self.error else []
                raise DistributedError("the Ray Train worker group stopped"
                                       + (f": {error[-1]}" if error else ""))
        result = ray.get(pending)
        if "error" in result:
            raise result["error"]
        return result

    def starts(self) -> int:
        return self._ray.get(self.coordinator.starts.remote())

    def close(self) -> None:
        atexit.unregister(self.close)
        ray = self._ray
        if not ray.is_initialized():
            return
        if self._thread.is_alive():
            ray.get(self.coordinator.submit.remote(Command(self._next(), "stop")))
            self._thread.join(STOP_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("the Ray Train worker group did not stop within %.0fs",
                            STOP_TIMEOUT_S)
        ray.kill(self.coordinator)
        if self._rendezvous:
            loopback.remove_files(self._rendezvous)


class Coordinator:
    """A Ray actor between the driver and the worker group: the command in flight, the
    results, the latest model. It lives as long as the group's driver, so a group restarted
    after a failure finds the command it was running and the model it was running it on."""

    def __init__(self) -> None:
        self.command: Command | None = None
        self.finished = -1  # the newest command whose result was posted
        self.results: dict[int, dict[str, Any]] = {}
        self.model: tuple[int, list] = (-1, [None])
        self.group_starts = 0
        self._generation = 0
        self._joined: set[int] = set()
        self._changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:  # made on the actor's event loop
            self._changed = asyncio.Condition()
        return self._changed

    async def submit(self, command: Command) -> None:
        changed = self._condition()
        async with changed:
            self.command = command
            changed.notify_all()

    async def next_command(self, done: int) -> Command:
        """The command in flight once it is newer than `done` (a restarted worker passes -1:
        it gets the unfinished command, or waits for the next one)."""
        changed = self._condition()
        async with changed:
            await changed.wait_for(lambda: self.command is not None
                                   and self.command.seq > max(done, self.finished))
            return self.command

    async def set_model(self, version: int, ref: list) -> None:
        self.model = (version, ref)

    async def model_ref(self) -> tuple[int, list]:
        return self.model

    async def finish(self, seq: int, result: dict[str, Any]) -> None:
        import ray

        if result.get("payload") is not None:  # new weights: the version the workers hold
            ref = ray.put(result.pop("payload"))
            self.model = (seq, [ref])
            result.update(payload=[ref], version=seq)
        changed = self._condition()
        async with changed:
            self.results[seq] = result
            self.finished = max(self.finished, seq)
            changed.notify_all()

    async def result(self, seq: int) -> dict[str, Any]:
        changed = self._condition()
        async with changed:
            await changed.wait_for(lambda: seq in self.results)
            return self.results.pop(seq)

    async def group_started(self) -> None:
        self.group_starts += 1

    async def rendezvous(self, rank: int) -> int:
        """The rendezvous file generation for a starting worker (ccpcsa.distributed.loopback):
        a rank already in the current generation is a restarted group, which gets a new one."""
        if rank in self._joined:
            self._generation += 1
            self._joined = set()
        self._joined.add(rank)
        return self._generation

    async def starts(self) -> int:
        return self.group_starts


def prefer_loopback() -> None:
    """Without RAY_ADDRESS we start a private single-machine Ray instance: bind it to
    127.0.0.1 (Ray otherwise resolves 127.0.0.1 to the host's address). Call before Ray is
    imported; a driver joining a real cluster (RAY_ADDRESS set) is left alone."""
    if not os.environ.get("RAY_ADDRESS") and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ENV, "0")


def connect_ray():
    """Join the cluster RAY_ADDRESS names, else start a local instance on 127.0.0.1."""
    prefer_loopback()
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            # the dashboard (on 127.0.0.1) also serves the state API Ray Train's cleanup uses
            ray.init(address="local", dashboard_host="127.0.0.1")
    return ray


def started_locally() -> bool:
    """Whether this process started its own Ray instance (ray.init without an address): its
    nodes are then all there is, no autoscaler adds any."""
    import ray._private.worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    return bool(node is not None and getattr(node, "head", False))


def plan_of(num_workers: int, gpus_per_worker: float | None, cpus_per_worker: float,
            placement: str = "STRICT_PACK", decode_cpus: float = 0.0) -> TrialPlan:
    return TrialPlan(num_workers, cpus_per_worker, gpus_per_worker or 0.0, decode_cpus,
                     placement)


def check_cluster(num_workers: int, gpus_per_worker: float | None, cpus_per_worker: float,
                  *, placement: str = "STRICT_PACK", decode_cpus: float = 0.0,
                  wait_s: float = 0.0, say=print) -> float:
    """Connect to Ray and check that one trial's workers (and its decode tasks' CPUs) fit a
    node type the cluster can ever have (capacity.py); returns the GPUs per worker (None:
    1 when any node type has GPUs, else 0). With wait_s > 0, also ask the autoscaler for
    them and wait until the nodes that are up hold them. DistributedError, one line, when
    they never can or did not come in time."""
    ray = connect_ray()
    shape = capacity.cluster_shape(ray, local=started_locally())
    try:
        gpus = capacity.decide_gpus(gpus_per_worker, shape, ray)
        plan = TrialPlan(num_workers, cpus_per_worker, gpus, decode_cpus, placement)
        reason = capacity.refuse_reason(plan, shape)
        if reason:
            raise DistributedError(reason)
        if wait_s > 0 or not shape.autoscaling:
            capacity.wait_for_capacity(ray, plan, shape, wait_s, say)
    except capacity.CapacityError as exc:
        raise DistributedError(str(exc)) from None
    return gpus


def fingerprint(model: nn.Module) -> tuple:
    """Cheap identity of a model's weights: shapes and sums of every tensor."""
    with torch.no_grad():
        return tuple((k, tuple(v.shape), float(v.double().sum()))
                     for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------- driver side


def _payload_info(model: nn.Module, input_shape: tuple[int, int, int]) -> CheckpointInfo:
    """How the workers rebuild `model`: its name (registry, torchvision:NAME or module:callable,
    which must import on every node), classes, BAM placements (to_payload records them) and
    input shape (a model outside the registry finds its classifier by tracing on it)."""
    from ccpcsa.attention import has_bam

    name = getattr(model, "ccpcsa_model", None)
    num_classes = getattr(model, "ccpcsa_num_classes", None)
    if name is None or num_classes is None:
        raise DistributedError("RayRunner needs a model made by ccpcsa (build_model or "
                               "load_checkpoint): it rebuilds the architecture by name")
    return CheckpointInfo(name, num_classes, has_bam(model), input_shape)


def _parquet_indexes(data: DataConfig, num_workers: int, cpus_per_worker: float
                     ) -> tuple[ShardIndex, ShardIndex] | None:
    """Parquet: the row groups of train/ and val/, read once per runner (not per run), after
    the decode tasks' CPUs were checked with the workers' (check_cluster)."""
    if data.name != "parquet":
        return None
    root = str(data.root)
    check_parquet_splits(root)
    train, val = shard_index(root, "train"), shard_index(root, "val")
    warn_if_class_sorted(train, parquet_split_dir(root, "train"))
    return train, val
