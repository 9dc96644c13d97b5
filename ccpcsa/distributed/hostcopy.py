"""Host -> device copies of a worker's input batches, chosen by IngestConfig.host_copy.

- "ring": Ray Data hands CPU tensors; each is copied into a reused pinned buffer (a ring of
  `slots`, allocated once, so no page-locking per batch) and sent to the device with
  non_blocking=True on a side CUDA stream; the training stream waits on an event, not the host.
- "ray_pin": Ray Data's own placement (iter_torch_batches(pin_memory=True, device=...)): a fresh
  pinned copy of every batch in its collate thread, then the copy to the device.
- "pageable": Ray Data copies to the device straight from pageable host memory.

On the GPU machine a thread pinning every batch afresh halved a plain loop's speed
(docs/benchmarks.md, GPU contention). Measured in the path on an H200 (benchmarks/gpu_verdict.py,
docs/benchmarks.md "GPU verdict"), ResNet-50 + BAM fed by one stream: "ring" 0.90 of the plain
loop, "ray_pin" 0.38, "pageable" 0.28; so "ring" is the default. Without CUDA every mode is a
plain `.to(device)`.
"""

from __future__ import annotations

import torch

HOST_COPIES = ("ring", "ray_pin", "pageable")
DEFAULT_HOST_COPY = "ring"


def check_host_copy(mode: str) -> str:
    if mode not in HOST_COPIES:
        raise ValueError(f"host_copy must be one of {', '.join(HOST_COPIES)}; got {mode!r}")
    return mode


class PinnedRing:
    """Copies named CPU tensors to a CUDA device through `slots` reused pinned buffers on a
    side stream. A slot's buffer is rewritten only after its previous copy finished (its event),
    so up to `slots` copies can be in flight while the training stream computes."""

    def __init__(self, device: torch.device, slots: int = 3) -> None:
        if device.type != "cuda":
            raise ValueError(f"PinnedRing needs a CUDA device, got {device}")
        self.device, self.slots = device, max(int(slots), 2)
        self.stream = torch.cuda.Stream(device)
        self._buffers: list[dict[str, torch.Tensor]] = [{} for _ in range(self.slots)]
        self._events: list[torch.cuda.Event | None] = [None] * self.slots
        self._next = 0

    def __call__(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        slot = self._next
        self._next = (self._next + 1) % self.slots
        done = self._events[slot]
        if done is not None:
            done.synchronize()  # the slot's last copy has left its pinned buffers
        buffers = self._buffers[slot]
        out: dict[str, torch.Tensor] = {}
        with torch.cuda.stream(self.stream):
            for name, t in tensors.items():
                host = self._buffer(buffers, name, t)
                host.copy_(t)
                out[name] = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self._events[slot] = event
        main = torch.cuda.current_stream(self.device)
        main.wait_event(event)
        for t in out.values():
            t.record_stream(main)  # allocated on the side stream, used on the main one
        return out

    @staticmethod
    def _buffer(buffers: dict[str, torch.Tensor], name: str, t: torch.Tensor) -> torch.Tensor:
        flat = buffers.get(name)
        if flat is None or flat.dtype != t.dtype or flat.numel() < t.numel():
            flat = torch.empty(max(t.numel(), 1), dtype=t.dtype, pin_memory=True)
            buffers[name] = flat
        return flat[:t.numel()].view(t.shape)


class HostCopy:
    """What the consumer does with a batch Ray Data delivered: with "ring" on CUDA, the copy to
    the device; otherwise nothing (Ray Data already placed it) beyond moving CPU tensors."""

    def __init__(self, mode: str, device: torch.device, slots: int = 3) -> None:
        self.mode, self.device = check_host_copy(mode), device
        self.ring = PinnedRing(device, slots) if mode == "ring" and device.type == "cuda" else None

    def ray_options(self) -> dict:
        """iter_torch_batches' placement options for this mode."""
        if self.ring is not None:
            return {"device": "cpu", "pin_memory": False}
        return {"device": self.device,
                "pin_memory": self.mode == "ray_pin" and self.device.type == "cuda"}

    def __call__(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.ring is not None:
            return self.ring(tensors)
        return {k: v.to(self.device) for k, v in tensors.items()}
