"""The workers' process group on a single-machine Ray instance, reachable on 127.0.0.1 only.

Ray Train's TorchTrainer rendezvouses through torch's TCPStore, which listens on every
interface of rank 0's host. When Ray itself runs on one machine bound to 127.0.0.1 (the local
runs of ccpcsa), the group is made here instead: a DataParallelTrainer without Ray's torch
set-up, the workers meeting through a FileStore (no listening socket) and gloo / NCCL bound to
the loopback interface. On a real cluster nothing changes: TorchTrainer as before.

A group restarted after a failure meets in a new file: the Coordinator hands out one file
generation per start (a rank asking twice in one generation starts the next).
"""

from __future__ import annotations

import glob
import os
import socket
import tempfile
from datetime import timedelta

import torch

LOOPBACK = "127.0.0.1"
TIMEOUT = timedelta(minutes=30)  # Ray Train's default process group timeout


def on_loopback_machine(ray) -> bool:
    """True when the Ray instance is one node bound to 127.0.0.1."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == LOOPBACK


def data_parallel_trainer(torch_trainer: type) -> type:
    """Ray Train's DataParallelTrainer of the same API generation as its TorchTrainer (Train
    V2 when RAY_TRAIN_V2_ENABLED, the default, else V1)."""
    if torch_trainer.__module__.startswith("ray.train.v2"):
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    else:
        from ray.train.data_parallel_trainer import DataParallelTrainer
    return DataParallelTrainer


def rendezvous_prefix(group_name: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"ccpcsa-{group_name}-store")


def remove_files(prefix: str) -> None:
    """The rendezvous files a group left (a killed worker does not remove its own)."""
    for path in glob.glob(f"{glob.escape(prefix)}-*"):
        try:
            os.remove(path)
        except OSError:
            pass


def loopback_interface() -> str | None:
    """The name of the interface holding 127.0.0.1 ("lo" on Linux), if there is one."""
    names = [name for _index, name in socket.if_nameindex()]
    return next((n for n in names if n in ("lo", "lo0")), None)


def join(prefix: str, generation: int, rank: int, world: int, device: torch.device) -> None:
    """Join the group of `world` workers as `rank` through the file of this generation."""
    import torch.distributed as dist

    if world < 2:
        return
    interface = loopback_interface()
    if interface is not None:  # gloo's and NCCL's own sockets on 127.0.0.1
        os.environ["GLOO_SOCKET_IFNAME"] = interface
        os.environ["NCCL_SOCKET_IFNAME"] = interface
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"file://{prefix}-{generation}", rank=rank,
                            world_size=world, timeout=TIMEOUT)


def leave() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
