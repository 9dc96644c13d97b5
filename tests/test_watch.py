"""Following a running search: report.py --follow prints the frontier each time the file the
search rewrites (ccpcsa/search/watch.py) changes."""

from __future__ import annotations

import pandas as pd

from ccpcsa.search import pareto, report


def _points(n: int) -> pd.DataFrame:
    return pd.DataFrame({"trial_id": [f"t{i}" for i in range(n)], "round": [1] * n,
                         "accuracy": [90.0 - i for i in range(n)],
                         "flops": [1000 - 100 * i for i in range(n)],
                         "params": [10] * n, "checkpoint": [""] * n})


def test_follow_prints_each_new_frontier(tmp_path, capsys):
    run = str(tmp_path)
    assert report.follow(run, 0.01, True, rounds=1) == 0
    assert "no frontier.parquet" in capsys.readouterr().out
    pareto.write_frontier(_points(2), run)
    report.follow(run, 0.01, True, rounds=2)  # printed once: the file did not change
    out = capsys.readouterr().out
    assert out.count(" on the frontier") == 1 and "2 points, 2 on the frontier" in out
    assert report.main([run, "--follow", "0"]) == report.EXIT_BAD_RUN_DIR
