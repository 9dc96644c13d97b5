"""One process per run folder: an exclusive lock file, <run folder>/.ccpcsa.lock.

The lock is created atomically (O_CREAT | O_EXCL) and holds the holder's host, pid, process
start time and a random token; once the holder has joined Ray it also records the Ray
cluster's id, its GCS address and the driver's job id (record_ray). A lock whose holder is
gone is stale: it is removed with a warning and taken. Gone means: on this host, the pid is
no longer running (or is now another process); on another host, the holder's Ray cluster no
longer answers at its GCS address (the head was lost: a fresh head resumes), or, in the same
cluster, the holder's job has ended. A lock held by a live process, or by one whose liveness
cannot be told from here, refuses the second run with "run X is in use by pid N on host H".

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
import tempfile
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
    ray_cluster: str = ""  # the Ray cluster id the holder's driver joined
    ray_gcs: str = ""  # that cluster's GCS address (host:port)
    ray_job: str = ""  # the holder's Ray job id (hex)

    def describe(self) -> str:
        ray = f", Ray job {self.ray_job} on cluster {self.ray_gcs}" if self.ray_gcs else ""
        return f"pid {self.pid} on host {self.host} ({self.command}, since {self.started}{ray})"


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


GCS_PROBE_S = 5.0  # how long the GCS of a lock's Ray cluster may take to accept a connection


def is_stale(holder: Holder) -> bool:
    """True when the holder is known to be gone: same host, and its pid is not running or now
    belongs to a process started at another time; another host, and its Ray cluster is gone
    or its job ended (ray_gone)."""
    if holder.host != socket.gethostname():
        return ray_gone(holder)
    if not _pid_running(holder.pid):
        return True
    return bool(holder.process_start) and _process_start(holder.pid) not in (
        "", holder.process_start)


def ray_gone(holder: Holder) -> bool:
    """Whether the holder's Ray driver is known to be gone: in the cluster this process has
    joined (same cluster id), its job is dead; otherwise, nothing accepts connections at its
    cluster's GCS address any more. False when the lock records no Ray cluster."""
    if not holder.ray_gcs:
        return False
    mine = _current_ray()
    if mine is not None and mine[0] == holder.ray_cluster:
        return _job_dead(holder.ray_job)
    host, _, port = holder.ray_gcs.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=GCS_PROBE_S):
            return False  # something answers there: perhaps the holder's cluster, alive
    except ValueError:
        return False
    except OSError:
        return True


def _current_ray() -> tuple[str, str, str] | None:
    """(cluster id, GCS address, job id) of the Ray cluster this process has joined."""
    import sys

    if "ray" not in sys.modules:
        return None
    import ray

    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    try:
        from ray._private.worker import global_worker

        cluster = global_worker.node.cluster_id.hex()
    except Exception:  # no cluster id where Ray keeps it: the GCS address stands for it
        cluster = context.gcs_address
    return cluster, context.gcs_address, context.get_job_id()


def _job_dead(job_id: str) -> bool:
    if not job_id:
        return False
    try:
        import ray

        jobs = ray._private.state.state.job_table()
    except Exception:
        return False
    return any(j.get("JobID") == job_id and j.get("IsDead") for j in jobs)


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

    def record_ray(self) -> None:
        """Once this process has joined Ray: write the cluster id, its GCS address and the job
        id into the lock, so a driver on a fresh head can tell that this one is gone."""
        found = _current_ray()
        if not self.held or found is None:
            return
        cluster, gcs, job = found
        self.holder = Holder(**{**asdict(self.holder), "ray_cluster": cluster, "ray_gcs": gcs,
                                "ray_job": job})
        body = json.dumps(asdict(self.holder)).encode()
        local = storage.local_path(self.path)
        if local is None:
            storage.write_bytes(self.path, body)
            return
        fd, temp = tempfile.mkstemp(prefix=".ccpcsa.lock.", dir=os.path.dirname(local))
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, local)  # readers see the old body or the new one, never half

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
        gone = ("its Ray cluster or job is gone" if stale.host != socket.gethostname()
                else "that process is no longer running")
        log.warning("took over the stale lock of %s in %s: %s", stale.describe(),
                    self.run_dir, gone)


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
