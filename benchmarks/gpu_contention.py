"""GPU benchmark: what slows the training step down while the input stream runs beside it?

The plain loop of gpu_datapath.py (ResNet-50 + BAM, 224², bf16 autocast, channels_last, one
GPU-resident batch) timed alone and beside each kind of load the full path puts next to it:
  cpu_procs   N processes burning CPU (the decode tasks: OS scheduling on a shared machine)
  np_thread   a thread of this process slicing and concatenating uint8 batches with numpy
              (what Ray Data's batcher does with each block)
  pin_thread  a thread of this process pinning batches (tensor.pin_memory(): what Ray Data's
              iter_torch_batches(pin_memory=True) does to each batch)
  pinned_copy_thread  a thread copying batches into one pinned buffer, allocated once, then
              to the GPU on a side stream (a reusable-buffer alternative)
  pageable_thread  a thread copying batches to the GPU from pageable memory
  py_thread   (only with --loads) a thread of this process running pure Python: the worst
              case for the GIL; on the H200 it held 30 steps back for over 100 s
One JSON line per measurement; `--out` also writes OUT/contention.jsonl.

  PYTHONPATH=$PWD:/tmp/deps python3 benchmarks/gpu_contention.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch


def _burn(stop, *_shape) -> None:
    """Pure Python until `stop` is set: a CPU-burning process, or (py_thread) a GIL holder."""
    x = 0
    while not stop.is_set():
        for i in range(1000):
            x += i


def _numpy_load(stop: threading.Event, batch: int, size: int) -> None:
    block = np.random.randint(0, 255, (batch * 4, size, size, 3), dtype=np.uint8)
    while not stop.is_set():
        parts = [block[i * batch // 2:(i + 1) * batch // 2] for i in range(3)]
        np.concatenate(parts)


def _pin_load(stop: threading.Event, batch: int, size: int) -> None:
    src = torch.from_numpy(np.random.randint(0, 255, (batch, size, size, 3), dtype=np.uint8))
    while not stop.is_set():
        src.pin_memory()


def _pinned_copy_load(stop: threading.Event, batch: int, size: int) -> None:
    src = torch.from_numpy(np.random.randint(0, 255, (batch, size, size, 3), dtype=np.uint8))
    pinned = torch.empty_like(src).pin_memory()
    stream = torch.cuda.Stream()
    while not stop.is_set():
        pinned.copy_(src)
        with torch.cuda.stream(stream):
            pinned.to("cuda", non_blocking=True)
        stream.synchronize()  # before the buffer is written again


def _pageable_load(stop: threading.Event, batch: int, size: int) -> None:
    src = torch.from_numpy(np.random.randint(0, 255, (batch, size, size, 3), dtype=np.uint8))
    while not stop.is_set():
        src.to("cuda", non_blocking=True)


LOADS = {"py_thread": (_burn, False), "np_thread": (_numpy_load, True),
         "pin_thread": (_pin_load, True), "pinned_copy_thread": (_pinned_copy_load, True),
         "pageable_thread": (_pageable_load, True)}
CUDA_ONLY = {"pin_thread", "pinned_copy_thread", "pageable_thread"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--procs", type=int, default=(os.cpu_count() or 2) - 1,
                   help="CPU-burning processes for cpu_procs (default: CPUs - 1; 0: skip)")
    p.add_argument("--loads", nargs="+", choices=tuple(LOADS),
                   default=[name for name, (_, default) in LOADS.items() if default],
                   help="thread loads to run beside the loop (default: all but py_thread)")
    a = p.parse_args()
    from gpu_datapath import _plain_steps

    from ccpcsa.models import build_model
    from ccpcsa.train import TrainConfig, make_optimizer, to_device

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = TrainConfig(batch_size=a.batch)
    model = to_device(build_model(a.model, 100, with_bam=True), device, cfg)
    opt, _ = make_optimizer(model, cfg, 0.01, 10**6)
    x = torch.randn(a.batch, 3, a.size, a.size, device=device)
    x = x.contiguous(memory_format=torch.channels_last if cuda else torch.contiguous_format)
    y = torch.randint(0, 100, (a.batch,), device=device)
    _plain_steps(model, opt, x, y, 10)
    out = Path(a.out) if a.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    def timed(load: str, steps: int = a.steps) -> None:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        _plain_steps(model, opt, x, y, steps)
        if cuda:
            torch.cuda.synchronize()
        img_s = steps * a.batch / (time.perf_counter() - start)
        row = {"load": load, "steps": steps, "img_s": round(img_s, 1),
               "gpu": torch.cuda.get_device_name() if cuda else None, "cpus": os.cpu_count()}
        print(json.dumps(row), flush=True)
        if out:
            with open(out / "contention.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    timed("none")
    if a.procs > 0:
        ctx = multiprocessing.get_context("fork")
        stop = ctx.Event()
        procs = [ctx.Process(target=_burn, args=(stop,), daemon=True) for _ in range(a.procs)]
        for proc in procs:
            proc.start()
        time.sleep(1)
        timed(f"cpu_procs x{a.procs}")
        stop.set()
        for proc in procs:
            proc.join()
    for name in a.loads:
        if name in CUDA_ONLY and not cuda:
            continue
        tstop = threading.Event()
        thread = threading.Thread(target=LOADS[name][0], args=(tstop, a.batch, a.size),
                                  daemon=True)
        thread.start()
        time.sleep(0.5)
        timed(name, 3 if name == "py_thread" else a.steps)
        tstop.set()
        thread.join()
    timed("none (again)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
