"""A search under faults (issue 26), with real Ray, Tune and Optuna on 127.0.0.1:

- SIGTERM (ray job stop, Kubernetes) ends a running search like Ctrl-C: exit 143, the
  per-trial summary, the frontier of what finished, the --resume command.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_search import (
    REPO,
    RUN_PY,
    SEARCH_TIMEOUT_S,
    TINY,
    _driver_lines,
    _env,
    _experiment_state,
    _ray_processes,
    _search,
    _stop,
    _summary_counts,
    _tail,
)


def _signal_once_a_trial_finished(args: list[str], run_dir: Path, log: Path, prefix: str,
                                  sig: int) -> subprocess.Popen:
    """Start a search, send `sig` once Tune records a finished trial, wait for it to end."""
    with _ray_processes(prefix) as (marker, ray_tmp):
        with log.open("w") as out:
            driver = subprocess.Popen([sys.executable, RUN_PY, *args], cwd=REPO,
                                      env=_env(marker, ray_tmp), stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + SEARCH_TIMEOUT_S
            while not any(v["status"] == "TERMINATED"
                          for v in (_experiment_state(run_dir) or {}).values()):
                assert driver.poll() is None, _tail(log.read_text())
                assert time.monotonic() < deadline, _tail(log.read_text())
                time.sleep(0.2)
            driver.send_signal(sig)
            driver.wait(timeout=SEARCH_TIMEOUT_S)
        finally:
            _stop(marker, driver)
    return driver


# --------------------------------------------------------------------------- 5. SIGTERM

def test_sigterm_ends_a_running_search_like_ctrl_c(tmp_path):
    storage = tmp_path / "runs"
    args = ["--storage", str(storage), "--name", "term", "--num-samples", "3",
            "--max-concurrent-trials", "1", *TINY]
    log = tmp_path / "first.log"
    driver = _signal_once_a_trial_finished(args, storage / "term", log, "term-a",
                                           signal.SIGTERM)
    first = log.read_text()
    assert driver.returncode == 143, _tail(first)
    counts = _summary_counts(first)
    assert counts["finished"] >= 1, _tail(first)
    assert "--resume" in first and "SIGTERM received" not in first, _tail(first)
    assert "Traceback" not in _driver_lines(first.split("search: ")[-1]), _tail(first)
    assert (storage / "term" / "frontier.parquet").is_file()
    with _ray_processes("term-b") as (marker, ray_tmp):
        done = _search(["--storage", str(storage), "--name", "term", "--resume"],
                       _env(marker, ray_tmp), tmp_path / "resumed.log")
    assert done.returncode == 0, _tail(done.stdout)
    assert _summary_counts(done.stdout)["finished"] == 3, _tail(done.stdout)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
