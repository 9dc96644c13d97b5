"""A running search's frontier, rewritten as its rounds report.

FrontierWriter is a Ray Tune callback on the driver: after a trial reports a round (at most
once per `every_s`, and always when a trial ends) it rewrites frontier.parquet, frontier.png
and frontier/*.pt from every point on disk so far, the same way the search's end does
(collect.write_results, without latency). Every file is replaced atomically (storage.write_bytes),
so `python search/report.py RUN_DIR --follow` or a reader of the Parquet file sees the old
frontier or the new one, never a partial file.
"""

from __future__ import annotations

import logging
import time

from ray.tune import Callback

log = logging.getLogger("ccpcsa.search")


class FrontierWriter(Callback):
    def __init__(self, cfg, prepared, run_dir: str, phase_folders: list[tuple[str, str]],
                 every_s: float = 30.0) -> None:
        self.cfg, self.prepared, self.run_dir = cfg, prepared, run_dir
        self.phase_folders = phase_folders  # (folder, phase name) of every phase so far
        self.every_s = every_s
        self._last = 0.0

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self.refresh()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.refresh()

    def refresh(self) -> None:
        from ccpcsa.search import collect
        from ccpcsa.search.ondisk import scan_trials

        self._last = time.monotonic()
        try:
            trials = [t for folder, phase in self.phase_folders
                      for t in scan_trials(folder, phase)]
            collect.write_results(trials, self.cfg, self.prepared, self.run_dir)
        except Exception as exc:  # watching must never stop the search
            log.warning("could not rewrite the frontier so far: %s", exc)
