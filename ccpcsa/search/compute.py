"""What a trial costs: measured compute seconds, reported with every round.

- A trial that trains in its own process on CPUs: CPU-seconds of that process (every thread:
  torch's intra-op threads included) and of its finished child processes (DataLoader workers),
  from the operating system's accounting (time.process_time, getrusage).
- A trial on GPUs, or one that drives Ray Train workers: wall-clock seconds times the GPUs
  (or, without GPUs, the CPUs) it holds: what a cluster bills, busy or not.

Stage 0 is shared by every trial and not counted in any trial.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

UNITS = ("cpu", "gpu")


@dataclass
class ComputeMeter:
    """Seconds of compute since `start()`, plus `offset` (a trial continued from a checkpoint
    carries on from the compute that checkpoint recorded)."""

    workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    offset: float = 0.0
    _started_wall: float = 0.0
    _started_cpu: float = 0.0

    @property
    def unit(self) -> str:
        return "gpu" if self.gpus_per_worker else "cpu"

    @property
    def measured_in_process(self) -> bool:
        return self.unit == "cpu" and self.workers == 1

    def start(self) -> ComputeMeter:
        self._started_wall = time.perf_counter()
        self._started_cpu = _process_cpu_seconds()
        return self

    def seconds(self) -> float:
        if self.measured_in_process:
            return self.offset + _process_cpu_seconds() - self._started_cpu
        held = self.workers * (self.gpus_per_worker or self.cpus_per_worker)
        return self.offset + (time.perf_counter() - self._started_wall) * held


def _process_cpu_seconds() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime
