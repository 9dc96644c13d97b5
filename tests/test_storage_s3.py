"""Results storage on an S3-compatible server: a moto server on 127.0.0.1 (a free port) in this
process, reached through the AWS_* variables as cluster/rehearse.py's processes reach theirs.
Skipped where moto (the dev extra's moto[s3], flask, flask-cors) is not installed."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

pytest.importorskip("moto.server")
pytest.importorskip("flask_cors")

from ccpcsa import storage  # noqa: E402

BUCKET = "ccpcsa-test"


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """The endpoint of a moto S3 server holding an empty bucket BUCKET."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3(s3_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh folder URI in the bucket for one test."""
    return f"s3://{BUCKET}/{request.node.name}"


def test_writes_listings_moves_and_removals(s3):
    storage.check_writable(s3)
    storage.write_json(storage.join(s3, "run/config.json"), {"a": 1})
    storage.write_json(storage.join(s3, "run/config.json"), {"a": 2})
    assert storage.read_json(storage.join(s3, "run/config.json")) == {"a": 2}
    assert storage.is_file(storage.join(s3, "run/config.json"))
    assert storage.list_files(s3) == ["run/config.json"]  # no probe, no temporary left
    assert [i.base_name for i in storage.list_dir(s3)] == ["run"]
    assert storage.list_dir(storage.join(s3, "none")) == []
    storage.move(storage.join(s3, "run/config.json"), storage.join(s3, "aside/config.json"))
    assert storage.list_files(s3) == ["aside/config.json"]
    storage.remove(storage.join(s3, "aside/missing.json"))
    storage.remove_tree(storage.join(s3, "aside"))
    assert storage.list_files(s3) == []


def test_lock_refuses_a_second_run_and_takes_over_a_dead_holders(s3):
    import json
    import subprocess
    import sys

    from ccpcsa.runlock import LOCK_FILE, RunInUseError, RunLock, read_holder

    run = storage.join(s3, "run")
    with RunLock(run, "first") as first:
        with pytest.raises(RunInUseError, match="in use by pid"):
            RunLock(run, "second").acquire()
        assert read_holder(run).token == first.holder.token
    assert not storage.exists(storage.join(run, LOCK_FILE))

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    lock = RunLock(run, "killed")
    body = {**json.loads(json.dumps(lock.holder.__dict__)), "pid": int(dead.stdout)}
    storage.write_json(storage.join(run, LOCK_FILE), body)
    with RunLock(run, "resumed") as resumed:
        assert read_holder(run).token == resumed.holder.token


def test_a_restarted_fit_resumes_from_its_last_epoch_checkpoint(s3):
    import torch

    from ccpcsa.distributed.worker import _latest_epoch_state, _save_epoch

    fit = storage.join(s3, "train/trial/group-1/0003-round-1")
    for epoch in (1, 2, 3):
        _save_epoch(fit, epoch, {"epoch": epoch})
    assert storage.list_files(fit) == ["epoch-0002.pt", "epoch-0003.pt"]
    assert _latest_epoch_state(fit, torch.device("cpu")) == {"epoch": 3}


def test_data_fingerprint_sees_every_object_under_the_root(s3):
    """No folder mtimes on S3: an image added, changed or removed three levels down (an
    ImageFolder's root/train/CLASS/img.jpg) changes the stage-0 key; nothing else does."""
    root = storage.join(s3, "data")
    storage.write_bytes(storage.join(root, "train/cat/a.jpg"), b"a")
    before = storage.fingerprint(root)
    assert storage.fingerprint(root) == before
    storage.write_bytes(storage.join(root, "train/cat/b.jpg"), b"b")
    added = storage.fingerprint(root)
    assert added != before
    storage.write_bytes(storage.join(root, "train/cat/b.jpg"), b"bigger")
    changed = storage.fingerprint(root)
    assert changed not in (before, added)
    storage.remove(storage.join(root, "train/cat/b.jpg"))
    assert storage.fingerprint(root) not in (added, changed)
    assert storage.fingerprint(storage.join(s3, "none")) == "missing"
