"""Decode tasks run on their consumer's node while it has CPUs free, and elsewhere when it has
none (ccpcsa.distributed.ingest, near_this_node). On a real two-node Ray cluster on this
machine, both nodes bound to 127.0.0.1; the decode tasks write their node's id to files."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from ccpcsa.data import imagefolder_to_parquet

pytestmark = pytest.mark.slow

SIZE, ROWS, GROUP = 16, 24, 8  # 3 row groups of val rows: 3 decode tasks per stream


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def parquet_root(tmp_path_factory) -> Path:
    src, root = tmp_path_factory.mktemp("jpegs"), tmp_path_factory.mktemp("parquet")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            (src / split / f"c{c}").mkdir(parents=True)
            for i in range(ROWS // 2):
                pixels = rng.integers(0, 255, (20, 20, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(src / split / f"c{c}" / f"{i:02d}.jpg")
        imagefolder_to_parquet(str(src / split), str(root / split), rows_per_shard=ROWS,
                               rows_per_group=GROUP)
    return root


@pytest.fixture(scope="module")
def two_nodes():
    """A head of 1 CPU and a node of 8 (logical) CPUs: ({"head": id, "big": id})."""
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, node_ip_address="127.0.0.1", gcs_server_port=_free_port(),
        include_dashboard=False, dashboard_agent_listen_port=_free_port(),
        ray_client_server_port=_free_port()))
    cluster.add_node(num_cpus=8, node_ip_address="127.0.0.1",
                     dashboard_agent_listen_port=_free_port())
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        # the workers cannot import this test module: Consumer travels by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        nodes = {n["NodeID"]: n["Resources"].get("CPU") for n in ray.nodes() if n["Alive"]}
        yield {"head": next(k for k, v in nodes.items() if v == 1.0),
               "big": next(k for k, v in nodes.items() if v == 8.0)}
    finally:
        ray.shutdown()
        cluster.shutdown()


class Consumer:
    """A Ray Train worker's stand-in: holds a CPU of its node and reads a stream there."""

    def read(self, root: str, seen: str, near: bool) -> tuple[str, int]:
        import torch

        from ccpcsa.data import decode_task, shard_index
        from ccpcsa.distributed import ingest

        def recording(batch, **kwargs):
            name = os.path.join(seen, f"{os.getpid()}-{np.random.randint(1 << 30)}")
            with open(name, "w") as f:
                f.write(ray.get_runtime_context().get_node_id())
            return decode_task(batch, **kwargs)

        ingest.decode_task = recording  # the stream's tasks report where they ran
        cfg = ingest.IngestConfig(SIZE, 4, near_consumer=near)
        source = ingest.ParquetBatches(None, shard_index(root, "val"), cfg,
                                       torch.device("cpu"))
        rows = sum(len(labels) for _, labels in source.evaluation(0, 1))
        return ray.get_runtime_context().get_node_id(), rows


def _read_on(node: str, root: Path, seen: Path, near: bool = True) -> tuple[str, int, list[str]]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    seen.mkdir()
    actor = ray.remote(num_cpus=1)(Consumer).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
    try:
        where, rows = ray.get(actor.read.remote(str(root), str(seen), near), timeout=60)
    finally:
        ray.kill(actor)
    return where, rows, [p.read_text() for p in seen.iterdir()]


def test_decode_tasks_run_on_the_consumers_node(two_nodes, parquet_root, tmp_path):
    # the consumer holds 1 of the big node's 8 CPUs: the 3 tasks fit beside it, while Ray
    # Data's spreading would also use the head's free CPU
    where, rows, ran = _read_on(two_nodes["big"], parquet_root, tmp_path / "big")
    assert where == two_nodes["big"] and rows == ROWS
    assert len(ran) == ROWS // GROUP and set(ran) == {two_nodes["big"]}


def test_decode_tasks_spill_when_the_consumers_node_is_full(two_nodes, parquet_root, tmp_path):
    # the consumer holds the head's only CPU: its tasks run on the other node, no waiting
    where, rows, ran = _read_on(two_nodes["head"], parquet_root, tmp_path / "head")
    assert where == two_nodes["head"] and rows == ROWS
    assert len(ran) == ROWS // GROUP and set(ran) == {two_nodes["big"]}
