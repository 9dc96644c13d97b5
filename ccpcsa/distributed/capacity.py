"""Will one trial fit the Ray cluster, now or once its autoscaler has added nodes?

A trial's plan is its Ray Train worker bundles (placed together by default: STRICT_PACK) plus
the CPUs its Ray Data decode tasks need (Parquet), which run beside the workers, outside their
bundles: on the workers' node when it has room for them (the decode tasks prefer it, see
ingest.py), else on any node. The plan is checked against the node types the cluster can ever
have, not the nodes that happen to be up:

1. the node groups an autoscaler reported to the GCS (Ray's cluster config), else
2. the `available_node_types` of the autoscaler's config file, read on the head node (where
   `ray job submit` runs the driver) from the monitor process's command line, else
3. with an autoscaler whose node types cannot be read: unknown (wait for nodes, never refuse),
4. without an autoscaler: the nodes that are up are all there will be.

A plan no node type can hold is refused at once; one that fits later is asked of the
autoscaler (`ray.autoscaler.sdk.request_resources`) and waited for, with progress lines.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import yaml

log = logging.getLogger("ccpcsa.distributed")

# A custom resource the cluster files give the head (or CPU) nodes: trial drivers ask for one
# unit, so they land there and never hold a GPU node's CPU.
DRIVER_RESOURCE = "ccpcsa_driver"
PLACEMENTS = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")
STATUS_KEY = "__autoscaling_status"  # what Ray's autoscaler monitor writes to the GCS KV
PROGRESS_EVERY_S = 15.0


class CapacityError(ValueError):
    """The trial can never fit, or did not fit within the wait."""


@dataclass(frozen=True)
class TrialPlan:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    decode_cpus: float = 0.0  # Ray Data decode tasks beside the workers (Parquet)
    placement: str = "STRICT_PACK"

    def worker_bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            bundle["GPU"] = self.gpus_per_worker
        return bundle

    def bundles(self) -> list[dict[str, float]]:
        """What the trial needs at once: its workers, then its decode tasks' CPUs."""
        extra = [{"CPU": self.decode_cpus}] if self.decode_cpus else []
        return [self.worker_bundle()] * self.workers + extra

    def describe(self) -> str:
        gpus = f", {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        decode = (f" + {self.decode_cpus:g} CPU for Ray Data decoding" if self.decode_cpus
                  else "")
        return (f"{self.workers} worker(s) x ({self.cpus_per_worker:g} CPU{gpus}), "
                f"{self.placement}{decode}")


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_count: int


@dataclass(frozen=True)
class ClusterShape:
    types: list[NodeType] | None  # None: an autoscaler whose node types are unknown here
    autoscaling: bool
    source: str  # where the node types came from, for messages


def _fits_node(free: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items() if v)


def _take(free: dict[str, float], bundle: dict[str, float]) -> None:
    for k, v in bundle.items():
        free[k] = free.get(k, 0.0) - v


def _instances(types: list[NodeType], limit: int) -> list[dict[str, float]]:
    return [dict(t.resources) for t in types for _ in range(min(t.max_count, limit))]


def place(plan: TrialPlan, nodes: list[dict[str, float]]) -> bool:
    """Place one trial's bundles on these nodes (their free resources, updated in place):
    the worker bundles as plan.placement demands, the decode CPUs on the workers' node under
    STRICT_PACK when one node holds both (their tasks prefer the workers' node), else on any."""
    worker = plan.worker_bundle()
    decode = {"CPU": plan.decode_cpus}
    if plan.placement == "STRICT_PACK":
        need = {k: v * plan.workers for k, v in worker.items()}
        both = dict(need, CPU=need.get("CPU", 0.0) + plan.decode_cpus)
        home = next((n for n in nodes if _fits_node(n, both)), None)
        if home is not None:
            _take(home, both)
            return True
        home = next((n for n in nodes if _fits_node(n, need)), None)
        if home is None:
            return False
        _take(home, need)
    else:
        used: set[int] = set()
        for _ in range(plan.workers):
            order = sorted(range(len(nodes)), key=lambda i: i in used) \
                if plan.placement in ("SPREAD", "STRICT_SPREAD") else range(len(nodes))
            spot = next((i for i in order if _fits_node(nodes[i], worker)
                         and not (plan.placement == "STRICT_SPREAD" and i in used)), None)
            if spot is None:
                return False
            used.add(spot)
            _take(nodes[spot], worker)
    if plan.decode_cpus:
        spot = next((n for n in nodes if _fits_node(n, decode)), None)
        if spot is None:
            return False
        _take(spot, decode)
    return True


