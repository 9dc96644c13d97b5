"""One command: the `ccpcsa` console script that `pip install` puts on the PATH runs every
tool (prune, export, search, report, to-parquet, imagenet-folders) with its own flags."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ccpcsa.__main__ import main

CCPCSA = Path(sys.executable).parent / "ccpcsa"
COMMANDS = ("prune", "export", "search", "report", "to-parquet", "imagenet-folders")


def test_the_installed_command_lists_every_tool():
    done = subprocess.run([str(CCPCSA), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in COMMANDS:
        assert command in done.stdout


@pytest.mark.parametrize(("command", "flag"), [
    ("prune", "--target-flops"), ("search", "--num-samples"), ("report", "--follow"),
    ("to-parquet", "--part"), ("imagenet-folders", "--val-labels"), ("export", "--format")])
def test_each_tool_explains_its_own_flags(command, flag, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert flag in capsys.readouterr().out


def test_search_runs_through_the_command(capsys):
    assert main(["search", "--dry-run", "--num-samples", "2", "--max-rounds", "3"]) == 0
    out = capsys.readouterr().out
    assert '"num_samples": 2' in out and '"max_rounds": 3' in out
    assert main(["search", "--dry-run", "--num-samples", "0"]) == 2
    err = capsys.readouterr().err
    assert "num" in err and len(err.strip().splitlines()) == 1


def test_the_wheel_installs_one_package_named_ccpcsa(tmp_path):
    """Nothing generic named `search` is installed: the search lives in ccpcsa.search, and the
    repository's search/ holds only the entry scripts `ray job submit` runs."""
    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (source / name).write_bytes((repo / name).read_bytes())
    for name in ("ccpcsa", "search"):
        shutil.copytree(repo / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path / "wheel")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
        assert "ccpcsa/search/run.py" in archive.namelist()
    assert tops == {"ccpcsa", wheel.name.split("-py3")[0] + ".dist-info"}
