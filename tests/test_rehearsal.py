"""cluster/rehearse.py end to end: a multi-node Ray cluster on this machine with the real
autoscaler (fake multi-node provider), the search submitted with `ray job submit`, worker nodes
killed mid fine-tune, then the driver and the head; resumed on a fresh head. Its storage is an
S3 bucket on a moto server it starts (a local folder where moto is not installed). Its last
line is the verdict; every process it started must be gone afterwards."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VERDICT = re.compile(r"trials finished (\d+)/(\d+), nodes killed (\d+), head restarts (\d+), "
                     r"frontier points (\d+), rounds lost (\d+)")
TIMEOUT_S = 1500


def test_rehearsal_survives_a_node_and_the_head():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.pop("CCPCSA_FAIL_TRIALS", None)
    done = subprocess.run([sys.executable, "cluster/rehearse.py"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    found = VERDICT.fullmatch(lines[-1])
    assert found, lines[-1]
    finished, trials, killed, restarts, points, lost = map(int, found.groups())
    assert finished == trials >= 3
    assert killed >= 1 and restarts >= 1 and points >= 1 and lost == 0
    assert "the search went on after the node loss" in done.stdout
    assert "took over the stale lock" in done.stdout
    s3 = all(importlib.util.find_spec(m) for m in ("moto", "flask", "flask_cors", "boto3"))
    used = "s3://rehearsal/runs on a moto S3 server at http://127.0.0.1:" if s3 else "the local "
    assert f"storage used: {used}" in lines[-2], lines[-2]
