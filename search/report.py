"""Re-read a finished search's frontier.parquet, print its table and re-draw frontier.png.

python search/report.py RUN_DIR [--all] [--x flops|latency] [--plot PATH]
python -m search.report RUN_DIR [--all] [--x flops|latency] [--plot PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from search import pareto
except ImportError:  # run as `python search/report.py` without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from search import pareto

EXIT_BAD_RUN_DIR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="report",
        description=(
            "Print the accuracy-vs-FLOPs Pareto frontier of a finished ccpcsa search and re-draw "
            "its plot, from RUN_DIR/frontier.parquet."
        ),
    )
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="run directory holding frontier.parquet: a local path or a URI (s3://, gs://, "
        "file://)",
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="list every candidate point (each reported round of each trial), not only the "
        "Pareto-optimal ones",
    )
    parser.add_argument(
        "--x",
        choices=("flops", "latency"),
        default="flops",
        help="flops (default): accuracy vs FLOPs of every point; latency: the frontier points "
        "whose inference latency the search measured, accuracy vs FLOPs beside accuracy vs "
        "measured batch-1 latency (written to RUN_DIR/frontier_latency.png)",
    )
    parser.add_argument(
        "--plot",
        metavar="PATH",
        default=None,
        help="where to write the PNG (local path or URI); default RUN_DIR/frontier.png, or "
        "RUN_DIR/frontier_latency.png with --x latency",
    )
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        df, baseline = pareto.read_frontier(args.run_dir)
    except FileNotFoundError as exc:
        print(f"report: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_RUN_DIR
    except Exception as exc:  # corrupt parquet, bad URI, permissions...
        print(
            f"report: error: cannot read {pareto.FRONTIER_FILE} in run dir {args.run_dir}: "
            f"{_one_line(exc)}",
            file=sys.stderr,
        )
        return EXIT_BAD_RUN_DIR
    if args.x == "latency" and not pareto.has_latency(df):
        print(f"report: error: no latency measured in {args.run_dir} (search with "
              f"--latency-batch > 0)", file=sys.stderr)
        return EXIT_BAD_RUN_DIR
    print(pareto.format_table(df, baseline, only_pareto=not args.all))
    default_name = "frontier_latency.png" if args.x == "latency" else "frontier.png"
    plot_path = args.plot or pareto.join_path(args.run_dir, default_name)
    title = f"Pareto frontier: {args.run_dir}" + pareto.criteria_text(df)
    draw = pareto.plot_latency if args.x == "latency" else pareto.plot_frontier
    try:
        draw(df, plot_path, baseline=baseline, title=title)
    except (OSError, ValueError) as exc:
        print(f"report: error: cannot write plot {plot_path}: {_one_line(exc)}", file=sys.stderr)
        return 1
    print(f"\nplot: {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
