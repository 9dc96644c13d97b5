"""The search (search/run.py) end to end on real Ray, real Optuna, CPU, tiny budgets.

- A bad configuration is one clear line on stderr, exit code 2, before any Ray starts.
- A trial that raises (CCPCSA_FAIL_TRIALS, injected by tests/plugins) is reported as failed;
  the search completes and the other trials' points are on the frontier. `--resume
  --retry-failed` then runs that trial again as a new trial with its parameters (and it
  finishes), without running the finished ones again.
- A search killed (SIGKILL) after a trial finished resumes with --resume: the finished trial is
  kept with its results and is not run again.
- Ctrl-C (SIGINT) exits 130 with a per-status summary; with Tune's state files then deleted
  and the Optuna journal's last line cut short (as a kill while Optuna writes leaves it),
  --resume keeps and does not re-run the finished trial, runs the trials still owed and puts
  every round on disk on the frontier.
- `ray job submit` to a real Ray head: every point of frontier.parquet re-measures (FLOPs,
  params, top-1 on the digits test split) to its stored values from its checkpoint, `pareto` is
  exactly the brute-force non-dominated set (each identical point once), frontier.png is a PNG.
- The two-phase search (--screen N --finalists K), killed (SIGKILL) during screening and again
  during fine-tuning, resumed each time and finished as a `ray job submit`: N schedules
  screened without fine-tuning, the K chosen once and fine-tuned, nothing finished run again
  or lost, the frontier says which phase each point comes from and only fine-tuned points
  are deployable and on it.

Every Ray process a test starts carries a unique marker in its environment
(CCPCSA_TEST_RUN, inherited by the Ray head's or the driver's whole process tree, Ray workers
included); it is stopped by process id and checked gone. `ray stop --force` is not used: it
kills every Ray process on the machine, other people's included. All Ray addresses are
loopback: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from replacing 127.0.0.1 by the
machine's routable address.
"""

from __future__ import annotations

import json
import os
import pickle
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
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
from ccpcsa_faults import env_with_plugins
from PIL import Image

from ccpcsa.checkpoint import load_checkpoint
from ccpcsa.data import DataConfig, build_datasets
from ccpcsa.flops import count_flops, count_params
from ccpcsa.search.config import ConfigError
from ccpcsa.search.ondisk import TrialOnDisk, scan_trials
from ccpcsa.search.run import config_from_argv
from ccpcsa.train import TrainConfig, evaluate

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the interpreter running the tests: .venv/bin
RAY = str(VENV_BIN / "ray")
RUN_PY = "search/run.py"
MARK = "CCPCSA_TEST_RUN"
IMAGE_SIZE = 8
TINY = ["--model", "resnet20", "--dataset", "digits", "--image-size", str(IMAGE_SIZE),
        "--baseline-epochs", "1", "--attention-epochs", "1", "--max-rounds", "2",
        "--epochs", "1", "--calibration-batches", "1", "--seed", "0"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEARCH_TIMEOUT_S = 300


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _short_tmp(prefix: str) -> str:
    # Ray's Unix sockets live under the temp dir: keep the path short (pytest's tmp_path is
    # long enough to overflow the 107-byte socket path limit).
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def _env(marker: str, ray_tmp: str, **extra: str) -> dict[str, str]:
    """The environment of a search a test starts: its own Ray, the tests' fault injection
    loaded (tests/plugins; inert unless `extra` sets a fault)."""
    env = env_with_plugins({k: v for k, v in os.environ.items()
                            if not k.startswith("RAY_ADDRESS")})
    env.pop("CCPCSA_FAIL_TRIALS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.update({MARK: marker, "RAY_TMPDIR": ray_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                # a token of its own: Ray neither reads nor writes ~/.ray/auth_token
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}, **extra)
    return env


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) from /proc/<pid>/stat; None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _marked(marker: str) -> set[int]:
    """Live processes whose environment carries this marker (ours, by construction)."""
    wanted = f"{MARK}={marker}".encode()
    found = set()
    for pid in _all_pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if pid != os.getpid() and wanted in environ.split(b"\0") and _alive(pid):
            found.add(pid)
    return found


