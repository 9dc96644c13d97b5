"""Rehearse a day on a real cluster, on one machine: python cluster/rehearse.py

1. Starts a Ray head with Ray's real autoscaler on its fake multi-node provider (the one
   `ray.cluster_utils.AutoscalingCluster` drives): a head with 0 CPUs that offers the
   trial-driver resource, and a worker node type of 1 CPU that scales from 0. Every process
   listens on 127.0.0.1 only, with free ports, token authentication on.
2. Submits the search with `ray job submit` as cluster/README.md does (the smoke test's shape,
   `--workers-per-trial 2`): the pre-flight asks the autoscaler for a node and waits for it.
3. Kills a worker node that runs Ray Train workers (raylet and every process on it) while a
   trial fine-tunes, and waits until the search goes on (a worker group resumes its fit on a
   new node from the last epoch checkpoint, or, for a group lost between fits, a round is
   reported after RESUME_GRACE_S).
4. Kills the job's driver and the head (and with it the cluster), starts a fresh head over the
   same storage and submits the same command with --resume.
5. Checks the result on storage (every trial finished, no round lost, the frontier, the run
   lock released), says which storage it used, then prints as its last line:
   trials finished N/N, nodes killed K, head restarts H, frontier points P, rounds lost L

Storage (--storage): `s3` by default where moto is installed (`moto[s3]`, flask and
flask-cors, in the dev extra): an S3 bucket on a moto server that this process runs on
127.0.0.1 (a free port) until it exits, so the bucket outlives the head; every process of the
rehearsal gets its endpoint, dummy keys and region through AWS_* variables (the head's
environment, which the fake nodes inherit, and the job's runtime_env), and the search runs
with `--storage s3://rehearsal/runs`. `local`: a folder in the work folder. Every check on the
results reads them through ccpcsa.storage, whichever it is.

Exit 0 when every trial finished and no round reported before the head loss is missing.
Stops every process it started, by pid (never `ray stop`). --keep keeps the work folder for a
look.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
MARK = "CCPCSA_REHEARSAL"  # in the environment of every process the rehearsal starts
DRIVER_RESOURCE = "ccpcsa_driver"
NAME = "rehearsal"
BUCKET = "rehearsal"
RESUMED_FIT = "resuming training from the checkpoint of epoch"  # ccpcsa.distributed.worker
RESUME_GRACE_S = 30  # a fit resumes within this after a node loss (about 25 s on two cores)
TRIALS = 3
SEARCH = ["--model", "resnet20", "--dataset", "digits", "--image-size", "8",
          "--baseline-epochs", "1", "--attention-epochs", "1", "--max-rounds", "2",
          "--epochs", "3", "--calibration-batches", "1", "--seed", "0",
          "--num-samples", str(TRIALS), "--max-concurrent-trials", "2",
          "--workers-per-trial", "2", "--cpus-per-worker", "0.5", "--gpus-per-worker", "0",
          "--max-failures", "3", "--wait-for-resources", "300", "--latency-batch", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(text: str) -> None:
    print(f"[rehearse {time.strftime('%H:%M:%S')}] {text}", flush=True)


# --------------------------------------------------------------------------- processes


def marked(marker: str) -> dict[int, dict[str, str]]:
    """Live processes carrying our marker: pid -> environment."""
    wanted = f"{MARK}={marker}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            raw = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if wanted in raw and state not in "ZX":
            found[int(entry)] = dict(v.decode(errors="replace").split("=", 1)
                                     for v in raw if b"=" in v)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def kill_all(pids) -> int:
    """SIGSTOP then SIGKILL: none restarts another in between."""
    pids = set(pids)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    return len(pids)


# --------------------------------------------------------------------------- the cluster


class Cluster:
    def __init__(self, work: Path, marker: str, token: str, max_nodes: int,
                 storage_env: dict[str, str]) -> None:
        self.work, self.marker, self.token, self.max_nodes = work, marker, token, max_nodes
        self.storage_env = storage_env  # the S3 endpoint and keys (empty for a local folder)
        self.head: subprocess.Popen | None = None
        self.dashboard = 0
        self.gcs = ""

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
        env.update({MARK: self.marker, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_TMPDIR": str(self.work / "ray"), "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    # the fake multi-node provider, checking every second
                    "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
                   **self.storage_env, **extra)
        return env

    def autoscaling_config(self, port: int) -> Path:
        """The fake provider's cluster config (the shape of Ray's fake_multi_node example)."""
        config = {
            "cluster_name": "ccpcsa-rehearsal", "max_workers": self.max_nodes,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True,
                         "gcs_address": f"127.0.0.1:{port}"},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 0, DRIVER_RESOURCE: 100},
                                     "node_config": {}, "max_workers": 0},
                "cpu-worker": {"resources": {"CPU": 1, "object_store_memory": 200 * 2**20},
                               "node_config": {}, "min_workers": 0,
                               "max_workers": self.max_nodes}},
            "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
            "idle_timeout_minutes": 1.0, "docker": {}, "initialization_commands": [],
            "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
            "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
            "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": []}
        path = self.work / f"autoscaling-{port}.yaml"
        path.write_text(json.dumps(config))  # YAML is a superset of JSON
        return path

    def start_head(self) -> None:
        port, self.dashboard = free_port(), free_port()
        self.gcs = f"127.0.0.1:{port}"
        command = [
            str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}", "--num-cpus=0",
            f"--resources={json.dumps({DRIVER_RESOURCE: 100})}",
            f"--autoscaling-config={self.autoscaling_config(port)}", "--disable-usage-stats"]
        log = open(self.work / f"head-{port}.log", "w")
        self.head = subprocess.Popen(command, env=self.env(), stdout=log,
                                     stderr=subprocess.STDOUT, cwd=self.work)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.head.poll() is not None:
                raise RuntimeError(f"the head exited: {(self.work / f'head-{port}.log')}")
            if self.cli(["job", "list"], check=False, timeout=30).returncode == 0:
                say(f"head up: GCS {self.gcs}, dashboard http://127.0.0.1:{self.dashboard}")
                return
            time.sleep(1)
        raise RuntimeError("the head did not come up within 120 s")

    def cli(self, args: list[str], check: bool = True, timeout: float = 120
            ) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args[:2], "--address",
                               f"http://127.0.0.1:{self.dashboard}", *args[2:]], env=self.env(),
                              capture_output=True, text=True, check=check, timeout=timeout,
                              cwd=REPO)

    def submit(self, submission_id: str, flags: list[str]) -> None:
        """`ray job submit` as cluster/README.md does, with the guide's runtime env minus two
        things one machine cannot have: its pip list (no package index; this venv holds
        the project, installed) and its working_dir (every fake node shares one session
        folder, so a node's runtime-env agent deletes the unpacked copy the others run in).
        """
        import yaml

        runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
        runtime_env = {"env_vars": {**runtime_env.get("env_vars", {}), **self.storage_env}}
        self.cli(["job", "submit", "--submission-id", submission_id, "--no-wait",
                  "--runtime-env-json", json.dumps(runtime_env), "--", "python",
                  str(REPO / "search" / "run.py"), *flags])
        say(f"submitted {submission_id}: python search/run.py {' '.join(flags)}")

    def jobs(self):
        """Ray's job client on the dashboard, with the cluster's token."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(f"http://127.0.0.1:{self.dashboard}")

    def job_status(self, submission_id: str) -> str:
        try:
            return str(self.jobs().get_job_status(submission_id).value)
        except Exception:  # the head is busy or restarting: ask again later
            return "UNKNOWN"

    def job_logs(self, submission_id: str) -> str:
        return self.jobs().get_job_logs(submission_id)

    def training_nodes(self) -> set[str]:
        """Nodes with a live Ray Train worker (Ray's state API, through the dashboard)."""
        done = self.cli(["list", "actors", "--filter", "class_name=RayTrainWorker",
                         "--filter", "state=ALIVE", "--format", "json", "--limit", "1000"],
                        check=False, timeout=60)
        try:
            return {a["node_id"] for a in json.loads(done.stdout)}
        except (ValueError, KeyError, TypeError):
            return set()

    def worker_nodes(self) -> dict[str, set[int]]:
        """Fake worker nodes: node id -> the pids of its processes (raylet and workers)."""
        nodes: dict[str, set[int]] = {}
        for pid, env in marked(self.marker).items():
            node = env.get("RAY_OVERRIDE_NODE_ID_FOR_TESTING", "")
            if node and env.get("RAY_NODE_TYPE_NAME") == "cpu-worker":
                nodes.setdefault(node, set()).add(pid)
        return nodes


# --------------------------------------------------------------------------- the storage


class S3Server:
    """A moto S3 server in this process (a thread) on 127.0.0.1, a free port: it outlives the
    head. env: the AWS_* variables that point pyarrow, boto3 and Ray's storage at it."""

    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        os.environ.update(self.env)  # this process's own checks read the bucket too
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)

    def stop(self) -> None:
        self.server.stop()


