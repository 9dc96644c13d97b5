"""The pre-flight's capacity plan: which trials fit which node types, where node types come
from, and the refusals a user sees (one line, at once) on a Ray instance that cannot grow."""

from __future__ import annotations

import time

import pytest
import ray
import yaml

from ccpcsa.distributed import DistributedError, check_cluster
from ccpcsa.distributed import capacity as cap
from ccpcsa.distributed.capacity import ClusterShape, NodeType, TrialPlan

HEAD = NodeType("head", {"CPU": 0.0, cap.DRIVER_RESOURCE: 1000.0}, 1)
GPU8 = NodeType("gpu-a100", {"CPU": 96.0, "GPU": 8.0}, 4)
CPU2 = NodeType("cpu", {"CPU": 2.0}, 3)


def shape(*types: NodeType, autoscaling: bool = True) -> ClusterShape:
    return ClusterShape(list(types), autoscaling, "the test's node types")


def test_strict_pack_needs_one_node_that_holds_every_worker():
    eight = TrialPlan(8, 4.0, 1.0)
    assert cap.trials_that_fit(eight, [HEAD, GPU8], 8) == 4  # one trial per 8-GPU node
    nine = TrialPlan(9, 1.0, 1.0)
    reason = cap.refuse_reason(nine, shape(HEAD, GPU8))
    assert reason and "fits on no node" in reason and "--placement PACK" in reason
    # the same nine workers may span two nodes when asked
    assert cap.refuse_reason(TrialPlan(9, 1.0, 1.0, placement="PACK"), shape(HEAD, GPU8)) is None


def test_gpus_beyond_every_node_type_are_refused_with_the_totals():
    reason = cap.refuse_reason(TrialPlan(40, 1.0, 1.0, placement="PACK"), shape(HEAD, GPU8))
    assert reason == ("one trial (40 worker(s) x (1 CPU, 1 GPU), PACK) needs 40 GPUs but the "
                      "test's node types has 32")


def test_decode_cpus_are_part_of_the_plan():
    # two workers of one CPU fill a 2-CPU node; the decode tasks need a CPU more
    assert cap.trials_that_fit(TrialPlan(2, 1.0, 0.0), [CPU2], 9) == 3
    assert cap.trials_that_fit(TrialPlan(2, 1.0, 0.0, decode_cpus=1.0), [CPU2], 9) == 2
    one_node = NodeType("cpu", {"CPU": 2.0}, 1)
    assert cap.refuse_reason(TrialPlan(2, 1.0, 0.0, 1.0), shape(one_node)) is not None
    assert cap.refuse_reason(TrialPlan(2, 0.5, 0.0, 1.0), shape(one_node)) is None


def test_decode_cpus_go_beside_strict_pack_workers_when_one_node_holds_both():
    # a node with a CPU to spare comes first, the workers' node after it: under STRICT_PACK
    # the decode CPU joins the workers (its tasks prefer their node), under PACK any node
    nodes = [{"CPU": 1.0}, {"CPU": 4.0}]
    assert cap.place(TrialPlan(2, 1.0, 0.0, decode_cpus=1.0), nodes)
    assert nodes == [{"CPU": 1.0}, {"CPU": 1.0}]
    nodes = [{"CPU": 1.0}, {"CPU": 4.0}]
    assert cap.place(TrialPlan(2, 1.0, 0.0, decode_cpus=1.0, placement="PACK"), nodes)
    assert nodes == [{"CPU": 0.0}, {"CPU": 2.0}]
    # no node holds both: the decode CPU goes wherever one is free, as before
    nodes = [{"CPU": 1.0}, {"CPU": 2.0}]
    assert cap.place(TrialPlan(2, 1.0, 0.0, decode_cpus=1.0), nodes)
    assert nodes == [{"CPU": 0.0}, {"CPU": 0.0}]


def test_strict_spread_needs_distinct_nodes():
    plan = TrialPlan(3, 1.0, 0.0, placement="STRICT_SPREAD")
    assert cap.trials_that_fit(plan, [CPU2], 5) == 2  # 3 nodes x 2 CPUs, one worker each
    assert cap.refuse_reason(plan, shape(NodeType("cpu", {"CPU": 8.0}, 2))) is not None


def test_unknown_node_types_never_refuse_and_need_explicit_gpus():
    unknown = ClusterShape(None, True, "an autoscaler")
    assert cap.refuse_reason(TrialPlan(64, 8.0, 1.0), unknown) is None
    assert cap.concurrent_cap(TrialPlan(64, 8.0, 1.0), unknown, 4) == 4


def test_gpus_come_from_node_types_not_from_nodes_up_now():
    # an autoscaling cluster whose GPU nodes are all scaled down: trials still get GPUs
    assert cap.decide_gpus(None, shape(HEAD, GPU8), ray=None) == 1.0
    assert cap.decide_gpus(None, shape(HEAD, CPU2), ray=None) == 0.0
    assert cap.decide_gpus(0.5, shape(HEAD, CPU2), ray=None) == 0.5
    with pytest.raises(cap.CapacityError, match="got -1"):
        cap.decide_gpus(-1, shape(HEAD), ray=None)


