"""CrossWorkerBatchNorm: two gloo workers with half batches train exactly like one process."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ccpcsa.syncbn import CrossWorkerBatchNorm, convert_batchnorm


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 5),
                         nn.BatchNorm1d(5))


def _worker(rank: int, port: int, x: torch.Tensor, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = nn.parallel.DistributedDataParallel(convert_batchnorm(_net()))
        out = model(x[rank * 4:(rank + 1) * 4])
        out.square().mean().backward()
        inner = model.module
        queue.put((rank, out.detach().tolist(), inner[0].weight.grad.tolist(),
                   inner[1].running_var.tolist(), inner[4].running_mean.tolist()))
    finally:
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_normalise_like_one_process():
    torch.manual_seed(1)
    x = torch.randn(8, 3, 6, 6)
    reference = _net()
    out = reference(x)
    out.square().mean().backward()

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, x, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict((r[0], r[1:]) for r in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    outputs = torch.tensor(results[0][0] + results[1][0])
    assert torch.allclose(outputs, out.detach(), atol=1e-5)
    for rank in (0, 1):
        grad, running_var, running_mean = (torch.tensor(v) for v in results[rank][1:])
        assert torch.allclose(grad, reference[0].weight.grad, atol=1e-5)  # DDP-averaged
        assert torch.allclose(running_var, reference[1].running_var, atol=1e-6)
        assert torch.allclose(running_mean, reference[4].running_mean, atol=1e-6)


def test_conversion_keeps_the_state_dict_and_single_process_behaviour():
    plain = _net()
    converted = convert_batchnorm(_net())
    assert sum(isinstance(m, CrossWorkerBatchNorm) for m in converted.modules()) == 2
    assert converted.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(6, 3, 6, 6)
    assert torch.allclose(converted(x), plain(x))  # no process group: plain BatchNorm
