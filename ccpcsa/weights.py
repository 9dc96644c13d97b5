"""Trained weights to start from (`--weights`): a local file or URI, or a torchvision weights
name (`ResNet50_Weights.IMAGENET1K_V2`) looked up in the local torch hub cache, never
downloaded. Files are read with torch.load(weights_only=True): plain data, no pickled code.

Accepted files: a plain state_dict (torchvision's format), a training checkpoint holding one
under `state_dict` or `model` (a `module.` prefix from DataParallel/DDP is dropped), or a
ccpcsa checkpoint of a model without BAM (baseline.pt, final_nobam.pt; pruned widths too).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
from typing import Any

import torch
from torch import nn

from ccpcsa import storage
from ccpcsa.exits import first_sentence

ENUM_NAME = re.compile(r"^[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+$")
# keys torchvision's files hold for auxiliary heads that ccpcsa builds without (models.py)
_AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")


class WeightsError(ValueError):
    pass


def hub_checkpoints_dir() -> str:
    """Where torchvision caches downloaded weights: $TORCH_HOME/hub/checkpoints (default
    ~/.cache/torch/hub/checkpoints)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def resolve(source: str) -> str:
    """The file behind `source` (a path, a URI or a torchvision weights name); WeightsError
    saying where it looked when there is none."""
    if ENUM_NAME.match(source) and not os.path.exists(source):
        import torchvision

        try:
            weights = torchvision.models.get_weight(source)
        except (ValueError, KeyError, AttributeError):
            raise WeightsError(f"{source!r} is not a torchvision weights name (e.g. "
                               f"ResNet50_Weights.IMAGENET1K_V2) nor an existing file") from None
        path = os.path.join(hub_checkpoints_dir(), os.path.basename(weights.url))
        if not os.path.exists(path):
            raise WeightsError(
                f"weights {source} are not in the local torch hub cache: no {path} (ccpcsa "
                f"never downloads; fetch it where there is network, e.g. torchvision.models."
                f"get_weight({source!r}).get_state_dict(), and copy the file there or set "
                f"TORCH_HOME)")
        return path
    if not storage.exists(source):
        where = source if storage.is_uri(source) else os.path.abspath(source)
        raise WeightsError(f"weights file not found: {where}")
    return source


def sha256(source: str) -> str:
    return hashlib.sha256(storage.read_bytes(resolve(source))).hexdigest()


def read_state_dict(source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state_dict, the ccpcsa checkpoint payload or None) of the file behind `source`."""
    from ccpcsa.checkpoint import FORMAT

    path = resolve(source)
    raw = storage.read_bytes(path)
    try:
        data = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors of a non-weights file, truncated files...
        raise WeightsError(f"cannot read weights {path} with torch.load(weights_only=True): "
                           f"{first_sentence(exc)} ({_hint(exc, raw)})") from None
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return data["state_dict"], data
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not data or not all(
            isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"{path} holds no state_dict: expected a dict of tensors, or one "
                           f"under the key 'state_dict' or 'model'")
    if all(k.startswith("module.") for k in data):
        data = {k[len("module."):]: v for k, v in data.items()}
    return data, None


def load_weights(model: nn.Module, source: str, classifier: nn.Module, dataset: str
                 ) -> nn.Module:
    """Load `source` into `model` (a fresh model without BAM, built by ccpcsa with the data
    set's classes; `classifier` is its layer whose outputs are the classes); the model is
    returned, resized first when `source` is a pruned ccpcsa checkpoint."""
    from ccpcsa.checkpoint import check_runs, resize_to_state_dict

    state, payload = read_state_dict(source)
    name = getattr(model, "ccpcsa_model", type(model).__name__)
    if payload is not None:
        if payload["model"] != name:
            raise WeightsError(f"{source} is a ccpcsa checkpoint of {payload['model']}, not of "
                               f"--model {name}")
        if payload["with_bam"]:
            raise WeightsError(f"{source} holds a model with BAM; --weights takes one without "
                               f"(a run's baseline.pt or final_nobam.pt)")
        try:
            resize_to_state_dict(model, state)
        except ValueError as exc:
            raise WeightsError(f"weights {source} do not fit --model {name}: {exc}") from None
    state = {k: v for k, v in state.items() if not k.startswith(_AUX_PREFIXES)}
    path = next(name for name, module in model.named_modules() if module is classifier)
    _check_classes(model, state, source, path, dataset)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or resized:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if resized:
            k = resized[0]
            problems.append(f"{len(resized)} of another shape (e.g. {k}: "
                            f"{_shape(state[k])} in the file, {_shape(expected[k])} in {name})")
        raise WeightsError(f"weights {source} do not fit --model {name} (another "
                           f"architecture?): tensors {'; '.join(problems)}")
    model.load_state_dict(state)
    if payload is not None:  # resized: do the sizes fit together?
        try:
            check_runs(model, tuple(payload["input_shape"]))
        except ValueError as exc:
            raise WeightsError(f"weights {source} do not fit --model {name}: {exc}") from None
    return model


def _hint(exc: BaseException, raw: bytes) -> str:
    """What to do about a file torch.load(weights_only=True) could not read."""
    text = str(exc)
    # torch.save writes a zip archive, whose directory is at its end
    cut_zip = raw.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(io.BytesIO(raw))
    if cut_zip or isinstance(exc, EOFError) or not raw:
        return "the file is cut short or damaged: copy or download it again"
    if "Weights only load failed" in text or "Unsupported global" in text:
        return "it holds objects, not only tensors: save model.state_dict(), not the model"
    return "expected a file torch.save wrote with a state_dict"


def _check_classes(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                   classifier: str, dataset: str) -> None:
    key = f"{classifier}.weight" if classifier else "weight"
    if key not in state:
        return  # another architecture: the key check reports it
    have = int(state[key].shape[0])
    want = int(model.state_dict()[key].shape[0])
    if have != want:
        raise WeightsError(f"weights {source} classify into {have} classes ({key}: "
                           f"{_shape(state[key])}), the data set {dataset} has {want}; "
                           f"replace the classifier and fine-tune it first, or use weights "
                           f"trained on this data")


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape))