def trials_that_fit(plan: TrialPlan, types: list[NodeType], most: int) -> int:
    """How many such trials the node types hold at once (at most `most`)."""
    nodes = _instances(types, plan.workers + 1 if most == 1 else most * (plan.workers + 1))
    count = 0
    while count < most and place(plan, nodes):
        count += 1
    return count


def current_nodes(ray) -> list[NodeType]:
    return [NodeType(n.get("NodeManagerAddress", "?"), dict(n.get("Resources", {})), 1)
            for n in ray.nodes() if n.get("Alive")]


def _types_from_gcs() -> list[NodeType] | None:
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # older Ray or no such key: not reported
        return None
    if config is None or not config.node_group_configs:
        return None
    return [NodeType(getattr(g, "name", "") or "node group", dict(g.resources), g.max_count)
            for g in config.node_group_configs]


def _monitor_config_path(ray) -> str | None | bool:
    """The autoscaling config file of the cluster's autoscaler monitor: its path, False when
    the monitor runs without one (no autoscaling), None when unknown (no monitor seen, or it
    runs on another host or in another container)."""
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        status = json.loads(_internal_kv_get(STATUS_KEY) or b"{}")
    except (ValueError, TypeError):
        return None
    pid = status.get("monitor_pid")
    if not isinstance(pid, int):
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode() for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    if not any("monitor" in a for a in argv[:3]):
        return None  # a reused pid
    for i, arg in enumerate(argv):
        if arg.startswith("--autoscaling-config="):
            return arg.split("=", 1)[1] or False
        if arg == "--autoscaling-config" and i + 1 < len(argv):
            return argv[i + 1]
    return False


def _types_from_file(path: str) -> list[NodeType] | None:
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
        types = config["available_node_types"]
        head = config.get("head_node_type")
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
    found = []
    for name, spec in types.items():
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        if not resources:
            return None  # filled in from the instance type by the provider: unknown here
        count = 1 if name == head else int(spec.get("max_workers", config.get("max_workers", 0)))
        found.append(NodeType(name, resources, count))
    return found


def cluster_shape(ray, local: bool = False) -> ClusterShape:
    """The node types this cluster can ever have (see the module docstring)."""
    if local:
        return ClusterShape(current_nodes(ray), False, "this machine's Ray instance")
    types = _types_from_gcs()
    if types is not None:
        return ClusterShape(types, True, "the autoscaler's node groups")
    path = _monitor_config_path(ray)
    if path is False:
        return ClusterShape(current_nodes(ray), False, "the Ray cluster (no autoscaler)")
    if path:
        types = _types_from_file(path)
        if types is not None:
            return ClusterShape(types, True, f"the autoscaler's node types ({path})")
    return ClusterShape(None, True, "an autoscaler whose node types are not readable here")


def decide_gpus(gpus_per_worker: float | None, shape: ClusterShape, ray) -> float:
    """--gpus-per-worker, or when unset 1 if any node type has GPUs, else 0; never from
    which nodes happen to be up on an autoscaling cluster."""
    if gpus_per_worker is not None:
        if gpus_per_worker < 0:
            raise CapacityError(f"GPUs per worker must be >= 0, got {gpus_per_worker}")
        return float(gpus_per_worker)
    if shape.types is not None:
        return 1.0 if any(t.resources.get("GPU", 0) > 0 for t in shape.types) else 0.0
    if any(t.resources.get("GPU", 0) > 0 for t in current_nodes(ray)):
        return 1.0
    raise CapacityError("--gpus-per-worker is not set and the autoscaler's node types are "
                        "not readable here, so whether trials get GPUs is unknown: pass "
                        "--gpus-per-worker 1 (GPU nodes) or 0 (CPU only)")


def refuse_reason(plan: TrialPlan, shape: ClusterShape) -> str | None:
    """Why no node type can ever hold the trial (None when one can, or when unknown)."""
    if shape.types is None or trials_that_fit(plan, shape.types, 1):
        return None
    total = {k: sum(t.resources.get(k, 0.0) * t.max_count for t in shape.types)
             for k in ("CPU", "GPU")}
    need = {k: sum(b.get(k, 0.0) for b in plan.bundles()) for k in ("CPU", "GPU")}
    short = [f"{need[k]:g} {k}s but {shape.source} has {total[k]:g}" for k in ("GPU", "CPU")
             if need[k] > total[k] + 1e-9]
    if short:
        return f"one trial ({plan.describe()}) needs " + short[0]
    biggest = max(shape.types, key=lambda t: (t.resources.get("GPU", 0.0),
                                              t.resources.get("CPU", 0.0)))
    hint = ("; pass --placement PACK to let a trial's workers span nodes"
            if plan.placement == "STRICT_PACK" else "")
    return (f"one trial ({plan.describe()}) fits on no node of {shape.source} (the largest, "
            f"{biggest.name}, has {_show(biggest.resources)}){hint}")


