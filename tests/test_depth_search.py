"""The search at depth, end to end on real Ray and Optuna (CPU, digits at 8 px): --target-flops
0.5 with two trials puts points at <= 0.55 of the baseline's FLOPs on the frontier; the final
fine-tune (--final-epochs, distilled) records accuracy before and after, its checkpoints are
the exported ones, and a search resumed after losing a point's final fine-tune (the state a
kill during it leaves: the other point's record and checkpoint on disk) runs only that one
again."""

from __future__ import annotations

import json
import os

import pandas as pd
import pyarrow.parquet as pq
from test_search import TINY, _env, _ray_processes, _search

from ccpcsa.checkpoint import read_payload


def test_target_flops_search_reaches_the_target_and_final_finetune_resumes(tmp_path):
    storage = tmp_path / "runs"
    args = [*TINY, "--storage", str(storage), "--name", "deep", "--num-samples", "2",
            "--max-concurrent-trials", "2", "--target-flops", "0.5", "--max-rounds", "3",
            "--latency-batch", "0", "--final-epochs", "1", "--final-top", "2", "--distill"]
    run_dir = storage / "deep"
    with _ray_processes("depth") as (marker, ray_tmp):
        first = _search(args, _env(marker, ray_tmp), tmp_path / "first.log")
    assert first.returncode == 0, first.stdout[-3000:]
    assert "target: 0.5 of the baseline's FLOPs" in first.stdout
    frame = pd.read_parquet(run_dir / "frontier.parquet")
    baseline = json.loads(pq.read_schema(run_dir / "frontier.parquet").metadata[b"baseline"])
    trials = frame[frame["trial_id"] != "stage0"]
    assert (trials["flops"] <= 0.55 * baseline["flops"]).sum() >= 2  # both trials got there
    front = frame[frame["pareto"]]
    assert (front["flops"] <= 0.55 * baseline["flops"]).any()
    tuned = frame[frame["final_epochs"] > 0]
    assert len(tuned) == 2 and tuned["accuracy_before_final"].notna().all()
    assert set(tuned["importance"]) == {"l1"}
    for rec in tuned[tuned["pareto"]].to_dict("records"):
        payload = read_payload(rec["frontier_checkpoint"])
        assert payload["extra"]["final_epochs"] == 1 and payload["extra"]["final_distill"]
        assert payload["metrics"]["accuracy"] == rec["accuracy"]

    final_dir = run_dir / "final"
    records = sorted(final_dir.glob("*.json"))
    assert len(records) == 2
    kept, lost = records
    kept_ckpt = kept.with_suffix(".pt")
    kept_mtime = kept_ckpt.stat().st_mtime_ns
    lost.unlink()  # its fine-tune was in flight when the search was killed
    lost.with_suffix(".pt").unlink()
    with _ray_processes("depth-resume") as (marker, ray_tmp):
        second = _search(["--storage", str(storage), "--name", "deep", "--resume"],
                         _env(marker, ray_tmp), tmp_path / "second.log")
    assert second.returncode == 0, second.stdout[-3000:]
    assert "2 frontier point(s), 1 epoch(s) each, distilled from the unpruned model; " \
           "1 already done" in second.stdout
    assert kept_ckpt.stat().st_mtime_ns == kept_mtime
    assert lost.exists() and lost.with_suffix(".pt").exists()
    again = pd.read_parquet(run_dir / "frontier.parquet")
    assert (again["final_epochs"] > 0).sum() == 2
    assert os.path.exists(run_dir / "frontier.png")
