"""Checkpoints: architecture description + weights, loadable with torch.load(weights_only=True).

A pruned model is rebuilt by constructing the registered architecture and resizing every
Conv2d / Linear / BatchNorm to the shapes stored in the state dict; no module is pickled.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ccpcsa import storage
from ccpcsa.models import build_model

FORMAT = "ccpcsa-checkpoint/1"


class CheckpointError(ValueError):
    pass


@dataclass
class CheckpointInfo:
    model: str
    num_classes: int
    with_bam: bool
    input_shape: tuple[int, int, int]
    dataset: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # accuracy, flops, params, ...
    extra: dict[str, Any] = field(default_factory=dict)  # round, widths, config: plain data


def to_payload(model: nn.Module, info: CheckpointInfo) -> dict[str, Any]:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {
        "format": FORMAT,
        "model": info.model,
        "num_classes": info.num_classes,
        "with_bam": info.with_bam,
        "input_shape": list(info.input_shape),
        "dataset": info.dataset,
        "metrics": dict(info.metrics),
        "extra": info.extra,
        "state_dict": state,
    }


def save_checkpoint(model: nn.Module, info: CheckpointInfo, path: str) -> str:
    buf = io.BytesIO()
    torch.save(to_payload(model, info), buf)
    storage.write_bytes(path, buf.getvalue())
    return path


def read_payload(path: str) -> dict[str, Any]:
    try:
        raw = storage.read_bytes(path)
    except (OSError, FileNotFoundError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {exc}") from None
    payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a ccpcsa checkpoint (expected format {FORMAT})")
    return payload


def info_of(payload: dict[str, Any]) -> CheckpointInfo:
    return CheckpointInfo(
        model=payload["model"],
        num_classes=int(payload["num_classes"]),
        with_bam=bool(payload["with_bam"]),
        input_shape=tuple(payload["input_shape"]),
        dataset=payload.get("dataset", ""),
        metrics=dict(payload.get("metrics", {})),
        extra=dict(payload.get("extra", {})),
    )


def model_from_payload(payload: dict[str, Any]) -> nn.Module:
    model = build_model(payload["model"], int(payload["num_classes"]), payload["with_bam"])
    state = payload["state_dict"]
    resize_to_state_dict(model, state)
    model.load_state_dict(state)
    return model.eval()


def load_checkpoint(path: str) -> nn.Module:
    """Rebuild the (pruned) model stored at path, eval-ready, on the CPU."""
    return model_from_payload(read_payload(path))


def resize_to_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        weight = state.get(prefix + "weight")
        if isinstance(module, nn.Conv2d) and weight is not None:
            depthwise = module.groups > 1 and module.groups == module.in_channels
            module.out_channels = weight.shape[0]
            if depthwise:
                module.groups = weight.shape[0]
            module.in_channels = weight.shape[1] * module.groups
        elif isinstance(module, nn.Linear) and weight is not None:
            module.out_features, module.in_features = weight.shape
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            mean = state.get(prefix + "running_mean")
            module.num_features = (mean if mean is not None else weight).shape[0]
        else:
            continue
        for pname, tensor in list(module.named_parameters(recurse=False)):
            new = state.get(prefix + pname, tensor)
            setattr(module, pname, nn.Parameter(torch.empty_like(new)))
        for bname, tensor in list(module.named_buffers(recurse=False)):
            new = state.get(prefix + bname, tensor)
            setattr(module, bname, torch.empty_like(new))