def moto_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None
               for m in ("moto", "flask", "flask_cors", "boto3"))


def finetune_epoch_written(run_dir: str) -> str | None:
    """An epoch checkpoint of a trial's fine-tune (a fit labelled 'round N')."""
    from ccpcsa import storage

    for path in storage.list_files(storage.join(run_dir, "train")):
        parts = path.split("/")
        if (len(parts) == 4 and "round" in parts[2] and "stage0" not in parts
                and fnmatch.fnmatch(parts[3], "epoch-*.pt")):
            return path
    return None


def reported_rounds(run_dir: str) -> set[tuple[str, int]]:
    from ccpcsa.search.ondisk import scan_trials

    return {(t.trial_id, r) for t in scan_trials(run_dir) for r in t.rounds}


def finished_trials(run_dir: str) -> int:
    from ccpcsa.search.ondisk import scan_trials

    return sum(t.status == "finished" for t in scan_trials(run_dir))


def frontier_points(run_dir: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ccpcsa import storage

    raw = storage.read_bytes(storage.join(run_dir, "frontier.parquet"))
    return sum(bool(p) for p in pq.read_table(pa.BufferReader(raw)).column("pareto").to_pylist())


def wait_for(what: str, test, timeout: float, poll: float = 0.2, job=None):
    """Poll test() until it returns something true; `job` (cluster, submission id): give up
    as soon as that job has ended."""
    deadline = time.monotonic() + timeout
    looked = time.monotonic()
    while time.monotonic() < deadline:
        found = test()
        if found:
            return found
        if job is not None and time.monotonic() - looked > 5:
            looked = time.monotonic()
            status = job[0].job_status(job[1])
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                print(job[0].job_logs(job[1])[-3000:], file=sys.stderr)
                raise RuntimeError(f"job {job[1]} ended {status} while waiting for {what}")
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


# --------------------------------------------------------------------------- the day


def rehearse(work: Path, marker: str, token: str, storage_uri: str,
             storage_env: dict[str, str]) -> tuple[int, int, int, int, int, int]:
    from ccpcsa import storage

    run_dir = storage.join(storage_uri, NAME)
    flags = [*SEARCH, "--storage", storage_uri, "--name", NAME]
    # 3: the fake provider never learns that a killed node is gone (it stays "pending"), so
    # one slot more than the two nodes the search uses lets the autoscaler replace it
    cluster = Cluster(work, marker, token, max_nodes=3, storage_env=storage_env)
    cluster.start_head()
    listening = loopback_only(marker)
    cluster.submit("day-1", flags)

    # a worker node lost while a trial fine-tunes
    wait_for("a trial's fine-tune to checkpoint an epoch", lambda: finetune_epoch_written(
        run_dir), timeout=420, poll=0.5, job=(cluster, "day-1"))
    nodes = cluster.worker_nodes()
    say(f"fine-tune running; worker nodes up: {len(nodes)}")
    training = sorted(set(nodes) & cluster.training_nodes())
    if not training:
        raise RuntimeError(f"no worker node runs a Ray Train worker (nodes: {sorted(nodes)})")
    victim = training[0]
    rounds_then = len(reported_rounds(run_dir))
    nodes_killed = 1 if kill_all(nodes[victim]) else 0
    say(f"killed worker node {victim[-5:]} ({len(nodes[victim])} processes), which runs Ray "
        "Train workers")
    # the search goes on: the worker group restarts on a new node and resumes its fit from
    # the last epoch; a group killed between fits has no fit to resume (its next command
    # starts afresh), so after a grace period a round reported since the loss also counts
    killed_at = time.monotonic()

    def went_on() -> str | None:
        if RESUMED_FIT in cluster.job_logs("day-1"):
            return "its worker group resumed a fit from the last epoch checkpoint"
        if (time.monotonic() - killed_at > RESUME_GRACE_S
                and len(reported_rounds(run_dir)) > rounds_then):
            return "a round was reported after it"
        return None

    how = wait_for("the search to go on after the node loss", went_on, timeout=450, poll=3,
                   job=(cluster, "day-1"))
    say(f"the search went on after the node loss: {how}")

    # then the driver and the head, once a trial has finished and before all have
    wait_for("a finished trial", lambda: finished_trials(run_dir) >= 1, timeout=600, poll=1,
             job=(cluster, "day-1"))
    before = reported_rounds(run_dir)
    if cluster.job_status("day-1") == "SUCCEEDED":
        raise RuntimeError("the search finished before the head could be killed")
    driver = [p for p in marked(marker) if "search/run.py" in cmdline(p)]
    kill_all(driver)
    left = kill_all(marked(marker))  # the head and every node: the whole cluster is gone
    cluster.head.wait()
    say(f"killed the driver and the head ({left} processes); {len(before)} rounds reported")
    time.sleep(2)

    cluster.start_head()
    listening |= loopback_only(marker)
    cluster.submit("day-1-resumed", [*flags, "--resume"])
    status = wait_for("the resumed search to end", lambda: (
        s if (s := cluster.job_status("day-1-resumed")) in ("SUCCEEDED", "FAILED", "STOPPED")
        else None), timeout=900, poll=3)
    logs = cluster.job_logs("day-1-resumed")
    (work / "resumed.log").write_text(logs)
    took_over = [line for line in logs.splitlines() if "took over the stale lock" in line]
    if not took_over:
        raise RuntimeError("the resumed driver did not take over the old driver's lock")
    say(took_over[0].split("WARNING ", 1)[-1])
    if status != "SUCCEEDED":
        print(logs[-4000:], file=sys.stderr)
        raise RuntimeError(f"the resumed search ended {status}")
    from ccpcsa.runlock import read_holder

    if (holder := read_holder(run_dir)) is not None:
        raise RuntimeError(f"the resumed search left its run lock behind: {holder.describe()}")
    after = reported_rounds(run_dir)
    say(f"ports listened on: {', '.join(sorted(listening))}")
    return (finished_trials(run_dir), TRIALS, nodes_killed, 1, frontier_points(run_dir),
            len(before - after))


def loopback_only(marker: str) -> set[str]:
    """The addresses our processes listen on (ss -ltnp), this one's S3 server included; every
    one must be 127.0.0.1."""
    ours = set(marked(marker)) | {os.getpid()}
    found = set()
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if pids & ours:
            found.add(line.split()[3].rsplit(":", 1)[0])
    if found - {"127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"}:
        raise RuntimeError(f"a rehearsal process listens beyond loopback: {sorted(found)}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--storage", choices=("s3", "local"),
                        default="s3" if moto_installed() else "local",
                        help="an S3 bucket on a moto server started here (default where moto "
                             "is installed), or a local folder")
    args = parser.parse_args(argv)
    if args.storage == "s3" and not moto_installed():
        parser.error("--storage s3 needs moto[s3], flask and flask-cors (pip install -e '.[dev]')")
    work = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))  # short: Ray's socket paths
    marker, token = uuid.uuid4().hex, secrets.token_hex(32)
    # this process's own Ray clients (job and state APIs) read the token when Ray is imported
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    say(f"work folder {work}")
    s3: S3Server | None = None
    try:
        if args.storage == "s3":
            s3 = S3Server()
            storage_uri, storage_env = f"s3://{BUCKET}/runs", s3.env
            used = f"{storage_uri} on a moto S3 server at {s3.endpoint}"
        else:
            storage_uri, storage_env = str(work / "storage"), {}
            used = f"the local folder {storage_uri}"
        say(f"storage: {used}")
        finished, trials, killed, restarts, points, lost = rehearse(
            work, marker, token, storage_uri, storage_env)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for _ in range(3):
            if not kill_all(marked(marker)):
                break
            time.sleep(1)
        if s3 is not None:
            s3.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    say(f"storage used: {used}")
    print(f"trials finished {finished}/{trials}, nodes killed {killed}, head restarts "
          f"{restarts}, frontier points {points}, rounds lost {lost}", flush=True)
    return 0 if finished == trials and lost == 0 and killed and restarts else 1


if __name__ == "__main__":
    sys.exit(main())
