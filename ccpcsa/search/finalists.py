"""Phase 2 of a two-phase search: which screened schedules are fine-tuned (--finalists K).

"On or near the screened frontier", precisely: every round a finished screening trial
reported is a screened point (accuracy after BatchNorm re-estimation, FLOPs). The points are
sorted into Pareto layers: layer 1 is their frontier, layer 2 the frontier of what is left
once layer 1 is removed, and so on. A schedule's layer is the best layer of its points; the
finalists are the K schedules of the lowest layers (layer 1: on the screened frontier), and
within the layer where K is reached, those whose screened points dominate the largest area
(hypervolume against the baseline's FLOPs and 0 % accuracy), then the earlier trial.

The choice is saved once, when phase 1 is complete, to <run>/finalists.json; a resumed
search fine-tunes exactly those schedules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ccpcsa import storage
from ccpcsa.search.ondisk import TrialOnDisk
from ccpcsa.search.pareto import hypervolume, pareto_mask

FINALISTS_FILE = "finalists.json"
SCREENED_TRIAL = "screened_trial"  # phase-2 trials carry the id of the schedule's screen trial


@dataclass(frozen=True)
class Finalist:
    screened_trial: str  # trial id of the schedule in phase 1
    params: dict[str, Any]  # the schedule (what Optuna sampled)
    layer: int  # Pareto layer of its best screened point (1 = on the screened frontier)
    hypervolume: float  # area its screened points dominate


def pareto_layers(accuracy: np.ndarray, flops: np.ndarray) -> np.ndarray:
    """1-based non-dominated sorting layer of each point (maximise accuracy, minimise FLOPs)."""
    layers = np.zeros(len(accuracy), dtype=int)
    left = np.arange(len(accuracy))
    layer = 1
    while left.size:
        front = pareto_mask(accuracy[left], flops[left])
        if not front.any():  # NaN rows: never on a frontier
            break
        layers[left[front]] = layer
        left = left[~front]
        layer += 1
    return layers


def select_finalists(trials: list[TrialOnDisk], count: int, baseline_flops: float
                     ) -> list[Finalist]:
    """The `count` finished screening trials whose points are on or nearest the screened
    frontier (module docstring); fewer if fewer finished."""
    screened = [t for t in trials if t.status == "finished" and t.rounds]
    points = [(i, p["accuracy"], p["flops"]) for i, t in enumerate(screened)
              for p in t.rounds.values()]
    if not points:
        return []
    owner = np.array([i for i, _, _ in points])
    accuracy = np.array([a for _, a, _ in points], dtype=float)
    flops = np.array([f for _, _, f in points], dtype=float)
    layers = pareto_layers(accuracy, flops)
    ranked = []
    for i, trial in enumerate(screened):
        mine = owner == i
        own_layers = layers[mine][layers[mine] > 0]
        if not own_layers.size:
            continue
        area = hypervolume(accuracy[mine], flops[mine], baseline_flops, 0.0)
        ranked.append((int(own_layers.min()), -area, i, trial))
    ranked.sort(key=lambda r: r[:3])
    return [Finalist(trial.trial_id, dict(trial.params), layer, -neg_area)
            for layer, neg_area, _, trial in ranked[:count]]


def save_finalists(run_dir: str, finalists: list[Finalist]) -> None:
    storage.write_json(storage.join(run_dir, FINALISTS_FILE),
                       {"finalists": [asdict(f) for f in finalists]})


def load_finalists(run_dir: str) -> list[Finalist] | None:
    """The saved choice, or None when phase 1 has not completed yet. A damaged file raises
    ValueError naming it (storage.read_json)."""
    path = storage.join(run_dir, FINALISTS_FILE)
    if not storage.exists(path):
        return None
    body = storage.read_json(path)
    try:
        return [Finalist(**f) for f in body["finalists"]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a list of finalists: {exc}") from None


def finalist_config(finalist: Finalist) -> dict[str, Any]:
    """A phase-2 trial's Tune config: the schedule, and where it came from."""
    return {**finalist.params, SCREENED_TRIAL: finalist.screened_trial}
