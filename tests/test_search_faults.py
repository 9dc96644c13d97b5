"""A search under faults (issue 26), with real Ray, Tune and Optuna on 127.0.0.1:

- SIGTERM (ray job stop, Kubernetes) ends a running search like Ctrl-C: exit 143, the
  per-trial summary, the frontier of what finished, the --resume command.
- A full disk (a real 5.6 MB tmpfs; skipped where none can be mounted) ends the search in one
  line with the summary and the resume command, keeps the failed trial's cause, and once there
  is room `--resume --retry-failed` runs the failed trial again, even when the disk cut Tune's
  state short.
(A planted tuner.pkl, never unpickled by --resume: tests/test_search.py, the Ctrl-C test.)
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
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
    _finished,
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
            while not _finished(run_dir):
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


# --------------------------------------------------------------------------- 3, 4. full disk

@pytest.fixture
def small_disk():
    folder = Path(tempfile.mkdtemp(prefix="i26-disk-", dir="/tmp"))
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5600k", "tmpfs", str(folder)],
                           capture_output=True)
    if mount.returncode:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
        shutil.rmtree(folder, ignore_errors=True)


DISK_ARGS = ["--num-samples", "3", "--max-concurrent-trials", "1", "--max-rounds", "1",
             "--baseline-epochs", "1", "--attention-epochs", "1", "--image-size", "8",
             "--calibration-batches", "1"]


def test_a_full_disk_loses_nothing_and_retry_failed_reruns_the_failed_trial(small_disk,
                                                                             tmp_path):
    args = ["--storage", str(small_disk), "--name", "d1", *DISK_ARGS]
    with _ray_processes("disk-a") as (marker, ray_tmp):
        first = _search(args, _env(marker, ray_tmp), tmp_path / "full.log")
    out = _driver_lines(first.stdout)
    assert first.returncode == 1, _tail(out)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--resume" in errors[0], _tail(out)
    # what follows Tune's run (from the line saying why it stopped) is ours: no traceback;
    # before it, Ray may print the trial's own (docs/reliability.md: not promised)
    ours = out.split("search: ")[-1].split("Trial status:")[-1].split("Ray Tune failed: ")[-1]
    assert "Traceback (most recent call last)" not in ours, _tail(out)
    counts = _summary_counts(out)
    # the trial the disk stopped is failed, with its cause, when its end reached the disk;
    # when the disk took even that, it counts as not started: the resume owes it either way
    assert counts["finished"] < 3 and counts["failed"] + counts["not started"] >= 1, _tail(out)
    failed = [line for line in out.splitlines() if line.startswith("failed: ")]
    assert all("No space left on device" in line for line in failed), failed
    if failed:
        assert "--resume --retry-failed" in errors[0], errors[0]

    # room again (the same folder, larger): the failed trial runs again, nothing else
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    finished = sorted(p.name for p in (small_disk / "d1").glob("run_trial_*")
                      if (p / "result.json").is_file() and b'"is_final": true' in
                      (p / "result.json").read_bytes())
    with _ray_processes("disk-b") as (marker, ray_tmp):
        done = _search(["--storage", str(small_disk), "--name", "d1", "--resume",
                        "--retry-failed"], _env(marker, ray_tmp), tmp_path / "retry.log")
    assert done.returncode == 0, _tail(done.stdout)
    counts = _summary_counts(done.stdout)
    assert counts["failed"] == 0 and counts["finished"] == 3, _tail(done.stdout)
    assert (small_disk / "d1" / "frontier.parquet").is_file()
    for name in finished:  # kept, not run again
        assert (small_disk / "d1" / name / "result.json").is_file()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
