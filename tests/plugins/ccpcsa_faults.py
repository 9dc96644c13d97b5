"""Fault injection for the tests, kept out of the product: the tests put this folder first on
PYTHONPATH of the processes they start (a search's driver, the Ray it starts, its workers), so
every one of them imports sitecustomize.py, which calls install(). install() does nothing
unless a fault variable is set; then it patches the product's functions as their modules are
imported in that process:

- CCPCSA_FAIL_TRIALS="1,3": ccpcsa.search.trial.run_trial raises in the trials Tune numbered 1 and 3
  (the N of the trial folder run_trial_<id>_N_...; Tune's own retry of a trial keeps its
  number, so it fails again).
- CCPCSA_KILL_WORKER="RANK:EPOCH:BATCH:MARKER": the Ray Train worker of that rank SIGKILLs
  itself at that batch of that epoch, once (the MARKER file records that it happened).
  "@FILE" reads that spec from FILE at every epoch (absent or empty: no kill), for a Ray
  started before the test chose its spec.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

FAIL_TRIALS = "CCPCSA_FAIL_TRIALS"
KILL_WORKER = "CCPCSA_KILL_WORKER"
PLUGINS = os.path.dirname(os.path.abspath(__file__))


def env_with_plugins(env: dict[str, str]) -> dict[str, str]:
    """`env` with this folder first on PYTHONPATH."""
    paths = [PLUGINS, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    return {**env, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def install() -> None:
    patches: dict[str, Callable[[ModuleType], None]] = {}
    if os.environ.get(FAIL_TRIALS):
        patches["ccpcsa.search.trial"] = _fail_trials
    if os.environ.get(KILL_WORKER):
        patches["ccpcsa.distributed.worker"] = _kill_worker
    if patches:
        sys.meta_path.insert(0, _PatchOnImport(patches))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the patched modules as Python would, and patches each right after it runs."""

    def __init__(self, patches: dict[str, Callable[[ModuleType], None]]) -> None:
        self.patches = patches

    def find_spec(self, name: str, path: Any = None, target: Any = None):
        patch = self.patches.get(name)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, patch: Callable[[ModuleType], None]) -> None:
        self.inner, self.patch = inner, patch

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        self.patch(module)


# --------------------------------------------------------------------------- failing trials


def _fail_trials(module: ModuleType) -> None:
    numbers = {int(n) for n in os.environ[FAIL_TRIALS].replace(",", " ").split()}
    run_trial = module.run_trial

    def failing_run_trial(params, settings):
        from ray import tune

        context = tune.get_context()
        trial_id = context.get_trial_id()
        found = re.search(rf"_{re.escape(trial_id)}_(\d+)(?:_|$)",
                          os.path.basename(context.get_trial_dir().rstrip("/")))
        if found and int(found.group(1)) in numbers:
            raise RuntimeError(f"injected failure in trial {found.group(1)} ({trial_id}; "
                               f"{FAIL_TRIALS})")
        return run_trial(params, settings)

    module.run_trial = failing_run_trial


# --------------------------------------------------------------------------- killed workers


def _kill_worker(module: ModuleType) -> None:
    epoch_batches = module.TrainSource.epoch

    def killing_epoch(source, epoch: int, stream=None) -> Iterator:
        batches = epoch_batches(source, epoch, stream)
        spec = _kill_spec()
        if not spec:
            yield from batches
            return
        rank, at_epoch, at_batch, marker = spec.split(":", 3)
        armed = (source.rank == int(rank) and epoch == int(at_epoch)
                 and not os.path.exists(marker))
        for i, batch in enumerate(batches):
            if armed and i == int(at_batch):
                with open(marker, "w") as f:
                    f.write(f"killed rank {source.rank} in epoch {epoch} at batch {i}\n")
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    module.TrainSource.epoch = killing_epoch


def _kill_spec() -> str:
    spec = os.environ.get(KILL_WORKER, "")
    if not spec.startswith("@"):
        return spec
    try:
        with open(spec[1:]) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""
