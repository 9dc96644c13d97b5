"""A failed trial's cause, kept even when the disk is full.

Tune writes a failed trial's error to error.txt, which a full disk leaves empty. So each trial
reserves FAILURE_FILE (FAILURE_BYTES of blanks) in its folder when it starts, while there is
room, and on failure writes its cause over those blanks: overwriting bytes already on disk
needs no new space. Only for local storage (object stores do not fill up).
"""

from __future__ import annotations

import errno
import os

from ccpcsa import storage
from ccpcsa.exits import one_line

FAILURE_FILE = "failure.txt"
FAILURE_BYTES = 2048
PROBE_FILE = ".ccpcsa-space-probe"
PROBE_BYTES = 64 * 1024


def reserve(trial_dir: str) -> None:
    """Reserve the space for a cause; a trial that Tune starts again (after a failure) blanks
    the earlier cause out in place: only the latest attempt's failure counts."""
    path = _local(trial_dir)
    if path is None:
        return
    try:
        with open(path, "r+b" if os.path.exists(path) else "wb") as f:
            f.write(b" " * FAILURE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError:  # already full: nothing reserved, Tune's error.txt is all there is
        _remove(path)


def record(trial_dir: str, exc: BaseException) -> None:
    """Write `exc`'s one-line cause over the reserved blanks; never raises."""
    path = _local(trial_dir)
    if path is None or not os.path.exists(path):
        return
    text = f"{type(exc).__name__}: {one_line(exc)}".encode(errors="replace")
    try:
        with open(path, "r+b") as f:
            f.write(text[:FAILURE_BYTES - 1].ljust(FAILURE_BYTES - 1) + b"\n")
    except OSError:
        pass


def full_disk(folder: str) -> str:
    """A one-line note when the local disk under `folder` has no room left now (a probe write
    fails with ENOSPC), else "": a fault that cut Tune's own files short names no cause of
    its own (a truncated pickle), and this says what is behind it."""
    path = storage.local_path(folder) if folder else None
    if path is None or not os.path.isdir(path):
        return ""
    probe = os.path.join(path, PROBE_FILE)
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            return f"No space left on device in {path}"
        return ""
    finally:
        _remove(probe)
    return ""


def _local(trial_dir: str) -> str | None:
    folder = storage.local_path(trial_dir) if trial_dir else None
    return os.path.join(folder, FAILURE_FILE) if folder else None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
