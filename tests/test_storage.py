"""Results storage given as a URI (file://, the local stand-in for s3:// and gs://) works for
the prune CLI, the search and the report, through pyarrow.fs and Ray's storage."""

import subprocess
import sys
from pathlib import Path

from ccpcsa import load_checkpoint, storage
from search.pareto import read_frontier

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "resnet20", "--dataset", "digits", "--image-size", "8",
        "--baseline-epochs", "1", "--attention-epochs", "1", "--max-rounds", "1"]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_prune_search_and_report_on_a_file_uri(tmp_path):
    out = f"file://{tmp_path}/prune"
    _run(["-m", "ccpcsa", "prune", *TINY, "--out", out])
    assert (tmp_path / "prune" / "rounds.parquet").is_file()
    final = load_checkpoint(storage.join(out, "final.pt"))
    assert final.training is False

    runs = f"file://{tmp_path}/runs"
    _run(["search/run.py", *TINY, "--num-samples", "1", "--storage", runs, "--name", "uri"])
    frame, baseline = read_frontier(storage.join(runs, "uri"))
    assert baseline is not None and len(frame) >= 2  # the unpruned model and round 1
    for path in frame.loc[frame["pareto"], "checkpoint"]:
        assert load_checkpoint(path) is not None
    assert (tmp_path / "runs" / "uri" / "frontier.png").is_file()
    report = _run(["search/report.py", storage.join(runs, "uri")])
    assert "plot:" in report.stdout
