"""Measured inference latency: batch 1 and batch N, after warm-up, median of repeats, fp32,
eval mode, on the device the model is measured on (named in the result).

FLOPs are a proxy; what a deployment sees depends on the device, the batch and how well the
kernels fit the pruned widths, so the search reports both.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

WARMUP = 3
REPEATS = 10
BATCH = 8


@dataclass(frozen=True)
class Latency:
    device: str  # e.g. "cuda: NVIDIA H100 80GB HBM3" or "cpu: AMD EPYC 7B13, 2 threads"
    batch1_ms: float  # median milliseconds of one forward pass of one sample
    batch_ms: float  # median milliseconds of one forward pass of `batch` samples
    batch: int
    repeats: int

    def columns(self) -> dict[str, float | int | str]:
        """The result columns: latency_ms (batch 1), latency_batch_ms, latency_batch,
        latency_repeats, latency_device."""
        return {f"latency_{k}" if k != "batch1_ms" else "latency_ms": v
                for k, v in asdict(self).items()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_model()}, {torch.get_num_threads()} threads"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def measure_latency(model: nn.Module, input_shape: tuple[int, ...],
                    device: torch.device | str | None = None, batch: int = BATCH,
                    warmup: int = WARMUP, repeats: int = REPEATS,
                    dtype: torch.dtype = torch.float32) -> Latency:
    """Median forward-pass time of `model` on random inputs of shape (n, *input_shape), in
    eval mode (its training mode is restored afterwards). The model is moved to `device`
    (default: where it is) and, unless float32, to `dtype`."""
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"latency needs batch >= 1, repeats >= 1, warmup >= 0; got "
                         f"{batch}, {repeats}, {warmup}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        model.to(device)
        if dtype != torch.float32:
            model.to(dtype)

        def inputs(n: int) -> torch.Tensor:
            return torch.randn(n, *input_shape, device=device, dtype=dtype)

        single = _median_ms(model, inputs(1), warmup, repeats)
        many = single if batch == 1 else _median_ms(model, inputs(batch), warmup, repeats)
    finally:
        model.train(was_training)
    name = device_name(device) + ("" if dtype == torch.float32 else f", {dtype}")
    return Latency(name, single, many, batch, repeats)


def _median_ms(model: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> float:
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            _sync(x.device)
            start = time.perf_counter()
            model(x)
            _sync(x.device)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