def _show(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(k, 0.0):g} {k}" for k in ("CPU", "GPU"))


def wait_for_capacity(ray, plan: TrialPlan, shape: ClusterShape, timeout_s: float,
                      say: Callable[[str], None] = print, poll_s: float = 2.0) -> None:
    """Ask the autoscaler for one trial's bundles and wait until the nodes that are up hold
    it (progress every PROGRESS_EVERY_S); CapacityError after timeout_s."""
    if place(plan, [dict(t.resources) for t in current_nodes(ray)]):
        return
    if not shape.autoscaling:
        raise CapacityError(refuse_reason(plan, shape) or f"one trial ({plan.describe()}) "
                            "does not fit the Ray cluster")
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=plan.bundles())
    started = last = time.monotonic()
    say(f"waiting up to {timeout_s:.0f}s for the autoscaler to add nodes for one trial "
        f"({plan.describe()}); the cluster has {_show(ray.cluster_resources())} now")
    while True:
        time.sleep(poll_s)
        if place(plan, [dict(t.resources) for t in current_nodes(ray)]):
            say(f"the cluster holds a trial now ({_show(ray.cluster_resources())}), after "
                f"{time.monotonic() - started:.0f}s")
            return
        waited = time.monotonic() - started
        if waited >= timeout_s:
            raise CapacityError(
                f"waited {waited:.0f}s (--wait-for-resources) for nodes that hold one trial "
                f"({plan.describe()}) but the cluster has {_show(ray.cluster_resources())}; "
                "`ray status` shows the autoscaler's pending and failed launches")
        if time.monotonic() - last >= PROGRESS_EVERY_S:
            last = time.monotonic()
            say(f"still waiting for nodes: {waited:.0f}s of {timeout_s:.0f}s, the cluster has "
                f"{_show(ray.cluster_resources())}")


def release_request() -> None:
    """Withdraw the standing request_resources (the autoscaler may scale down again)."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])
    except Exception as exc:  # not connected any more: nothing to withdraw
        log.debug("could not withdraw the resource request: %s", exc)


def has_driver_resource(ray, shape: ClusterShape) -> bool:
    nodes = shape.types if shape.types is not None else current_nodes(ray)
    return any(t.resources.get(DRIVER_RESOURCE, 0) > 0 for t in nodes) or \
        ray.cluster_resources().get(DRIVER_RESOURCE, 0) > 0


def concurrent_cap(plan: TrialPlan, shape: ClusterShape, wanted: int) -> int:
    """Trials that can run at once without starving each other's decode tasks: `wanted` on
    an autoscaling cluster, what the nodes hold on a fixed one."""
    if shape.autoscaling or shape.types is None:
        return wanted
    return max(1, trials_that_fit(plan, shape.types, wanted))



STARVED_AFTER_S = 60.0


class StarvationWatch:
    """Warns (once a minute, not silently forever) while a Ray Data stream delivers no batch:
    what a decode task waiting for a CPU looks like from the worker.

        with StarvationWatch("train epoch 1", decode_cpus) as watch:
            for batch in stream:
                watch.seen()
    """

    def __init__(self, what: str, decode_cpus: float, after_s: float = STARVED_AFTER_S) -> None:
        import threading

        self.what, self.decode_cpus, self.after_s = what, decode_cpus, after_s
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True,
                                        name="ccpcsa-starvation-watch")

    def __enter__(self) -> StarvationWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def seen(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(self.after_s, 5.0)):
            idle = time.monotonic() - self._last
            if idle >= self.after_s:
                log.warning(self.message(idle))
                self._last = time.monotonic()  # the next warning a period later

    def message(self, idle: float) -> str:
        try:
            import ray

            free, total = (ray.available_resources().get("CPU", 0.0),
                           ray.cluster_resources().get("CPU", 0.0))
            cpus = f"the cluster has {free:g} of {total:g} CPUs free"
        except Exception:  # not connected: say what we know
            cpus = "the cluster's free CPUs are unknown"
        return (f"{self.what}: no batch from Ray Data for {idle:.0f}s; its decode tasks need "
                f"{self.decode_cpus:g} CPU each and {cpus} (`ray status` shows pending "
                "demands); free CPUs (lower --cpus-per-worker or --max-concurrent-trials) or "
                "add nodes")
