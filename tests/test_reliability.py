"""Nothing lost, nothing mixed, every bad input refused up front (issue 12).

- Run-folder locks, with two real processes: a second prune into the same --out, or a search
  on a locked <storage>/<name>, is refused with "in use by pid N on host H"; a lock whose
  holder was SIGKILLed is taken over.
- Atomic writes: a full disk (a 512 KiB tmpfs where the machine allows mounting one, else a
  storage layer that raises ENOSPC) leaves the old file or none, never a 0-byte one, and the
  run works once space is freed; an empty JSON file is an error naming it.
- Stage-0 cache keyed by the data, batch size and workers; step 1 cached apart from step 2.
- Every bad setting of the search (flags, YAML, a saved run's configuration) and of the prune
  CLI is one line before anything starts; a broken checkpoint is one CheckpointError naming
  the file; a tampered CIFAR batch cannot run code; a truncated JPEG error names its path; a
  diverging run, Ctrl-C and SIGTERM end in one line with exit codes 1, 130 and 143.
- A prune rerun leaves no stale round checkpoint; a re-collected frontier/ no stale copy.
- The trials on disk are read without Tune: a round whose report missed result.json is read
  from its checkpoint; Tune's state is trusted only when it parses and agrees with the disk.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from ccpcsa import storage
from ccpcsa.__main__ import main as prune_main
from ccpcsa.checkpoint import CheckpointError, CheckpointInfo, load_checkpoint, save_checkpoint
from ccpcsa.data import DataConfig, DataError, build_datasets, check_dataset
from ccpcsa.loop import PrepareConfig, prepare, stage0_keys
from ccpcsa.models import build_model
from ccpcsa.runlock import LOCK_FILE, Holder, RunInUseError, RunLock, is_stale
from ccpcsa.search import run as search_run
from ccpcsa.search.ondisk import CAUSE_LOST, CONTINUES_FILE, counts, remove_unstarted, scan_trials
from ccpcsa.search.pareto import collect_checkpoints
from ccpcsa.search.resume import plan_session
from ccpcsa.search.retry import params_key
from ccpcsa.train import LocalRunner, TrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "resnet20", "--dataset", "digits", "--image-size", "8",
        "--baseline-epochs", "1", "--attention-epochs", "1", "--max-rounds", "1",
        "--calibration-batches", "1", "--batch-size", "256", "-m", "4"]  # -m last: prune only


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **extra)
    return env


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


# --------------------------------------------------------------------------- 2. locks


def test_second_prune_into_one_out_is_refused_and_ctrl_c_ends_the_first(tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-m", "ccpcsa", "prune", *TINY, "--baseline-epochs", "100000",
         "--out", str(out)], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)  # epochs: still in step 1 when Ctrl-C comes
    try:
        _wait_for(out / LOCK_FILE, first)
        second = subprocess.run([sys.executable, "-m", "ccpcsa", "prune", *TINY,
                                 "--out", str(out)], cwd=REPO, env=_env(),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        line = _one_error_line(second.stderr)
        assert f"is in use by pid {first.pid} on host {socket.gethostname()}" in line, line
        assert str(out) in line
        first.send_signal(signal.SIGINT)  # Ctrl-C during step 1
        _out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err
    assert "interrupted" in _one_error_line(err)
    assert not (out / LOCK_FILE).exists(), "the lock outlived its run"


def test_search_on_a_locked_run_is_refused_before_ray(tmp_path):
    runs = tmp_path / "runs"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from ccpcsa.runlock import RunLock\n"
         "with RunLock(sys.argv[1], 'holder'):\n print('held', flush=True); time.sleep(300)",
         str(runs / "cc")], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    ray_tmp = tmp_path / "ray"
    try:
        assert holder.stdout.readline().strip() == "held"
        search = subprocess.run(
            [sys.executable, "search/run.py", *TINY[:-2], "--storage", str(runs), "--name", "cc"],
            cwd=REPO, env=_env(RAY_TMPDIR=str(ray_tmp)), capture_output=True, text=True,
            timeout=300)
        assert search.returncode == 2, search.stderr
        line = _one_error_line(search.stderr)
        assert f"run {runs / 'cc'} is in use by pid {holder.pid} on host" in line, line
        assert not (runs / "cc" / "search_config.json").exists()
        assert not ray_tmp.exists(), "Ray was started for a locked run"
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, stale
        holder.wait()
    assert (runs / "cc" / LOCK_FILE).exists()
    with RunLock(str(runs / "cc"), "test") as lock:  # the stale lock is taken over
        assert json.loads((runs / "cc" / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert lock.held
    assert not (runs / "cc" / LOCK_FILE).exists()


def test_lock_staleness_rules(tmp_path):
    me = Holder(socket.gethostname(), os.getpid(), "now", "x", "t", "")
    assert not is_stale(me)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert is_stale(Holder(socket.gethostname(), dead.pid, "now", "x", "t"))
    # a live pid that now belongs to a process started at another time: reused, stale
    assert is_stale(Holder(socket.gethostname(), os.getpid(), "now", "x", "t", "1"))
    # another host's pid cannot be checked from here: never taken over
    elsewhere = Holder("another-host", dead.pid, "2026-01-01T00:00:00", "search", "t")
    (tmp_path / LOCK_FILE).write_text(json.dumps(elsewhere.__dict__))
    with pytest.raises(RunInUseError, match=f"pid {dead.pid} on host another-host"):
        RunLock(str(tmp_path), "test").acquire()


# --------------------------------------------------------------------------- 4. atomic writes


@pytest.fixture
def small_disk(monkeypatch):
    """(folder, filler path, real): a 512 KiB tmpfs when it can be mounted (real=True), else a
    folder whose storage writes of more than 512 KiB raise ENOSPC."""
    folder = Path(tempfile.mkdtemp(prefix="i12-disk-", dir="/tmp"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if not mounted:
        real_replace = storage._replace_local

        def full(target: str, data: bytes) -> None:
            if target.startswith(str(folder)) and len(data) > 512 * 1024:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_replace(target, data)

        monkeypatch.setattr(storage, "_replace_local", full)
    try:
        yield folder, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)
        shutil.rmtree(folder, ignore_errors=True)


def test_full_disk_keeps_the_old_file_and_leaves_no_temporary(small_disk):
    folder, _ = small_disk
    target = str(folder / "prepared" / "prepare.json")
    storage.write_json(target, {"key": "old"})
    with pytest.raises(OSError) as info:
        storage.write_bytes(target, b"x" * (1024 * 1024))
    assert info.value.errno == errno.ENOSPC and target in str(info.value)
    assert storage.read_json(target) == {"key": "old"}
    assert sorted(os.listdir(folder / "prepared")) == ["prepare.json"]


def test_prune_on_a_full_disk_fails_in_one_line_then_runs_once_space_is_freed(
        small_disk, tmp_path, capsys):
    folder, _ = small_disk
    out = folder / "run"
    code = prune_main(["prune", *TINY, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1, err
    line = _one_error_line(err)
    assert "No space left on device" in line and str(out) in line, line
    for path in out.rglob("*"):
        assert not path.is_file() or path.stat().st_size > 0, f"{path} is empty"
        assert not path.name.endswith(".tmp"), path
    assert not (out / "prepared" / "baseline.json").exists()
    assert not (out / "prepared" / "prepare.json").exists()
    assert not (out / LOCK_FILE).exists()
    # more space (the same folder on a real disk): the same command completes
    roomy = tmp_path / "run"
    shutil.copytree(out, roomy)
    assert prune_main(["prune", *TINY, "--out", str(roomy)]) == 0, capsys.readouterr().err
    assert (roomy / "final.pt").is_file()


def test_empty_json_is_an_error_naming_the_file(tmp_path):
    empty = tmp_path / "search_config.json"
    empty.write_text("")
    with pytest.raises(storage.CorruptFileError, match=f"{empty} is empty"):
        storage.read_json(str(empty))
    empty.write_text('{"config": ')
    with pytest.raises(storage.CorruptFileError, match="not valid JSON"):
        storage.read_json(str(empty))


def test_resume_with_a_corrupt_saved_configuration_is_one_line(tmp_path, capsys):
    run = tmp_path / "runs" / "cc"
    run.mkdir(parents=True)
    (run / "search_config.json").write_text("")
    code = search_run.main(["--storage", str(tmp_path / "runs"), "--name", "cc", "--resume"])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(run / "search_config.json") in line and "empty" in line, line


# --------------------------------------------------------------------------- 3, 6. stage 0


class CountingRunner(LocalRunner):
    """The real one-process runner, recording which steps it trained; raises
    KeyboardInterrupt at `interrupt_at` (a kill in the middle of that step)."""

    def __init__(self, interrupt_at: str = "", batch_size: int = 32) -> None:
        train, test = build_datasets(DataConfig("digits", image_size=8))
        # a slice of digits: what is tested is which steps run, not how well they learn
        train, test = Subset(train, range(256)), Subset(test, range(128))
        super().__init__(train, test, TrainConfig(batch_size=batch_size))
        self.trained: list[str] = []
        self.interrupt_at = interrupt_at

    def fit(self, model, epochs, lr, label="train"):
        if label == self.interrupt_at:
            raise KeyboardInterrupt
        self.trained.append(label)
        return super().fit(model, epochs, lr, label)


def _prep(**changes) -> PrepareConfig:
    values = dict(model="resnet20", num_classes=10, input_shape=(3, 8, 8), baseline_epochs=1,
                  attention_epochs=1, batch_size=32)
    return PrepareConfig(**{**values, **changes})


def test_stage0_cache_is_keyed_by_data_batch_and_workers(tmp_path):
    data_a, data_b = tmp_path / "a", tmp_path / "b"
    for folder in (data_a, data_b):
        (folder / "train" / "cat").mkdir(parents=True)
    cache = str(tmp_path / "prepared")
    runner = CountingRunner()
    prepare(_prep(data_root=str(data_a)), runner, cache)
    prepare(_prep(data_root=str(data_a)), runner, cache)
    assert runner.trained == ["baseline", "attention"], "the same settings must reuse"
    runner.trained.clear()
    prepare(_prep(data_root=str(data_b)), runner, cache)  # another data root
    assert runner.trained == ["baseline", "attention"]
    base = stage0_keys(_prep(data_root=str(data_a)))
    for change in ({"batch_size": 64}, {"workers": 2}, {"sync_bn": True}, {"lr": 0.1},
                   {"seed": 1}, {"baseline_epochs": 2}, {"input_shape": (3, 16, 16)}):
        changed = stage0_keys(_prep(data_root=str(data_a), **change))
        assert changed[0] != base[0] and changed[1] != base[1], change
    # the same root with other content: a new file changes the fingerprint
    (data_a / "train" / "cat" / "new.png").write_bytes(b"png")
    assert stage0_keys(_prep(data_root=str(data_a)))[0] != base[0]
    # attention epochs change step 2 only
    base, attention = stage0_keys(_prep(attention_epochs=3))
    assert base == stage0_keys(_prep(attention_epochs=1))[0]
    assert attention != stage0_keys(_prep(attention_epochs=1))[1]


def test_a_kill_during_step_2_does_not_retrain_step_1(tmp_path):
    cache = str(tmp_path / "prepared")
    with pytest.raises(KeyboardInterrupt):
        prepare(_prep(), CountingRunner(interrupt_at="attention"), cache)
    resumed = CountingRunner()
    prepared = prepare(_prep(), resumed, cache)
    assert resumed.trained == ["attention"]
    fresh = CountingRunner()
    again = prepare(_prep(), fresh, str(tmp_path / "fresh"))
    assert fresh.trained == ["baseline", "attention"]
    # step 2 is reseeded: the same result whether step 1 was trained or loaded
    assert prepared.attention_accuracy == pytest.approx(again.attention_accuracy)
    assert prepared.baseline_accuracy == pytest.approx(again.baseline_accuracy)


def test_an_empty_cache_entry_is_retrained_not_fatal(tmp_path):
    cache = tmp_path / "prepared"
    prepare(_prep(), CountingRunner(), str(cache))
    (cache / "prepare.json").write_text("")
    runner = CountingRunner()
    prepare(_prep(), runner, str(cache))
    assert runner.trained == ["attention"]


# --------------------------------------------------------------------------- 7-10. settings

SEARCH_CASES = [
    # (flags, YAML text or None, words the one line must hold)
    (["--batch-size", "10", "--workers-per-trial", "4"], None, ["batch_size 10", "4"]),
    (["--seed", "-1"], None, ["seed", "-1"]),
    ([], "seed: abc\n", ["seed", "'abc'"]),
    ([], "num_samples: 2.5\n", ["num_samples", "2.5"]),
    ([], "name: 5\n", ["name", "5"]),
    ([], "storage: [a, b]\n", ["storage", "['a', 'b']"]),
    (["--storage", "bogus://bucket/runs"], None, ["bogus://", "storage"]),
    (["--storage", "s3://"], None, ["s3://", "no bucket"]),
    (["--name", ".."], None, ["name", "'..'"]),
    (["--name", "."], None, ["name", "'.'"]),
    (["--name", "a/b"], None, ["name", "'a/b'"]),
    (["--name", "a\\b"], None, ["name"]),
    (["--name", ".hidden"], None, ["name", ".hidden"]),
    (["--tolerance", "nan"], None, ["tolerance", "nan"]),
    (["--cap-range", "nan,0.5"], None, ["--cap-range", "nan"]),
    (["--gpus-per-worker", "nan"], None, ["--gpus-per-worker", "nan"]),
    (["--gpus-per-worker", "1.5"], None, ["gpus_per_worker", "1.5"]),
    (["--lr", "inf"], None, ["lr", "inf"]),
    ([], "finetune_lr: .nan\n", ["finetune_lr", "nan"]),
    ([], "per_layer: 'yes'\n", ["per_layer", "'yes'"]),
    ([], "lr_range: [0.001, .inf]\n", ["lr_range", "inf"]),
    ([], "image_size: 4\n", ["image_size", "4"]),
    (["--dataset", "imagefolder"], None, ["data_root", "imagefolder"]),
    ([], "max_failures: -1\n", ["max_failures", "-1"]),
]


@pytest.mark.parametrize("flags, yaml_text, words", SEARCH_CASES,
                         ids=[f"search-{i}" for i in range(len(SEARCH_CASES))])
def test_bad_search_setting_fails_dry_run_in_one_line(tmp_path, capsys, flags, yaml_text,
                                                       words):
    storage_flag = [] if (yaml_text or "").startswith("storage") else [
        "--storage", str(tmp_path / "runs")]
    args = [*storage_flag, *flags, "--dry-run"]
    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text(yaml_text)
        args = ["--config", str(tmp_path / "c.yaml"), *args]
    try:
        code = search_run.main(args)
    except SystemExit as exc:  # argparse's own one-line error (a flag's type: not finite)
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2, captured.out
    line = _one_error_line(captured.err)
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    assert not (tmp_path / "runs").exists()


def test_resume_validates_the_saved_configuration(tmp_path, capsys):
    run = tmp_path / "runs" / "cc"
    run.mkdir(parents=True)
    saved = search_run.SearchConfig().to_dict() | {"batch_size": 10, "workers_per_trial": 4}
    (run / "search_config.json").write_text(json.dumps({"config": saved}))
    code = search_run.main(["--storage", str(tmp_path / "runs"), "--name", "cc", "--resume"])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "batch_size 10 must split into 4" in line and "search_config.json" in line, line


def _imagefolder(root: Path, empty_class: str = "") -> None:
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            if name != empty_class:
                Image.new("RGB", (12, 12), (1, 2, 3)).save(folder / "a.png")


def test_class_folder_without_images_is_refused_before_ray(tmp_path, capsys):
    _imagefolder(tmp_path / "data", empty_class="dog")
    ray_tmp = tmp_path / "ray"
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    try:
        code = search_run.main(["--dataset", "imagefolder", "--data-root",
                                str(tmp_path / "data"), "--storage", str(tmp_path / "runs"),
                                "--name", "cc", "--image-size", "8"])
    finally:
        del os.environ["RAY_TMPDIR"]
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(tmp_path / "data" / "train" / "dog") in line and "no images" in line, line
    assert not ray_tmp.exists(), "Ray was started for bad data"
    assert not (tmp_path / "runs" / "cc" / "search_config.json").exists()


PRUNE_CASES = [
    (["--tolerance", "nan"], ["--tolerance", "nan"]),
    (["--max-ratio", "nan"], ["--max-ratio", "nan"]),
    (["--stage-cap", "layer1=nan"], ["stage_cap layer1", "nan"]),
    (["--layer-cap", "bogus=0.5"], ["--layer-cap", "bogus", "layer3.0.conv1"]),
    (["--gpus-per-worker", "nan"], ["--gpus-per-worker", "nan"]),
    (["--finetune-lr", "inf"], ["--finetune-lr", "inf"]),
    (["--device", "bogus"], ["unknown device 'bogus'"]),
    (["--batch-size", "10", "--workers", "4"], ["batch_size 10", "4"]),
    (["--seed", "-1"], ["seed", "-1"]),
    (["--out", "bogus://x"], ["out", "bogus://"]),
]


@pytest.mark.parametrize("flags, words", PRUNE_CASES,
                         ids=[f"prune-{i}" for i in range(len(PRUNE_CASES))])
def test_bad_prune_setting_is_one_line_before_training(tmp_path, capsys, flags, words):
    out = tmp_path / "out"
    try:
        code = prune_main(["prune", *TINY, "--out", str(out), *flags])
    except SystemExit as exc:  # argparse's own one-line error
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    line = _one_error_line(err)
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    assert not out.exists()


# --------------------------------------------------------------------------- 11. checkpoints


def _checkpoint(path: Path, model_name: str = "resnet20", num_classes: int = 10,
                saved_classes: int | None = None) -> None:
    model = build_model(model_name, saved_classes or num_classes)
    save_checkpoint(model, CheckpointInfo(model_name, num_classes, False, (3, 8, 8)), str(path))


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "other-format", "not-a-dict",
                                    "other-model", "classes", "no-state"])
def test_broken_checkpoint_is_one_checkpoint_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "model.pt"
    _checkpoint(path)
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("hello, not a checkpoint\n")
    elif damage == "other-format":
        torch.save({"format": "something/2", "state_dict": {}}, path)
    elif damage == "not-a-dict":
        torch.save([1, 2, 3], path)
    elif damage == "other-model":  # resnet20 weights labelled resnet56
        payload = torch.load(io.BytesIO(raw), weights_only=True)
        torch.save({**payload, "model": "resnet56"}, path)
    elif damage == "classes":  # metadata 10 classes, weights 5
        _checkpoint(path, num_classes=10, saved_classes=5)
    elif damage == "no-state":
        payload = torch.load(io.BytesIO(raw), weights_only=True)
        torch.save({k: v for k, v in payload.items() if k != "state_dict"}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message


# --------------------------------------------------------------------------- 12, 13. data


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path(tempfile.gettempdir()) / f"i12-pwned-{os.getpid()}"


def _cifar10(root: Path, protocol: int, batch_factory=None) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": [1, 2],
                 b"data": rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)}
        if batch_factory is not None and name == "data_batch_2":
            batch = batch_factory()
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_of_any_pickle_protocol_load(tmp_path, protocol):
    _cifar10(tmp_path, protocol)
    train, test = build_datasets(DataConfig("cifar10", str(tmp_path), augment=False))
    assert (len(train), len(test)) == (10, 2) and train[0][0].shape == (3, 32, 32)
    assert [test[i][1] for i in range(2)] == [1, 2]


def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path):
    MARKER.unlink(missing_ok=True)
    _cifar10(tmp_path, 2, batch_factory=lambda: {b"data": _RunsCode()})
    with pytest.raises(DataError) as info:
        build_datasets(DataConfig("cifar10", str(tmp_path)))
    assert "data_batch_2" in str(info.value) and "posix.system" in str(info.value)
    assert not MARKER.exists(), "the pickle ran code"


def test_truncated_jpeg_error_names_the_file(tmp_path):
    _imagefolder(tmp_path)
    jpeg = tmp_path / "train" / "cat" / "b.jpg"
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="JPEG")
    jpeg.write_bytes(buffer.getvalue()[:300])
    check_dataset(DataConfig("imagefolder", str(tmp_path)))  # listing is fine
    train, _ = build_datasets(DataConfig("imagefolder", str(tmp_path), 8, augment=False))
    index = next(i for i, (p, _) in enumerate(train.samples) if p.endswith("b.jpg"))
    with pytest.raises(DataError, match=str(jpeg)):
        train[index]


def test_diverging_training_is_one_line_exit_1(tmp_path, capsys):
    code = prune_main(["prune", *TINY, "--baseline-epochs", "0", "--attention-epochs", "0",
                       "--finetune-lr", "1e30", "--tolerance", "100",
                       "--out", str(tmp_path / "out")])
    assert code == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "training diverged" in line and "loss became" in line, line


def test_sigterm_ends_prune_in_one_line_with_143(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "ccpcsa", "prune", *TINY,
                             "--baseline-epochs", "500", "--out", str(out)], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for(out / LOCK_FILE, proc)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "interrupted" in _one_error_line(err)
    assert not (out / LOCK_FILE).exists()


# --------------------------------------------------------------------------- stale results


def test_prune_rerun_needs_overwrite_and_leaves_no_stale_round(tmp_path, capsys):
    out = tmp_path / "out"
    assert prune_main(["prune", *TINY, "--max-rounds", "2", "--tolerance", "100",
                       "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "round_000.pt", "round_001.pt", "round_002.pt"]
    capsys.readouterr()
    assert prune_main(["prune", *TINY, "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--overwrite" in line and "rounds.parquet" in line and "3 round" in line, line
    assert prune_main(["prune", *TINY, "--max-rounds", "1", "--tolerance", "100", "-m", "6",
                       "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "round_000.pt", "round_001.pt"]
    from ccpcsa.flops import count_flops

    for row in pq.read_table(out / "rounds.parquet").to_pylist():  # nothing mixed
        assert count_flops(load_checkpoint(row["checkpoint"]), (3, 8, 8)) == row["flops"]


def test_recollected_frontier_leaves_no_stale_copy(tmp_path):
    run = tmp_path / "run"
    old = run / "frontier" / "old_trial_round3.pt"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"stale")
    source = tmp_path / "m.pt"
    _checkpoint(source)
    frame = pd.DataFrame([{"trial_id": "t1", "round": 1, "accuracy": 90.0, "flops": 5,
                           "params": 3, "checkpoint": str(source)}])
    out = collect_checkpoints(frame, str(run))
    assert sorted(p.name for p in (run / "frontier").iterdir()) == ["t1_round1.pt"]
    assert load_checkpoint(out["frontier_checkpoint"][0]) is not None


# --------------------------------------------------------------------------- 1. on disk


def _trial_folder(run: Path, trial_id: str, number: int, rounds: list[int],
                  reported: list[int], final: bool = False) -> Path:
    """A trial folder in Tune's layout, with real checkpoints; `reported` rounds made it to
    result.json (the others were checkpointed but their report was lost)."""
    folder = run / f"run_trial_{trial_id}_{number}_groups_per_round=4_2026-01-01_00-00-0{number}"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, rnd in enumerate(rounds):
        name = f"checkpoint_{index:06d}"
        model = build_model("resnet20", 10, with_bam=True)
        metrics = {"accuracy": 90.0 - rnd, "flops": 1000 - rnd, "params": 100 - rnd}
        save_checkpoint(model, CheckpointInfo("resnet20", 10, True, (3, 8, 8), "digits",
                                              metrics, {"round": rnd}),
                        str(folder / name / "model.pt"))
        if rnd in reported:
            lines.append(json.dumps({"round": rnd, **metrics, "is_final": False,
                                     "checkpoint_dir_name": name, "trial_id": trial_id,
                                     "config": {"groups_per_round": 4}}))
    if final:
        lines.append(json.dumps({"round": rounds[-1], "accuracy": 1.0, "flops": 1, "params": 1,
                                 "is_final": True, "trial_id": trial_id}))
    (folder / "result.json").write_text("\n".join(lines) + '\n{"round": 9, "accur')
    return folder


def test_rounds_on_disk_are_found_even_when_their_report_was_lost(tmp_path):
    run = tmp_path / "run"
    _trial_folder(run, "aaaa1111", 1, rounds=[1, 2], reported=[1, 2], final=True)
    _trial_folder(run, "bbbb2222", 2, rounds=[1, 2, 3], reported=[1])
    failed = _trial_folder(run, "cccc3333", 3, rounds=[], reported=[])
    (failed / "error.txt").write_text("Traceback ...\nRuntimeError: boom\n")
    trials = {t.trial_id: t for t in scan_trials(str(run))}
    assert trials["aaaa1111"].status == "finished" and sorted(trials["aaaa1111"].rounds) == [1, 2]
    interrupted = trials["bbbb2222"]
    assert interrupted.status == "interrupted" and sorted(interrupted.rounds) == [1, 2, 3]
    assert interrupted.rounds[3]["flops"] == 997 and interrupted.rounds[3]["checkpoint"]
    assert trials["cccc3333"].status == "failed" and trials["cccc3333"].error == \
        "RuntimeError: boom"


def test_an_error_txt_cut_short_names_no_false_cause(tmp_path):
    run = tmp_path / "run"
    causes = {"dddd4444": "Failure # 1\nTraceback (most recent call last):\n  File \"t.py\", "
              "line 3, in f\n    open(p).write(b)\n    ^^^^^\nOSError: [Errno 28] No space left "
              "on device\n  during handling",
              "eeee5555": "Failure # 1\nTraceback (most recent call last):\n  File \"t.py\", "
              "line 3, in f\n    open(p).write(b)\n    ^^^^^\n", "ffff6666": ""}
    for number, (trial_id, text) in enumerate(causes.items(), 1):
        folder = _trial_folder(run, trial_id, number, rounds=[], reported=[])
        (folder / "error.txt").write_text(text)
    errors = {t.trial_id: t.error for t in scan_trials(str(run))}
    assert errors["dddd4444"] == "OSError: [Errno 28] No space left on device"
    assert errors["eeee5555"] == errors["ffff6666"] == CAUSE_LOST


def test_a_trial_created_but_never_started_is_removed_once_its_phase_is_done(tmp_path):
    # Tune created the trial, then the search was killed before it started: a folder with
    # only Tune's params.json; the resume ran the trial owed under another id
    run = tmp_path / "run"
    _trial_folder(run, "aaaa1111", 1, rounds=[1], reported=[1], final=True)
    orphan = run / "run_trial_bbbb2222_2_groups_per_round=4_2026-01-01_00-00-02"
    orphan.mkdir()
    (orphan / "params.json").write_text(json.dumps({"groups_per_round": 4}))
    interrupted = _trial_folder(run, "cccc3333", 3, rounds=[1], reported=[1])
    trials = scan_trials(str(run))
    assert [t.status for t in trials] == ["finished", "not started", "interrupted"]
    kept = remove_unstarted(trials)
    assert [t.trial_id for t in kept] == ["aaaa1111", "cccc3333"]
    assert not orphan.exists() and interrupted.exists()
    assert [t.trial_id for t in scan_trials(str(run))] == ["aaaa1111", "cccc3333"]


def test_resume_plans_from_the_trial_folders_and_never_reads_tune_state(tmp_path):
    run = tmp_path / "run"
    _trial_folder(run, "aaaa1111", 1, rounds=[1], reported=[1], final=True)
    _trial_folder(run, "bbbb2222", 2, rounds=[1, 2, 3], reported=[1])  # interrupted
    (_trial_folder(run, "cccc3333", 3, rounds=[], reported=[]) / "error.txt").write_text(
        "RuntimeError: boom\n")
    # Tune's own state, cut short or planted: never read, never unpickled
    (run / "tuner.pkl").write_bytes(pickle.dumps(getattr)[:5])
    (run / "experiment_state-2026-01-01_00-00-00.json").write_text("")
    trials = scan_trials(str(run))
    plan = plan_session(trials, 5, retry_failed=False)
    assert plan.new == 2 and plan.num_samples == 3  # 5 owed, 3 hold a place, 1 continues
    key = params_key({"groups_per_round": 4})
    assert plan.again.configs == [{"groups_per_round": 4}]
    assert plan.again.start_from[key].endswith("checkpoint_000002/model.pt")  # round 3
    assert plan.again.continues == {key: "bbbb2222"}

    # the continuing trial says so; until it reports a round the old one stays interrupted
    follow = _trial_folder(run, "dddd4444", 4, rounds=[], reported=[])
    (follow / CONTINUES_FILE).write_text(json.dumps({"trial": "bbbb2222"}))
    assert {t.trial_id: t.status for t in scan_trials(str(run))}["bbbb2222"] == "interrupted"
    _trial_folder(run, "dddd4444", 4, rounds=[4], reported=[4])
    trials = scan_trials(str(run))
    assert {t.trial_id: t.status for t in trials} == {
        "aaaa1111": "finished", "bbbb2222": "continued", "cccc3333": "failed",
        "dddd4444": "interrupted"}
    assert counts(trials, 5)["not started"] == 2  # the continuation took the old one's place
    plan = plan_session(trials, 5, retry_failed=True)
    assert plan.again.continues == {key: "dddd4444"} and plan.new == 2
    assert "dddd4444" in plan.again.start_from[key]  # from the newer trial's last round
    assert plan.again.fresh == 1  # cccc3333 failed before saving its parameters: replaced
    assert plan.num_samples == 4
