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
from ccpcsa.models import build_model, get_spec

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
    """The checkpoint's plain-data payload; CheckpointError naming the file if it is missing,
    unreadable, truncated, not a torch file, or not in this format."""
    try:
        raw = storage.read_bytes(path)
    except (OSError, FileNotFoundError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {exc}") from None
    if not raw:
        raise CheckpointError(f"{path!r} is empty, not a checkpoint")
    try:
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, KeyError..
        raise CheckpointError(f"{path!r} is not a readable checkpoint (truncated, or not a "
                              f"file torch.save wrote): {_one_line(exc)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a ccpcsa checkpoint (expected format {FORMAT})")
    missing = [k for k in _PAYLOAD_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path!r} lacks {', '.join(missing)}: not a complete checkpoint")
    if not isinstance(payload["state_dict"], dict):
        raise CheckpointError(f"{path!r}: state_dict is a {type(payload['state_dict']).__name__}"
                              ", not a dict of tensors")
    return payload


_PAYLOAD_KEYS = ("model", "num_classes", "with_bam", "input_shape", "state_dict")


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


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


def model_from_payload(payload: dict[str, Any], source: str = "checkpoint") -> nn.Module:
    """The model a payload describes; CheckpointError naming `source` when the weights do not
    fit the architecture (another model, other classes, missing or extra layers)."""
    try:
        model = build_model(payload["model"], int(payload["num_classes"]), payload["with_bam"])
        state = payload["state_dict"]
        resize_to_state_dict(model, state)
        model.load_state_dict(state)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: the weights do not fit a {payload.get('model')!r} "
                              f"model: {_one_line(exc)}") from None
    classes = get_spec(payload["model"]).classifier(model).out_features
    if classes != int(payload["num_classes"]):
        raise CheckpointError(f"{source}: num_classes is {payload['num_classes']} but the "
                              f"classifier's weights have {classes} outputs")
    return model.eval()


def load_checkpoint(path: str) -> nn.Module:
    """Rebuild the (pruned) model stored at path, eval-ready, on the CPU; CheckpointError
    naming the file when it cannot (see read_payload and model_from_payload)."""
    return model_from_payload(read_payload(path), source=repr(path))


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