def test_node_types_from_an_autoscaler_config_file(tmp_path):
    config = {"max_workers": 4, "head_node_type": "head",
              "available_node_types": {
                  "head": {"resources": {"CPU": 0, cap.DRIVER_RESOURCE: 100}, "max_workers": 0},
                  "gpu": {"resources": {"CPU": 96, "GPU": 8}, "min_workers": 0,
                          "max_workers": 3}}}
    path = tmp_path / "autoscaling.yaml"
    path.write_text(yaml.safe_dump(config))
    types = {t.name: t for t in cap._types_from_file(str(path))}
    assert types["head"].max_count == 1 and types["gpu"].max_count == 3
    assert types["gpu"].resources == {"CPU": 96.0, "GPU": 8.0}
    # resources left for the provider to fill in from the instance type: unknown here
    config["available_node_types"]["gpu"]["resources"] = {}
    path.write_text(yaml.safe_dump(config))
    assert cap._types_from_file(str(path)) is None


@pytest.fixture(scope="module")
def two_cpus():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_fixed_cluster_refuses_at_once_in_one_line(two_cpus):
    started = time.monotonic()
    with pytest.raises(DistributedError) as info:
        check_cluster(3, None, 1.0, wait_s=600)
    assert time.monotonic() - started < 30  # no waiting, no retry loop
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("one trial (3 worker(s) x (1 CPU), STRICT_PACK) needs 3 CPUs "
                              "but "), message
    assert message.endswith(" has 2"), message
    # the decode tasks' CPU is part of the plan too
    with pytest.raises(DistributedError, match="Ray Data decoding"):
        check_cluster(2, 0, 1.0, decode_cpus=1.0)
    # what fits is accepted, GPUs decided from the (GPU-less) nodes
    assert check_cluster(2, None, 0.5, decode_cpus=1.0, wait_s=600) == 0.0


def test_a_stream_that_gets_no_batch_says_so(caplog):
    with caplog.at_level("WARNING", logger="ccpcsa.distributed"):
        with cap.StarvationWatch("a stream of 3 row groups", 1.0, after_s=0.3):
            time.sleep(1.0)  # the watch looks every min(after_s, 5) s
    warned = [r.getMessage() for r in caplog.records]
    assert warned and warned[0].startswith("a stream of 3 row groups: no batch from Ray Data")
    assert "decode tasks need 1 CPU each" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="ccpcsa.distributed"):
        with cap.StarvationWatch("busy", 1.0, after_s=0.5) as watch:
            for _ in range(20):
                watch.seen()
                time.sleep(0.1)
    assert not caplog.records


# --------------------------------------------------------------------------- head loss: the lock


def test_a_lock_whose_ray_cluster_is_gone_is_taken_over(tmp_path, caplog):
    import json
    import socket

    from ccpcsa.runlock import LOCK_FILE, Holder, RunInUseError, RunLock, ray_gone

    with socket.socket() as listening:  # a live "GCS": something answers at its address
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        alive = f"127.0.0.1:{listening.getsockname()[1]}"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            gone = f"127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
            old_head = Holder("old-head", 4242, "2026-01-01T00:00:00", "search/run.py", "t",
                              "", "c0ffee", gone, "01000000")
            assert ray_gone(old_head)
            live_head = Holder(**{**old_head.__dict__, "ray_gcs": alive})
            assert not ray_gone(live_head)
            # without Ray details (an older lock), another host's holder is never taken over
            assert not ray_gone(Holder(**{**old_head.__dict__, "ray_gcs": ""}))

            (tmp_path / LOCK_FILE).write_text(json.dumps(live_head.__dict__))
            with pytest.raises(RunInUseError, match="in use by pid 4242 on host old-head"):
                RunLock(str(tmp_path), "test").acquire()
            (tmp_path / LOCK_FILE).write_text(json.dumps(old_head.__dict__))
            with caplog.at_level("WARNING", logger="ccpcsa.runlock"):
                with RunLock(str(tmp_path), "test") as lock:
                    assert lock.held
            assert any("took over the stale lock of pid 4242 on host old-head" in r.getMessage()
                       and "Ray cluster or job is gone" in r.getMessage()
                       for r in caplog.records)


def test_the_lock_records_the_ray_cluster_and_job(two_cpus, tmp_path):
    import json

    from ccpcsa.runlock import LOCK_FILE, Holder, RunLock, ray_gone

    with RunLock(str(tmp_path), "test") as lock:
        lock.record_ray()
        body = json.loads((tmp_path / LOCK_FILE).read_text())
        assert body["ray_gcs"] == ray.get_runtime_context().gcs_address
        assert body["ray_job"] == ray.get_runtime_context().get_job_id()
        assert body["ray_cluster"] and body["token"] == lock.holder.token
        # the same cluster, seen from another host: this job is alive, so the lock is not stale
        assert not ray_gone(Holder(**{**body, "host": "another-host"}))