def _tree(root: int) -> set[int]:
    """root and every live process below it."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        stat = _proc_stat(pid)
        if stat is not None:
            children.setdefault(stat[1], []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found and _alive(pid):
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(marker: str, root: subprocess.Popen | None = None, timeout: float = 60) -> None:
    """SIGKILL, by pid, the process tree of `root` and every process carrying `marker`;
    freeze them first so none spawns or restarts another between listing and killing."""
    seen: set[int] = set()
    for _ in range(10):
        below = _tree(root.pid) if root is not None and root.poll() is None else set()
        new = (_marked(marker) | below) - seen
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        seen |= new
    for pid in seen:
        _signal(pid, signal.SIGKILL)
    if root is not None:
        try:
            root.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + timeout
    while (any(_alive(pid) for pid in seen) or _marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)


@contextmanager
def _ray_processes(prefix: str):
    """(marker, RAY_TMPDIR) for one group of Ray processes; on exit, none of them is left."""
    marker = f"{prefix}-{uuid.uuid4().hex}"
    ray_tmp = _short_tmp(f"{prefix}-")
    try:
        yield marker, ray_tmp
    finally:
        _stop(marker)
        left = _marked(marker)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not left, f"Ray processes left running: {sorted(left)}"


def _search(args: list[str], env: dict[str, str], log: Path) -> subprocess.CompletedProcess:
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, RUN_PY, *args], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=SEARCH_TIMEOUT_S, check=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), "")


RAY_FORWARDED = re.compile(r"^(\x1b\[\d+m)?\([\w.-]+ pid=\d+(, ip=[\d.]+)?\)")


def _driver_lines(text: str) -> str:
    """text without the lines Ray forwards from worker processes: after a Ctrl-C a trial
    worker may print its own interrupt traceback, and Ray can forward it after the driver's
    last line; only the driver's own output is the product's."""
    return "\n".join(line for line in text.splitlines() if not RAY_FORWARDED.match(line))


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- run folder


def _on_disk(run_dir: Path) -> dict[str, TrialOnDisk]:
    """trial id -> the trial as its folder records it (ccpcsa/search/ondisk.py): the search's own
    record, read the way --resume reads it."""
    return {t.trial_id: t for t in scan_trials(str(run_dir))} if run_dir.is_dir() else {}


def _finished(run_dir: Path) -> dict[str, TrialOnDisk]:
    return {t: v for t, v in _on_disk(run_dir).items() if v.status == "finished"}


def _dir(trial: TrialOnDisk) -> Path:
    return Path(trial.folder)


def _reports(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _round_reports(trial_dir: Path) -> dict[int, tuple]:
    """round -> (accuracy, flops, params) of a trial's per-round (non-final) reports."""
    return {int(r["round"]): (float(r["accuracy"]), int(r["flops"]), int(r["params"]))
            for r in _reports(trial_dir) if not r["is_final"]}


def _frontier_rounds(frame: pd.DataFrame, trial_id: str) -> dict[int, tuple]:
    rows = frame[frame["trial_id"] == trial_id]
    return {int(r["round"]): (float(r["accuracy"]), int(r["flops"]), int(r["params"]))
            for _, r in rows.iterrows()}


def _brute_force_pareto(accuracy: list[float], flops: list[int]) -> list[bool]:
    """Not dominated: no other point with accuracy >= and flops <=, one of them strict."""
    n = len(accuracy)
    return [not any(accuracy[j] >= accuracy[i] and flops[j] <= flops[i]
                    and (accuracy[j] > accuracy[i] or flops[j] < flops[i]) for j in range(n))
            for i in range(n)]


