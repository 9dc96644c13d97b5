"""What a run writes: per-round rows, the printed table, config + versions."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from dataclasses import asdict
from typing import Any

import pyarrow as pa

from ccpcsa import storage
from ccpcsa.flops import human
from ccpcsa.loop import RoundRecord

_PACKAGES = ("ccpcsa", "torch", "torchvision", "torch-pruning", "ray", "optuna", "numpy",
             "pyarrow")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def record_row(record: RoundRecord, baseline_flops: int, baseline_params: int,
               checkpoint: str = "") -> dict[str, Any]:
    row = asdict(record)
    row["widths"] = json.dumps(record.widths, sort_keys=True)
    row["flops_reduction"] = 100.0 * (1 - record.flops / baseline_flops)
    row["params_reduction"] = 100.0 * (1 - record.params / baseline_params)
    row["checkpoint"] = checkpoint
    return row


def write_rows(rows: list[dict[str, Any]], path: str) -> None:
    storage.write_bytes(path, storage.parquet_bytes(pa.Table.from_pylist(rows)))


def table_header() -> str:
    return (f"{'round':>5} {'pruned %':>8} {'acc %':>7} {'Δacc':>6} {'FLOPs':>9} {'FLOPs↓':>7} "
            f"{'params':>8} {'params↓':>8} {'removed':>7}  status")


def table_line(row: dict[str, Any], reference_accuracy: float) -> str:
    status = "ok" if row["within_tolerance"] else "over tolerance"
    pruned = row.get("accuracy_pruned")
    pruned_text = "" if pruned is None else f"{pruned:.2f}"
    return (f"{row['round']:>5} {pruned_text:>8} {row['accuracy']:>7.2f} "
            f"{row['accuracy'] - reference_accuracy:>+6.2f} {human(row['flops']):>9} "
            f"{row['flops_reduction']:>6.1f}% {human(row['params']):>8} "
            f"{row['params_reduction']:>7.1f}% {row['removed']:>7}  {status}")


def write_config(path: str, config: dict[str, Any], seed: int) -> None:
    body = {"config": config, "seed": seed, "versions": versions()}
    storage.write_json(path, body)
