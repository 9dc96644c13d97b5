"""Results storage given as a URI (file://, the local stand-in for s3:// and gs://) works for
the prune CLI, the search and the report, through pyarrow.fs and Ray's storage; writes are
atomic and run locks hold on file:// URIs and on object stores (fsspec's in-memory file system
stands in for one); the data fingerprint of the stage-0 cache key sees added files."""

import subprocess
import sys
from pathlib import Path

import pytest

from ccpcsa import load_checkpoint, storage
from ccpcsa.search.pareto import read_frontier

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "resnet20", "--dataset", "digits", "--image-size", "8",
        "--baseline-epochs", "1", "--attention-epochs", "1", "--max-rounds", "1"]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_prune_search_and_report_on_a_file_uri(tmp_path):
    out = f"file://{tmp_path}/prune"
    _run(["-m", "ccpcsa", "prune", *TINY, "--out", out])
    assert (tmp_path / "prune" / "rounds.parquet").is_file()
    final = load_checkpoint(storage.join(out, "final.pt"))
    assert final.training is False

    # --workers-per-trial 2: stage 0 and the trial's rounds run data-parallel under Ray Train,
    # stage 0 on one worker group and all the trial's rounds on another, each group's Ray
    # Train run leaving its folder in <run>/train/
    runs = f"file://{tmp_path}/runs"
    search = _run(["search/run.py", *TINY, "--num-samples", "1", "--storage", runs, "--name",
                   "uri", "--workers-per-trial", "2", "--cpus-per-worker", "0.5"])
    for fit in ("baseline", "attention", "round 1"):
        assert f"{fit} (2 workers) epoch 1/1" in search.stdout + search.stderr, fit
    groups = [p.parent.name for p in (tmp_path / "runs" / "uri" / "train").glob("*/group-*")]
    assert len(groups) == 2 and "stage0" in groups, groups
    frame, baseline = read_frontier(storage.join(runs, "uri"))
    assert baseline is not None and len(frame) >= 2  # the unpruned model and round 1
    for path in frame.loc[frame["pareto"], "checkpoint"]:
        assert load_checkpoint(path) is not None
    assert (tmp_path / "runs" / "uri" / "frontier.png").is_file()
    report = _run(["search/report.py", storage.join(runs, "uri")])
    assert "plot:" in report.stdout
    # every frontier point and the baseline have their inference latency, measured after
    # the trials on a worker with one training worker's resources (here: a CPU)
    front = frame[frame["pareto"]]
    assert (front["latency_ms"] > 0).all() and (front["latency_batch_ms"] > 0).all()
    assert front["latency_device"].str.startswith("cpu: ").all()
    assert frame.loc[~frame["pareto"], "latency_ms"].isna().all()
    assert baseline["latency_ms"] > 0
    report = _run(["search/report.py", storage.join(runs, "uri"), "--x", "latency"])
    assert "ms b1" in report.stdout
    assert (tmp_path / "runs" / "uri" / "frontier_latency.png").is_file()


# --------------------------------------------------------------------------- writes and locks


def test_atomic_write_on_a_file_uri_leaves_no_temporary(tmp_path):
    uri = f"file://{tmp_path}/run/config.json"
    storage.write_json(uri, {"a": 1})
    storage.write_json(uri, {"a": 2})
    assert storage.read_json(uri) == {"a": 2}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json"]
    assert storage.list_files(f"file://{tmp_path}") == ["run/config.json"]


def test_lock_on_a_file_uri_is_the_local_exclusive_create(tmp_path):
    from ccpcsa.runlock import LOCK_FILE, RunInUseError, RunLock

    uri = f"file://{tmp_path}/run"
    with RunLock(uri, "first"):
        assert (tmp_path / "run" / LOCK_FILE).is_file()
        try:
            RunLock(uri, "second").acquire()
            raise AssertionError("a second lock was granted")
        except RunInUseError as exc:
            assert "in use by pid" in str(exc) and "(first," in str(exc)
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_lock_on_an_object_store_is_check_write_read_back():
    """Object stores have no exclusive create in pyarrow.fs; fsspec's in-memory file system
    stands in for one (no local path): the second run is still refused."""
    from ccpcsa.runlock import RunInUseError, RunLock

    uri = "fsspec+memory:///ccpcsa-test/run"
    with RunLock(uri, "first"):
        try:
            RunLock(uri, "second").acquire()
            raise AssertionError("a second lock was granted")
        except RunInUseError as exc:
            assert uri in str(exc)
    assert not storage.exists(f"{uri}/.ccpcsa.lock")


def test_data_fingerprint_sees_added_files_two_levels_down(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    before = storage.fingerprint(str(tmp_path))
    assert storage.fingerprint(str(tmp_path)) == before
    (tmp_path / "train" / "cat" / "a.png").write_bytes(b"x")  # changes the class folder's mtime
    added = storage.fingerprint(str(tmp_path))
    assert added != before and storage.fingerprint(str(tmp_path)) == added
    (tmp_path / "train" / "cat" / "a.png").unlink()
    assert storage.fingerprint(str(tmp_path)) != added
    assert storage.fingerprint(f"file://{tmp_path}") == storage.fingerprint(str(tmp_path))
    assert storage.fingerprint(None) == ""
    assert storage.fingerprint(str(tmp_path / "no")) == "missing"
