"""Nothing runs that the user did not ask for, a full disk loses nothing, every signal is
honoured (issue 26).

- A checkpoint naming MODULE:CALLABLE is refused before anything is imported unless the
  caller trusts it (trust_model_code / --trust-model-code, or it is the user's own --model).
- Wrong-shaped tensors in a checkpoint or --weights are one line.
- --resume refuses settings that differ from the saved ones, listing them, except those
  resume may change.
- Smaller ones: an over-long --name fails --dry-run; an unwritable storage is exit 2 in both
  CLIs; a tampered CIFAR batch is refused before Ray starts; torch.load's errors are one
  sentence; a cut-short --weights file is called cut short; a prune that kept no pruned round
  says so in its last line.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ccpcsa.__main__ import main as prune_main
from ccpcsa.checkpoint import CheckpointError, CheckpointInfo, load_checkpoint, save_checkpoint
from ccpcsa.models import build_model
from ccpcsa.search import run as search_run

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return env


def _checkpoint(path: Path, **changes) -> Path:
    """A valid resnet20 checkpoint, its payload changed by `changes` (None deletes a key)."""
    model = build_model("resnet20", 10)
    save_checkpoint(model, CheckpointInfo("resnet20", 10, False, (3, 8, 8)), str(path))
    payload = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
    for key, value in changes.items():
        payload[key] = value
    torch.save(payload, path)
    return path


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


# --------------------------------------------------------------------------- 1. model code

@pytest.mark.parametrize("name", ["os:_exit", "antigravity:x"])
def test_a_checkpoint_naming_code_is_refused_before_any_import(tmp_path, name):
    path = _checkpoint(tmp_path / "model.pt", model=name)
    # in a fresh interpreter: which modules the refusal imported, and that it returns at all
    probe = (f"import sys\nfrom ccpcsa.checkpoint import CheckpointError, load_checkpoint\n"
             f"try:\n    load_checkpoint({str(path)!r})\nexcept CheckpointError as e:\n"
             f"    print('refused:', e)\nprint('antigravity' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    refused, imported = proc.stdout.strip().splitlines()
    assert refused.startswith("refused:") and repr(name) in refused, refused
    assert "--trust-model-code" in refused and str(path) in refused
    assert imported == "False"
    # the CLI: one line, exit 2, nothing exported, no browser opened, the process not ended
    proc = subprocess.run([sys.executable, "-m", "ccpcsa", "export", str(path), "--format",
                           "torchscript"], capture_output=True, text=True, env=_env(),
                          timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert repr(name) in _one_error_line(proc.stderr)
    assert not list(tmp_path.glob("*.torchscript.pt"))


def test_a_checkpoint_naming_code_loads_when_trusted_or_named_by_the_user(tmp_path,
                                                                          monkeypatch):
    (tmp_path / "usernets26.py").write_text(
        "from ccpcsa.models import CifarResNet\n"
        "def build(num_classes):\n    return CifarResNet(20, num_classes)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    name = "usernets26:build"
    path = _checkpoint(tmp_path / "model.pt", model=name)
    try:
        with pytest.raises(CheckpointError, match="refused"):
            load_checkpoint(str(path))
        assert "usernets26" not in sys.modules
        assert load_checkpoint(str(path), trust_model_code=True).ccpcsa_model == name
        assert load_checkpoint(str(path), user_model=name).ccpcsa_model == name
        with pytest.raises(CheckpointError, match="refused"):  # another user's model: no
            load_checkpoint(str(path), user_model="other:build")
    finally:
        sys.modules.pop("usernets26", None)
    proc = subprocess.run([sys.executable, "-m", "ccpcsa", "export", str(path), "--format",
                           "torchscript", "--trust-model-code"], capture_output=True,
                          text=True, env={**_env(), "PYTHONPATH": f"{REPO}:{tmp_path}"},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "model.torchscript.pt").is_file()


@pytest.mark.parametrize("name", [["resnet20"], 3, ""])
def test_a_model_name_that_is_not_a_string_is_one_error(tmp_path, name):
    path = _checkpoint(tmp_path / "model.pt", model=name)
    with pytest.raises(CheckpointError, match="not a model name"):
        load_checkpoint(str(path))


# --------------------------------------------------------------------------- 2. tensor shapes

WRONG_TENSORS = {  # conv1.weight is 16x3x3x3, bn1 has 16 channels
    "1-d conv weight": {"conv1.weight": torch.zeros(1)},
    "3-d conv weight": {"conv1.weight": torch.zeros(16, 3, 3)},
    "scalar conv weight": {"conv1.weight": torch.tensor(1.0)},
    "batchnorm of another size": {"bn1.weight": torch.zeros(7), "bn1.bias": torch.zeros(7)},
}
WORDS = {"1-d conv weight": "conv1.weight", "3-d conv weight": "conv1.weight",
         "scalar conv weight": "conv1.weight", "batchnorm of another size": "bn1"}


def _wrong(path: Path, case: str) -> Path:
    model = build_model("resnet20", 10)
    state = {**model.state_dict(), **WRONG_TENSORS[case]}
    _checkpoint(path, state_dict=state)
    return path


@pytest.mark.parametrize("case", list(WRONG_TENSORS))
def test_wrong_shaped_tensors_in_a_checkpoint_are_one_line(tmp_path, case):
    path = _wrong(tmp_path / "model.pt", case)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(path))
    message = str(info.value)
    assert str(path) in message and WORDS[case] in message and "\n" not in message, message
    if case == "3-d conv weight":  # the CLI: one line, exit 2
        proc = subprocess.run([sys.executable, "-m", "ccpcsa", "export", str(path),
                               "--format", "torchscript"], capture_output=True, text=True,
                              env=_env(), timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert WORDS[case] in _one_error_line(proc.stderr)


@pytest.mark.parametrize("case", ["1-d conv weight", "batchnorm of another size"])
def test_wrong_shaped_tensors_in_weights_are_one_line(tmp_path, case, capsys):
    path = _wrong(tmp_path / "baseline.pt", case)
    code = prune_main(["prune", "--model", "resnet20", "--dataset", "digits", "--image-size",
                       "8", "--weights", str(path), "--attention-epochs", "1",
                       "--max-rounds", "1", "-m", "4", "--out", str(tmp_path / "run")])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2, line
    assert str(path) in line and WORDS[case] in line, line


# --------------------------------------------------------------------------- 6. --resume

def _saved_run(tmp_path: Path, **saved) -> Path:
    run = tmp_path / "runs" / "s3"
    run.mkdir(parents=True)
    config = search_run.SearchConfig().to_dict() | {"max_rounds": 3, **saved}
    (run / "search_config.json").write_text(json.dumps({"config": config}))
    return run


def test_resume_refuses_settings_that_differ_from_the_saved_ones(tmp_path, capsys):
    run = _saved_run(tmp_path)
    code = search_run.main(["--storage", str(tmp_path / "runs"), "--name", "s3", "--resume",
                            "--model", "resnet56", "--max-rounds", "5", "--seed", "0"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2, line
    assert "model resnet56 (saved: resnet20)" in line and "max-rounds 5 (saved: 3)" in line
    assert "seed" not in line.split("differ:")[1].split("; drop")[0], line  # same as saved
    assert str(run / "search_config.json") in line
    assert not (run / "stage0").exists()  # refused before anything ran


def test_resume_refuses_a_differing_setting_from_a_yaml_file(tmp_path, capsys):
    _saved_run(tmp_path)
    config = tmp_path / "search.yaml"
    config.write_text("max-rounds: 4\n")
    code = search_run.main(["--config", str(config), "--storage", str(tmp_path / "runs"),
                            "--name", "s3", "--resume"])
    assert code == 2
    assert "max-rounds 4 (saved: 3)" in _one_error_line(capsys.readouterr().err)


def test_resume_takes_the_settings_it_may_change(tmp_path):
    _saved_run(tmp_path, latency_batch=8)
    cfg, args = search_run.config_from_argv(
        ["--storage", str(tmp_path / "runs"), "--name", "s3", "--resume", "--retry-failed",
         "--latency-batch", "0", "--max-rounds", "3"])
    resumed = search_run.check_run_folder(cfg, args.given)
    assert resumed.latency_batch == 0 and resumed.retry_failed and resumed.max_rounds == 3
    assert resumed.model == "resnet20"


# --------------------------------------------------------------------------- 10. smaller ones

def test_an_overlong_name_fails_dry_run(tmp_path, capsys):
    code = search_run.main(["--name", "n" * 300, "--storage", str(tmp_path), "--dry-run"])
    assert code == 2
    assert "at most 128" in _one_error_line(capsys.readouterr().err)


def test_an_unwritable_storage_is_refused_with_2_in_both_clis(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = search_run.main(["--storage", str(blocker / "runs"), "--name", "x"])
    assert code == 2 and "cannot write to" in _one_error_line(capsys.readouterr().err)
    code = prune_main(["prune", "--model", "resnet20", "-m", "4", "--out",
                       str(blocker / "prune")])
    assert code == 2 and "cannot write to" in _one_error_line(capsys.readouterr().err)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_tampered_cifar_batch_is_refused_before_ray(tmp_path, capsys):
    import numpy as np

    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"labels": [1], b"data": np.zeros((1, 3072), dtype=np.uint8)}
        if name == "data_batch_2":
            batch = {b"data": _RunsCode()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c"] * 10}))
    code = search_run.main(["--dataset", "cifar10", "--data-root", str(tmp_path / "cifar"),
                            "--storage", str(tmp_path / "runs"), "--name", "c"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "data_batch_2" in line, line
    assert not (tmp_path / "runs" / "c" / "search_config.json").exists()  # before Ray


def test_torch_load_errors_are_one_sentence_and_a_cut_short_file_is_called_so(tmp_path,
                                                                               capsys):
    path = _checkpoint(tmp_path / "model.pt")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(path))
    assert "If you are seeing" not in str(info.value) and "\n" not in str(info.value)
    code = prune_main(["prune", "--model", "resnet20", "--weights", str(path), "-m", "4",
                       "--out", str(tmp_path / "run")])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "cut short" in line and "state_dict()" not in line, line
    whole = tmp_path / "whole_model.pt"
    torch.save(build_model("resnet20", 10), whole)
    code = prune_main(["prune", "--model", "resnet20", "--weights", str(whole), "-m", "4",
                       "--out", str(tmp_path / "run2")])
    assert code == 2 and "save model.state_dict()" in _one_error_line(capsys.readouterr().err)


def test_a_prune_that_kept_no_pruned_round_says_so_last(tmp_path, capsys):
    code = prune_main(["prune", "--model", "resnet20", "--dataset", "digits", "--image-size",
                       "8", "--baseline-epochs", "1", "--attention-epochs", "1",
                       "--max-rounds", "1", "--epochs", "0", "--calibration-batches", "1",
                       "-m", "200", "--tolerance", "0", "--reference", "attention",
                       "--latency-batch", "0",
                       "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = next(line for line in captured.out.splitlines() if line.startswith("stopped:"))
    assert "round 0" in summary and "above the baseline" in summary, summary
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("warning: nothing was pruned") and "final.pt" in last, last


# --------------------------------------------------------------------------- 4. the cause

def test_a_failed_trials_cause_survives_a_full_disk(tmp_path):
    from ccpcsa.search import failure
    from ccpcsa.search.ondisk import scan_trials

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        trial = disk / "run_trial_0badc0de_3_x=1_2026-12-04_15-00-00"
        trial.mkdir()
        (trial / "params.json").write_text('{"x": 1}')
        failure.reserve(str(trial))
        with pytest.raises(OSError), open(disk / "filler", "wb") as f:  # the disk fills up
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        (trial / "error.txt").write_bytes(b"")  # what Tune manages to write now
        failure.record(str(trial), OSError(28, "No space left on device"))
        (found,) = scan_trials(str(disk))
        assert found.status == "failed" and "No space left on device" in found.error
        failure.reserve(str(trial))  # Tune starts the trial again: the old cause is gone
        (found,) = scan_trials(str(disk))
        assert "No space left" not in found.error
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
