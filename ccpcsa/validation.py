"""Checks shared by every entry point's settings (the prune CLI, SearchConfig from flags, YAML
or a saved run): each raises SettingError naming the setting and the bad value, in one line.

Numbers must be real numbers of the right kind (a bool, a string, NaN or infinity is refused
everywhere); names must be plain folder names; storage locations local paths or URIs of a
scheme pyarrow.fs (and so Ray's storage) can open.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from ccpcsa import storage

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+@-]*$")


class SettingError(ValueError):
    """A bad setting; the message names it and the value."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def whole(name: str, value: Any, low: int | None = None) -> int:
    """An int (not a bool, not 2.0) >= low."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingError(f"{name} must be a whole number, got {value!r}")
    if low is not None and value < low:
        raise SettingError(f"{name} must be >= {low}, got {value}")
    return value


def number(name: str, value: Any, *, low: float | None = None, above: float | None = None,
           below: float | None = None, high: float | None = None) -> float:
    """A finite int or float within the given bounds (low/high inclusive, above/below not)."""
    if not _is_number(value) or not math.isfinite(value):
        raise SettingError(f"{name} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise SettingError(f"{name} must be >= {low}, got {value}")
    if above is not None and value <= above:
        raise SettingError(f"{name} must be > {above}, got {value}")
    if below is not None and value >= below:
        raise SettingError(f"{name} must be < {below}, got {value}")
    if high is not None and value > high:
        raise SettingError(f"{name} must be <= {high}, got {value}")
    return float(value)


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SettingError(f"{name} must be true or false, got {value!r}")
    return value


def text(name: str, value: Any, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise SettingError(f"{name} must be a non-empty string, got {value!r}")
    if "\0" in value:
        raise SettingError(f"{name} must not contain a NUL character, got {value!r}")
    return value


def choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise SettingError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
    return value


MAX_RUN_NAME = 128  # file systems allow 255 bytes a folder name; Tune adds to it in places


def run_name(name: str, value: Any) -> str:
    """A plain folder name of at most MAX_RUN_NAME characters: letters, digits and
    . _ = + @ -, starting with a letter or digit (so never '.', '..', a hidden name or one
    with a path separator)."""
    text(name, value)
    if len(value) > MAX_RUN_NAME:
        raise SettingError(f"{name} is {len(value)} characters long; at most {MAX_RUN_NAME}, "
                           f"got {value[:20]!r}...")
    if not NAME_PATTERN.match(value):
        raise SettingError(
            f"{name} must be a plain folder name (letters, digits, . _ = + @ -, starting with "
            f"a letter or digit), got {value!r}")
    return value


def location(name: str, value: Any) -> str:
    """A local path or a URI whose scheme pyarrow.fs can open (nothing is touched)."""
    text(name, value)
    if storage.is_uri(value):
        scheme = storage.scheme_of(value)
        if scheme not in storage.URI_SCHEMES:
            raise SettingError(f"{name} {value!r} has an unknown URI scheme {scheme + '://'!r}; "
                               f"use a local path or one of "
                               f"{', '.join(s + '://' for s in storage.URI_SCHEMES)}")
        if not value.split("://", 1)[1].strip("/"):
            raise SettingError(f"{name} {value!r} names no bucket or folder")
    return value


def pair(name: str, value: Any, kind: type = float) -> tuple[float, float]:
    """[low, high] of finite numbers (whole numbers when kind is int), low <= high."""
    if not isinstance(value, list | tuple) or len(value) == 0:
        raise SettingError(f"{name} is empty; give [low, high]")
    if len(value) != 2 or not all(_is_number(v) for v in value):
        raise SettingError(f"{name} must be two numbers [low, high], got {value!r}")
    if not all(math.isfinite(v) for v in value):
        raise SettingError(f"{name} must be finite numbers, got {value!r}")
    if kind is int and not all(float(v).is_integer() for v in value):
        raise SettingError(f"{name} must be whole numbers, got {value!r}")
    if value[0] > value[1]:
        raise SettingError(f"{name} has low > high: {value!r}")
    return value[0], value[1]


def per_worker_batch(batch_size: int, workers: int, batch_name: str = "batch_size") -> None:
    """The global batch splits into `workers` equal batches of at least 2 (BatchNorm needs 2)."""
    if batch_size % workers or batch_size // workers < 2:
        raise SettingError(f"{batch_name} {batch_size} must split into {workers} equal "
                           f"per-worker batches of at least 2")


def gpus(name: str, value: Any) -> float | None:
    """None (decide from the cluster), a fraction below 1, or a whole number of GPUs (Ray
    refuses 1.5)."""
    if value is None:
        return None
    amount = number(name, value, low=0)
    if amount > 1 and not amount.is_integer():
        raise SettingError(f"{name} must be a fraction below 1 or a whole number, got {value}")
    return amount


def device(value: str | None) -> None:
    """cpu, cuda, cuda:N (N below the number of GPUs here), mps..., as torch understands it."""
    if value is None:
        return
    import torch

    try:
        parsed = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise SettingError(f"unknown device {value!r}; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError(f"device {value!r} requested but CUDA is not available")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise SettingError(f"device {value!r}: this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s)")
