"""One process per run folder: an exclusive lock file, <run folder>/.ccpcsa.lock.

The lock is created atomically (O_CREAT | O_EXCL) and holds the holder's host, pid, process
start time and a random token. A lock whose holder is gone (same host, pid no longer running
or now another process) is stale: it is removed with a warning and taken. A lock held by a
live process, or by one on another host (whose pid cannot be checked from here), refuses the
second run with "run X is in use by pid N on host H".

Object stores (s3://, gs://) have no atomic create in pyarrow.fs (no If-None-Match): there
the lock is check, write, then read back. It catches a run started while another is running,
but two runs started within the same second may both pass. Local paths, file:// URIs and NFS
(O_EXCL is atomic on NFSv3+) are exact.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from ccpcsa import storage

log = logging.getLogger("ccpcsa.runlock")

LOCK_FILE = ".ccpcsa.lock"
UNREADABLE_GRACE_S = 5.0  # an empty lock file younger than this is being written


class RunInUseError(RuntimeError):
    """Another process holds the run folder."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str  # ISO time the lock was taken
    command: str
    token: str
    process_start: str = ""  # /proc/<pid>/stat start time: tells a reused pid apart

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} ({self.command}, since {self.started})"


def _process_start(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2:].split()[19]


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2] not in "ZX"  # a zombie has exited
    except OSError:
        return True


def is_stale(holder: Holder) -> bool:
    """True when the holder is known to be gone: same host, and its pid is not running or now
    belongs to a process started at another time."""
    if holder.host != socket.gethostname():
        return False
    if not _pid_running(holder.pid):
        return True
    return bool(holder.process_start) and _process_start(holder.pid) not in (
        "", holder.process_start)


class RunLock:
    """with RunLock(run_folder, "prune"): ... — the folder is this process's inside the block."""

    def __init__(self, run_dir: str, command: str) -> None:
        self.run_dir = run_dir
        self.path = storage.join(run_dir, LOCK_FILE)
        self.holder = Holder(socket.gethostname(), os.getpid(),
                             datetime.now(UTC).isoformat(timespec="seconds"),
                             command, secrets.token_hex(8), _process_start(os.getpid()))
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        storage.makedirs(self.run_dir)
        body = json.dumps(asdict(self.holder)).encode()
        local = storage.local_path(self.path)
        for _ in range(5):
            created = (_create_local(local, body) if local is not None
                       else _create_remote(self.path, body, self.holder.token))
            if created:
                self.held = True
                return
            holder = self._current_holder()
            if holder is None:
                continue  # just released, or being written: look again
            if holder.token == self.holder.token:
                self.held = True
                return
            if not is_stale(holder):
                raise RunInUseError(
                    f"run {self.run_dir} is in use by {holder.describe()}; wait for it to end, "
                    f"or if that process is gone, delete {self.path}")
            self._break(holder)
        raise RunInUseError(f"run {self.run_dir}: could not take its lock {self.path} "
                            "(other processes keep taking it)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            holder = _read(self.path)
            if holder is not None and holder.token != self.holder.token:
                log.warning("the lock %s was taken over by %s; leaving it", self.path,
                            holder.describe())
                return
            storage.remove(self.path)
        except OSError as exc:
            log.warning("could not remove the lock %s: %s", self.path, exc)

    def _current_holder(self) -> Holder | None:
        holder = _read(self.path)
        if holder is not None or not storage.exists(self.path):
            return holder
        # An unreadable lock: being written right now, or left half-written by a crash.
        fs, p = storage.resolve(self.path)
        age = time.time() - fs.get_file_info(p).mtime.timestamp()
        if age < UNREADABLE_GRACE_S:
            time.sleep(0.2)
            return None
        log.warning("removing the unreadable lock %s (%.0f s old)", self.path, age)
        storage.remove(self.path)
        return None

    def _break(self, stale: Holder) -> None:
        """Remove a stale lock, making sure it is still the stale one (not a fresh lock that
        another process took in the meantime)."""
        local = storage.local_path(self.path)
        if local is None:
            if (_read(self.path) or stale).token == stale.token:
                storage.remove(self.path)
        else:
            aside = f"{local}.stale-{self.holder.token}"
            try:
                os.rename(local, aside)  # atomic: of two breakers only one gets the file
            except FileNotFoundError:
                return
            moved = _read(aside)
            if moved is not None and moved.token != stale.token:
                try:  # we moved a live lock: put it back unless a new one is already there
                    os.link(aside, local)
                except FileExistsError:
                    pass
            os.unlink(aside)
        log.warning("removed the stale lock of %s from %s: that process is no longer running",
                    stale.describe(), self.run_dir)


def _create_local(path: str, body: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    return True


def _create_remote(path: str, body: bytes, token: str) -> bool:
    if storage.exists(path):
        return False
    storage.write_bytes(path, body)
    time.sleep(0.5)  # a writer that raced us has written by now: the last write wins
    holder = _read(path)
    return holder is not None and holder.token == token


def _read(path: str) -> Holder | None:
    try:
        return Holder(**json.loads(storage.read_bytes(path).decode()))
    except (OSError, ValueError, TypeError):
        return None


def read_holder(run_dir: str) -> Holder | None:
    """Who holds the run folder now (None if nobody)."""
    return _read(storage.join(run_dir, LOCK_FILE))
