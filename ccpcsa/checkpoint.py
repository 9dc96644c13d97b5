"""Checkpoints: architecture description + weights, loadable with torch.load(weights_only=True).

A pruned model is rebuilt by constructing its architecture again from the name it records
(a registry name, `torchvision:NAME` or `module:callable`), inserting BAM where it records,
and resizing every layer whose stored tensors have other shapes (Conv2d incl. depthwise and
grouped, Linear, BatchNorm, LayerNorm, GroupNorm, PReLU, and plain parameters such as
ConvNeXt's layer scale); no module is pickled.

A checkpoint that names `module:callable` would import that module and call it, so such a
name is refused before anything is imported unless the caller trusts it: `trust_model_code`
(`--trust-model-code`), or `user_model`, the --model the user named for this run (the
checkpoints a run writes and reads back name the model the user asked for).
"""

from __future__ import annotations

import collections
import io
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ccpcsa import storage
from ccpcsa.exits import first_sentence
from ccpcsa.models import TORCHVISION, build_model, get_spec, is_registered

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
        # where BAM sits, so a traced model is rebuilt without tracing it again
        "bam_placements": dict(getattr(model, "ccpcsa_bam", {})) if info.with_bam else {},
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
                              f"file torch.save wrote): {type(exc).__name__}: "
                              f"{first_sentence(exc)}") from None
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
    # load_state_dict's message: a header ending in ':', then one line per problem
    text = lines[1] if len(lines) > 1 and lines[0].endswith(":") else "".join(lines[:1])
    return f"{type(exc).__name__}: {text}".rstrip(": ")


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


def check_model_trusted(name: Any, source: str, *, trust_model_code: bool = False,
                        user_model: str | None = None) -> str:
    """`name` if a checkpoint may name it: a registry model, `torchvision:NAME`, or (only when
    trusted) `module:callable`; CheckpointError otherwise. Imports nothing."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{source}: the model name is {name!r}, not a model name")
    if (is_registered(name) or name.startswith(TORCHVISION) or trust_model_code
            or name == user_model):
        return name
    raise CheckpointError(f"{source} names the model {name!r}, code outside ccpcsa and "
                          f"torchvision that loading would import and run; refused (pass "
                          f"--trust-model-code, or trust_model_code=True, only for a file "
                          f"you trust)")


def model_from_payload(payload: dict[str, Any], source: str = "checkpoint", *,
                       trust_model_code: bool = False, user_model: str | None = None
                       ) -> nn.Module:
    """The model a payload describes, rebuilt from the name it records with BAM where it
    records; CheckpointError naming `source` when the name is not trusted (see
    check_model_trusted) or the weights do not fit the architecture (another model, other
    classes, missing or extra layers, tensors of the wrong rank)."""
    name = check_model_trusted(payload.get("model"), source, trust_model_code=trust_model_code,
                               user_model=user_model)
    shape = tuple(payload.get("input_shape") or ()) or None
    shape = shape if shape and all(shape) else None  # traced models need it (models.get_spec)
    try:
        model = build_model(name, int(payload["num_classes"]), payload["with_bam"],
                            input_shape=shape, placements=payload.get("bam_placements") or None)
        state = collections.OrderedDict(payload["state_dict"])
        # the module versions torch keeps beside a state_dict (MNASNet refuses to load without)
        state._metadata = getattr(model.state_dict(), "_metadata", None)
        resize_to_state_dict(model, state)
        model.load_state_dict(state)
        classes = get_spec(name, shape).classifier(model).weight.shape[0]
        if shape is not None:
            check_runs(model, shape)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError,
            IndexError) as exc:
        raise CheckpointError(f"{source}: the weights do not fit a {name!r} model: "
                              f"{_one_line(exc)}") from None
    if classes != int(payload["num_classes"]):
        raise CheckpointError(f"{source}: num_classes is {payload['num_classes']} but the "
                              f"classifier's weights have {classes} outputs")
    return model.eval()


def load_checkpoint(path: str, *, trust_model_code: bool = False,
                    user_model: str | None = None) -> nn.Module:
    """Rebuild the (pruned) model stored at path, eval-ready, on the CPU; CheckpointError
    naming the file when it cannot (see read_payload and model_from_payload). A checkpoint
    naming `module:callable` is refused, nothing imported, unless `trust_model_code` is set
    or it is `user_model` (the --model the user named)."""
    return model_from_payload(read_payload(path), source=repr(path),
                              trust_model_code=trust_model_code, user_model=user_model)


def resize_to_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every module whose stored tensors differ in shape empty tensors of the stored
    shapes, and the attributes (channels, groups, normalized shape) that go with them.
    ValueError naming the tensor when a stored one is not a tensor or has another number of
    dimensions (pruning changes sizes, never ranks)."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        own = {**dict(module.named_parameters(recurse=False)),
               **dict(module.named_buffers(recurse=False))}
        stored = {k: state[prefix + k] for k, t in own.items()
                  if t is not None and prefix + k in state}
        for key, new in stored.items():
            if not isinstance(new, torch.Tensor):
                raise ValueError(f"{prefix}{key} is a {type(new).__name__}, not a tensor")
            if new.dim() != own[key].dim():
                raise ValueError(f"{prefix}{key} has shape {_shape(new)} in the file: "
                                 f"{new.dim()} dimensions where the model has "
                                 f"{own[key].dim()} ({_shape(own[key])})")
        if all(stored[k].shape == own[k].shape for k in stored):
            continue
        for key, new in stored.items():
            if isinstance(own[key], nn.Parameter):
                setattr(module, key, nn.Parameter(torch.empty_like(new),
                                                  requires_grad=own[key].requires_grad))
            else:
                setattr(module, key, torch.empty_like(new))
        _resize_attributes(module)


def check_runs(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Run one zero image through `model` (eval mode, no gradients); ValueError naming the
    layer that fails, e.g. a BatchNorm whose size is not that of the convolution before it:
    shapes that each look right but do not fit together."""
    entered: list[str] = []
    hooks = [module.register_forward_pre_hook(
                 lambda _m, _x, name=name: entered.append(name))
             for name, module in model.named_modules() if not list(module.children())]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    except Exception as exc:
        where = f" in {entered[-1]}" if entered else ""
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise ValueError(f"the layers' sizes do not fit together{where}: "
                         f"{first or type(exc).__name__}") from None
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"


_NORMS_WITH_FEATURES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def _resize_attributes(module: nn.Module) -> None:
    if isinstance(module, nn.modules.conv._ConvNd):
        weight = module.weight
        depthwise = module.groups > 1 and module.groups == module.in_channels
        if module.transposed:  # weight: in x out/groups x k x k
            module.in_channels = weight.shape[0]
            module.out_channels = weight.shape[1] * module.groups
        else:  # weight: out x in/groups x k x k
            if depthwise:  # one filter per channel, before and after pruning
                module.groups = weight.shape[0]
            module.out_channels = weight.shape[0]
            module.in_channels = weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, _NORMS_WITH_FEATURES):
        tensor = module.weight if module.weight is not None else module.running_mean
        module.num_features = tensor.shape[0]
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.GroupNorm) and module.weight is not None:
        module.num_channels = module.weight.shape[0]
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.numel()