def _expected_frontier(frame: pd.DataFrame) -> list[bool]:
    """The brute-force frontier of the deployable rows, each (accuracy, FLOPs) once: the row
    whose trial had used the least compute by then (stage 0's: not counted, last)."""
    rows = [i for i, d in enumerate(frame["deployable"]) if d]
    front = _brute_force_pareto([frame["accuracy"].iloc[i] for i in rows],
                                [frame["flops"].iloc[i] for i in rows])
    expected = [False] * len(frame)
    kept: dict[tuple, int] = {}
    cost = frame["compute_s"].fillna(float("inf")).tolist()
    for i, on in zip(rows, front, strict=True):
        if not on:
            continue
        key = (frame["accuracy"].iloc[i], frame["flops"].iloc[i])
        if key not in kept or cost[i] < cost[kept[key]]:
            kept[key] = i
    for i in kept.values():
        expected[i] = True
    return expected


# --------------------------------------------------------------------------- 4. bad config


@pytest.mark.parametrize("yaml_text, flags, names", [
    ("model: resnet20\nnot_a_setting: 3\n", [], ["not_a_setting"]),
    ("m_range: []\n", [], ["m_range"]),
    (None, ["--cap-range", "0.8,0.2"], ["cap_range", "0.8", "0.2"]),
    (None, ["--num-samples", "0"], ["num_samples", "0"]),
    (None, ["--allocation", "magic"], ["allocation", "magic"]),
], ids=["unknown-yaml-key", "empty-range", "low-above-high", "zero-samples", "allocation"])
def test_bad_config_is_one_line_before_ray(tmp_path, yaml_text, flags, names):
    args = ["--storage", str(tmp_path / "runs"), "--name", "bad", *flags]
    if yaml_text is not None:
        config = tmp_path / "search.yaml"
        config.write_text(yaml_text)
        args = ["--config", str(config), *args]
    ray_tmp = tmp_path / "ray-tmp"  # Ray would create its session folder here
    env = _env(f"bad-{uuid.uuid4().hex}", str(ray_tmp))
    proc = subprocess.run([sys.executable, RUN_PY, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    assert not ray_tmp.exists(), "Ray was started for a bad configuration"
    assert not (tmp_path / "runs").exists(), "the run folder was created for a bad config"


# --------------------------------------------------------------------------- 3. failing trial


def test_failing_trial_is_reported_and_others_reach_the_frontier(tmp_path):
    storage = tmp_path / "runs"
    run_dir = storage / "fail"
    with _ray_processes("fail") as (marker, ray_tmp):
        env = _env(marker, ray_tmp, CCPCSA_FAIL_TRIALS="1")
        done = _search(["--storage", str(storage), "--name", "fail", "--num-samples", "3",
                        *TINY], env, tmp_path / "search.log")
    out = done.stdout
    assert done.returncode == 0, _tail(out)
    assert "2 trials finished, 1 failed" in out, _tail(out)

    trials = _on_disk(run_dir)
    assert len(trials) == 3, trials
    failed = {t: v for t, v in trials.items() if v.status == "failed"}
    finished = {t: v for t, v in trials.items() if v.status == "finished"}
    assert [v.number for v in failed.values()] == [1], trials
    assert len(finished) == 2, trials
    (failed_id, failed_trial), = failed.items()
    error_file = _dir(failed_trial) / "error.txt"
    assert "injected failure in trial 1" in error_file.read_text()
    assert f"failed: run_trial_{failed_id}_1: RuntimeError: injected failure" in out, _tail(out)

    frame = pd.read_parquet(run_dir / "frontier.parquet")
    assert failed_id not in set(frame["trial_id"])
    assert set(frame["trial_id"]) - {"stage0"} <= set(finished)
    for trial_id, trial in finished.items():
        reported = _round_reports(_dir(trial))
        assert _frontier_rounds(frame, trial_id) == reported, trial_id
    assert sum(len(_round_reports(_dir(t))) for t in finished.values()) > 0
    assert set(frame.loc[frame["trial_id"] != "stage0", "status"]) == {"finished"}

    # the cause fixed (no injected failure now): the failed trial runs again, nothing else
    results = {t: (_dir(v) / "result.json").read_bytes() for t, v in finished.items()}
    with _ray_processes("retry") as (marker, ray_tmp):
        retried = _search(["--storage", str(storage), "--name", "fail", "--resume",
                           "--retry-failed"], _env(marker, ray_tmp), tmp_path / "retry.log")
    out = retried.stdout
    assert retried.returncode == 0, _tail(out)
    assert "running 1 failed trial(s) again" in out, _tail(out)
    assert "3 trials finished, 0 failed" in out, _tail(out)
    trials = _on_disk(run_dir)  # run again as a new trial with the same parameters
    again = {t: v for t, v in trials.items() if t not in results and t != failed_id}
    assert trials[failed_id].status == "retried" and len(again) == 1, trials
    (again_id, rerun), = again.items()
    assert rerun.status == "finished" and rerun.params == failed_trial.params
    for trial_id, before in results.items():
        assert (_dir(trials[trial_id]) / "result.json").read_bytes() == before, trial_id
    frame = pd.read_parquet(run_dir / "frontier.parquet")
    for trial_id in (failed_id, again_id):
        assert _frontier_rounds(frame, trial_id) == _round_reports(_dir(trials[trial_id]))


def test_retry_failed_needs_resume():
    with pytest.raises(ConfigError, match="retry_failed needs resume"):
        config_from_argv(["--retry-failed"])


# --------------------------------------------------------------------------- 2. resume


def test_killed_search_resumes_without_rerunning_finished_trials(tmp_path):
    storage = tmp_path / "runs"
    run_dir = storage / "resume"
    samples = 3
    args = ["--storage", str(storage), "--name", "resume", "--num-samples", str(samples),
            "--max-concurrent-trials", "1", *TINY]

    with _ray_processes("resume-a") as (marker, ray_tmp):
        log = tmp_path / "first.log"
        with log.open("w") as out:
            driver = subprocess.Popen([sys.executable, RUN_PY, *args], cwd=REPO,
                                      env=_env(marker, ray_tmp), stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + SEARCH_TIMEOUT_S
            while True:
                assert driver.poll() is None, (
                    "the search ended before a finished trial could be seen:\n"
                    + _tail(log.read_text()))
                assert time.monotonic() < deadline, _tail(log.read_text())
                done = list(_finished(run_dir))
                if done:
                    break
                time.sleep(0.2)
            assert len(done) < samples, "every trial had finished: nothing left to resume"
        finally:
            _stop(marker, driver)  # the driver and the Ray cluster it started: SIGKILL
        assert driver.returncode == -signal.SIGKILL

    before = _on_disk(run_dir)  # what the killed search had recorded
    finished_before = {t: v for t, v in before.items() if v.status == "finished"}
    assert 0 < len(finished_before) < samples, before
    result_files = {t: (_dir(v) / "result.json").read_bytes()
                    for t, v in finished_before.items()}
    rounds_before = {t: _round_reports(_dir(v)) for t, v in finished_before.items()}
    # the frontier so far is rewritten as rounds report (ccpcsa/search/watch.py): a killed search
    # leaves none yet or a whole, readable file with only trials it had recorded
    if (run_dir / "frontier.parquet").exists():
        so_far = pd.read_parquet(run_dir / "frontier.parquet")
        assert set(so_far["trial_id"]) - {"stage0"} <= set(before), so_far["trial_id"]

    with _ray_processes("resume-b") as (marker, ray_tmp):
        done = _search(["--storage", str(storage), "--name", "resume", "--resume"],
                       _env(marker, ray_tmp), tmp_path / "resumed.log")
    assert done.returncode == 0, _tail(done.stdout)
    assert f"{samples} trials finished, 0 failed" in done.stdout, _tail(done.stdout)

    after = _on_disk(run_dir)  # an interrupted trial was continued by a new one
    assert sorted(v.status for v in after.values() if v.status != "continued") == \
        ["finished"] * samples, after
    frame = pd.read_parquet(run_dir / "frontier.parquet")
    for trial_id, trial in finished_before.items():
        # not run again: Tune appends a line to result.json for every report of a trial
        assert (_dir(trial) / "result.json").read_bytes() == result_files[trial_id], trial_id
        assert after[trial_id].folder == trial.folder
        # kept: the same rounds with the same results
        assert _frontier_rounds(frame, trial_id) == rounds_before[trial_id], trial_id
        assert sum(1 for r in _reports(_dir(trial)) if r["is_final"]) == 1
    for trial_id, trial in after.items():  # every round on disk is a point
        assert _frontier_rounds(frame, trial_id) == _round_reports(_dir(trial)), trial_id


# --------------------------------------------------------------------------- 1. ray job submit


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head (dashboard included: job submission needs it) on loopback ports."""
    marker = f"head-{uuid.uuid4().hex}"
    ray_tmp = _short_tmp("head-")
    dashboard = _free_port()
    # A job's entrypoint is a shell command: its `python` is looked up on the PATH the head
    # was started with, not the interpreter Ray runs on. Put the venv first on PATH, as
    # activating it would (without this, `python` is the system's, which lacks the packages).
    env = _env(marker, ray_tmp, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    log = Path(ray_tmp) / "ray-start.log"
    cmd = [RAY, "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--port={_free_port()}", f"--dashboard-port={dashboard}",
           f"--ray-client-server-port={_free_port()}",
           f"--dashboard-agent-listen-port={_free_port()}", "--include-dashboard=true",
           "--disable-usage-stats", f"--temp-dir={ray_tmp}"]
    with log.open("w") as out:
        head = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None, f"ray start exited:\n{_tail(log.read_text())}"
            assert time.monotonic() < deadline, f"ray start hung:\n{_tail(log.read_text())}"
            time.sleep(0.5)
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        _stop(marker, head)
        left = _marked(marker)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not left, f"Ray processes left running: {sorted(left)}"


@contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def test_ray_job_submit_end_to_end(ray_head, tmp_path):
    storage = (tmp_path / "runs").resolve()
    run_dir = storage / "e2e"
    job = f"ccpcsa-e2e-{uuid.uuid4().hex[:8]}"
    cmd = [RAY, "job", "submit", "--address", ray_head["address"], "--working-dir", str(REPO),
           "--submission-id", job, "--", "python", RUN_PY, "--storage", str(storage),
           "--name", "e2e", "--num-samples", "3", *TINY]
    done = subprocess.run(cmd, cwd=tmp_path, env=ray_head["env"], capture_output=True,
                          text=True, timeout=SEARCH_TIMEOUT_S + 120, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, _tail(out)
    assert f"Job '{job}' succeeded" in out, _tail(out)
    assert "3 trials finished, 0 failed" in out, _tail(out)

    frame = pd.read_parquet(run_dir / "frontier.parquet")
    saved = json.loads((run_dir / "search_config.json").read_text())["config"]
    assert saved["storage"] == str(storage)
    assert len(frame[frame["trial_id"] == "stage0"]) == 1
    trials = _on_disk(run_dir)
    assert len(trials) == 3 and all(v.status == "finished" for v in trials.values())
    assert set(frame["trial_id"]) - {"stage0"} <= set(trials)
    for trial_id, trial in trials.items():  # every reported round of every trial is a point
        assert _frontier_rounds(frame, trial_id) == _round_reports(_dir(trial)), trial_id
        # TensorBoard (Ray Tune's default logger, cluster/README.md "Watch"): every trial's
        # accuracy and FLOPs per round, under `tensorboard --logdir <run>`
        events = b"".join(p.read_bytes() for p in _dir(trial).glob("events.out.tfevents.*"))
        assert b"accuracy" in events and b"flops" in events, trial_id
    assert len(frame) > 1

    # The stored numbers re-measure from the checkpoints.
    _, test_set = build_datasets(DataConfig("digits", image_size=saved["image_size"]))
    eval_cfg = TrainConfig(batch_size=saved["batch_size"], lr=saved["lr"], seed=saved["seed"])
    input_shape = (3, saved["image_size"], saved["image_size"])
    checked = 0
    for row in frame.to_dict("records"):
        paths = [p for p in (row["checkpoint"], row["frontier_checkpoint"]) if p]
        assert paths, f"point without a checkpoint: {row}"
        for path in paths:
            model = load_checkpoint(path)
            assert count_flops(model, input_shape) == row["flops"], path
            assert count_params(model) == row["params"], path
            with _torch_threads(1):  # as in the trial (one CPU per worker)
                accuracy = evaluate(model, test_set, eval_cfg)
            assert abs(accuracy - row["accuracy"]) <= 1e-6, (path, accuracy, row["accuracy"])
            checked += 1
    assert checked >= len(frame)

    # `pareto` is exactly the non-dominated set (maximise accuracy, minimise FLOPs), each
    # identical point once.
    expected = _expected_frontier(frame)
    assert frame["pareto"].tolist() == expected
    assert sum(expected) >= 1
    for row in frame.to_dict("records"):
        assert bool(row["frontier_checkpoint"]) == bool(row["pareto"]), row

    png = run_dir / "frontier.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0
        image.load()


# --------------------------------------------------------------------------- Ray Train trials


# --------------------------------------------------------------------------- lost state


def _summary_counts(out: str) -> dict[str, int]:
    found = re.search(r"(\d+) trials finished, (\d+) failed, (\d+) interrupted, (\d+) not "
                      r"started \(of (\d+)\)", out)
    assert found, _tail(out)
    keys = ("finished", "failed", "interrupted", "not started", "of")
    return dict(zip(keys, map(int, found.groups()), strict=True))


class _Planted:  # a pickle that, unpickled, names what it ran
    def __reduce__(self):
        return (getattr, (int, "no_such_attribute_i26"))


def test_ctrl_c_exits_130_and_resume_survives_a_lost_tune_state(tmp_path):
    """SIGINT after a trial finished: exit 130, the summary says which trials finished, were
    interrupted or never started. Then Tune's state files are deleted and the Optuna journal
    ends in a line cut short (what a kill while Optuna writes leaves), and --resume must
    neither lose nor re-run the finished trial, must finish the search, and every round on
    disk must reach the frontier."""
    from ccpcsa.search.searcher import JOURNAL_FILE

    storage = tmp_path / "runs"
    run_dir = storage / "lost"
    samples = 3
    args = ["--storage", str(storage), "--name", "lost", "--num-samples", str(samples),
            "--max-concurrent-trials", "1", *TINY]
    with _ray_processes("lost-a") as (marker, ray_tmp):
        log = tmp_path / "first.log"
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
            driver.send_signal(signal.SIGINT)  # Ctrl-C
            driver.wait(timeout=SEARCH_TIMEOUT_S)
        finally:
            _stop(marker, driver)
    first = log.read_text()
    assert driver.returncode == 130, _tail(first)
    counts = _summary_counts(first)
    assert counts["finished"] >= 1 and counts["interrupted"] + counts["not started"] >= 1
    assert counts["finished"] + counts["interrupted"] + counts["not started"] == samples
    assert "--resume" in first and "Traceback" not in _driver_lines(first.split("search: ")[-1])
    before = {t.trial_id: t for t in scan_trials(str(run_dir)) if t.status == "finished"}
    results = {t: (run_dir / Path(v.folder).name / "result.json").read_bytes()
               for t, v in before.items()}

    tune_state = [p for p in run_dir.iterdir() if p.name.startswith(
        ("tuner.pkl", "experiment_state-", "searcher-state-", "basic-variant-state-"))]
    assert tune_state, sorted(p.name for p in run_dir.iterdir())
    for path in tune_state:  # never read by --resume
        path.unlink()
    # and a tuner.pkl planted in their place is never unpickled
    (run_dir / "tuner.pkl").write_bytes(pickle.dumps(_Planted()))
    journal = run_dir / JOURNAL_FILE
    assert journal.read_bytes().endswith(b"\n")
    with journal.open("ab") as f:  # Optuna was writing an operation when the search was killed
        f.write(b'{"op_code":6,"worker_id":"w","trial_id":1,"sta')
    with _ray_processes("lost-b") as (marker, ray_tmp):
        done = _search(["--storage", str(storage), "--name", "lost", "--resume"],
                       _env(marker, ray_tmp), tmp_path / "resumed.log")
    assert done.returncode == 0, _tail(done.stdout)
    assert "its last operation was cut short" in done.stdout, _tail(done.stdout)
    assert "no_such_attribute_i26" not in done.stdout, _tail(done.stdout)
    trials = scan_trials(str(run_dir))
    assert sorted(t.status for t in trials if t.status != "continued") == \
        ["finished"] * samples, [(t.name, t.status) for t in trials]
    assert _summary_counts(done.stdout)["finished"] == samples
    frame = pd.read_parquet(run_dir / "frontier.parquet")
    for trial_id, trial in before.items():  # kept, and not run again
        assert (Path(trial.folder) / "result.json").read_bytes() == results[trial_id]
    for trial in trials:  # never fewer rounds than are on disk
        on_frontier = set(frame.loc[frame["trial_id"] == trial.trial_id, "round"])
        assert on_frontier == set(trial.rounds), trial.name


# --------------------------------------------------------------------------- two phases

SCREEN_EVAL_IMAGES = 50  # of the digits test split's 360
TWO_PHASE = ["--screen", "4", "--finalists", "3", "--bn-batches", "2",
             "--screen-eval-images", str(SCREEN_EVAL_IMAGES), "--max-concurrent-trials", "1"]


def _kill_once_a_trial_finished(args: list[str], experiment: Path, log: Path, prefix: str
                                ) -> dict[str, bytes]:
    """Run the search, SIGKILL it (and its Ray) once a trial of `experiment` finished while
    another is still owed; returns the finished trials' result.json bytes."""
    with _ray_processes(prefix) as (marker, ray_tmp):
        with log.open("w") as out:
            driver = subprocess.Popen([sys.executable, RUN_PY, *args], cwd=REPO,
                                      env=_env(marker, ray_tmp), stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + SEARCH_TIMEOUT_S
            while True:
                assert driver.poll() is None, _tail(log.read_text())
                assert time.monotonic() < deadline, _tail(log.read_text())
                done = _finished(experiment)
                if done:
                    break
                time.sleep(0.2)
        finally:
            _stop(marker, driver)
    assert driver.returncode == -signal.SIGKILL
    return {t: (_dir(v) / "result.json").read_bytes() for t, v in done.items()}


def test_two_phase_search_killed_in_each_phase_resumes_and_finishes_as_a_ray_job(
        ray_head, tmp_path):
    from ccpcsa.search.finalists import load_finalists

    storage = (tmp_path / "runs").resolve()
    run_dir = storage / "two"
    args = ["--storage", str(storage), "--name", "two", *TINY, *TWO_PHASE]
    screened = _kill_once_a_trial_finished(args, run_dir / "screen", tmp_path / "a.log",
                                           "two-a")
    assert 0 < len(screened) < 4 and not (run_dir / "finalists.json").exists()
    assert not (run_dir / "finetune").exists()

    resume = ["--storage", str(storage), "--name", "two", "--resume"]
    tuned = _kill_once_a_trial_finished(resume, run_dir / "finetune", tmp_path / "b.log",
                                        "two-b")
    # one finalist at a time, killed once one had finished (on a loaded machine a second may
    # have finished too before the kill; the third is still owed)
    assert 1 <= len(tuned) < 3
    finalists_file = (run_dir / "finalists.json").read_bytes()

    job = f"ccpcsa-two-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [RAY, "job", "submit", "--address", ray_head["address"], "--working-dir", str(REPO),
         "--submission-id", job, "--", "python", RUN_PY, *resume],
        cwd=tmp_path, env=ray_head["env"], capture_output=True, text=True,
        timeout=SEARCH_TIMEOUT_S + 120, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and f"Job '{job}' succeeded" in out, _tail(out)
    assert ("screen: 4 trials finished, 0 failed, 0 interrupted, 0 not started (of 4); "
            "finetune: 3 trials finished, 0 failed, 0 interrupted, 0 not started (of 3)"
            ) in out, _tail(out)

    # nothing that had finished ran again; the finalists were chosen once
    assert (run_dir / "finalists.json").read_bytes() == finalists_file
    screen = scan_trials(str(run_dir / "screen"), "screen")
    finetune = scan_trials(str(run_dir / "finetune"), "finetune")
    for trials, before in ((screen, screened), (finetune, tuned)):
        by_id = {t.trial_id: t for t in trials}
        for trial_id, result in before.items():
            assert (Path(by_id[trial_id].folder) / "result.json").read_bytes() == result
    # an interrupted trial was continued by a new one with its schedule
    assert [t.status for t in screen if t.status != "continued"] == ["finished"] * 4
    assert [t.status for t in finetune if t.status != "continued"] == ["finished"] * 3
    finalists = load_finalists(str(run_dir))
    assert len(finalists) == 3 and {f.screened_trial for f in finalists} <= {
        t.trial_id for t in screen}
    schedules = {f.screened_trial: f.params for f in finalists}
    tuned_once = [t for t in finetune if t.status == "finished"]
    assert len({t.params["screened_trial"] for t in tuned_once}) == len(tuned_once)
    for trial in finetune:  # each finalist fine-tuned once, with its screened schedule
        params = dict(trial.params)
        assert params.pop("screened_trial") in schedules
        assert params == schedules[trial.params["screened_trial"]]
    assert {t.params["screened_trial"] for t in finetune} == set(schedules)

    frame = pd.read_parquet(run_dir / "frontier.parquet")
    for trial in [*screen, *finetune]:  # every round on disk is a point, as reported
        rows = frame[frame["trial_id"] == trial.trial_id]
        assert set(rows["phase"]) == {trial.phase}, trial.name
        assert _frontier_rounds(frame, trial.trial_id) == _round_reports(Path(trial.folder))
        assert (rows["compute_s"] > 0).all() and set(rows["compute_unit"]) == {"cpu"}
    screen_rows = frame[frame["phase"] == "screen"]
    assert len(screen_rows) == sum(len(t.rounds) for t in screen) > 0
    assert not screen_rows["deployable"].any() and not screen_rows["pareto"].any()
    assert (screen_rows["accuracy"] == screen_rows["accuracy_pruned"]).all()  # no fine-tune
    # screened on 50 test images (whole counts of 2 %); the finalists on the whole split
    correct = screen_rows["accuracy"] * SCREEN_EVAL_IMAGES / 100
    assert ((correct - correct.round()).abs() < 1e-6).all(), screen_rows["accuracy"].tolist()
    screening_log = (tmp_path / "a.log").read_text()
    assert "adaptive-BN evaluation on a fixed 50 test images" in screening_log, \
        _tail(screening_log)
    tuned_rows = frame[frame["phase"] == "finetune"]
    assert tuned_rows["deployable"].all() and tuned_rows["accuracy_pruned"].notna().all()
    assert frame["pareto"].tolist() == _expected_frontier(frame)
    assert frame["pareto"].sum() >= 1
    for row in frame.to_dict("records"):
        assert bool(row["frontier_checkpoint"]) == bool(row["pareto"]), row
    saved = json.loads((run_dir / "search_config.json").read_text())["config"]
    _, test_set = build_datasets(DataConfig("digits", image_size=saved["image_size"]))
    eval_cfg = TrainConfig(batch_size=saved["batch_size"], lr=saved["lr"], seed=saved["seed"])
    for row in frame[frame["pareto"]].to_dict("records"):  # what a user deploys re-measures
        model = load_checkpoint(row["frontier_checkpoint"])
        assert count_flops(model, (3, IMAGE_SIZE, IMAGE_SIZE)) == row["flops"]
        with _torch_threads(1):
            assert abs(evaluate(model, test_set, eval_cfg) - row["accuracy"]) <= 1e-6
