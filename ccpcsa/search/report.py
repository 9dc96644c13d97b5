"""Re-read a finished search's frontier.parquet, print its table and re-draw frontier.png.

python search/report.py RUN_DIR [--all] [--x flops|latency] [--plot PATH]
python -m ccpcsa.search.report RUN_DIR [--all] [--x flops|latency] [--plot PATH]
python search/report.py RUN_DIR --follow 60   # a running search: the table each time it changes

A running search rewrites frontier.parquet as its rounds report (watch.py), so --follow
prints the frontier so far and again whenever the file changes, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import time

from ccpcsa.search import pareto

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
    parser.add_argument(
        "--follow",
        metavar="SECONDS",
        type=float,
        default=None,
        help="follow a running search: print the table now and again whenever "
        "frontier.parquet changes, looking every SECONDS, until Ctrl-C (no plot is drawn)",
    )
    return parser


def follow(run_dir: str, every_s: float, only_pareto: bool, rounds: int | None = None) -> int:
    """Print the frontier each time frontier.parquet changes (`rounds` looks, else forever)."""
    fs, root = pareto._resolve(run_dir)
    path = pareto.join_path(root, pareto.FRONTIER_FILE)
    seen = None
    looked = 0
    try:
        while rounds is None or looked < rounds:
            looked += 1
            info = fs.get_file_info(path)
            stamp = (info.mtime_ns, info.size) if info.is_file else None
            if stamp is not None and stamp != seen:
                seen = stamp
                try:
                    df, baseline = pareto.read_frontier(run_dir)
                except Exception as exc:  # replaced between the look and the read: next time
                    print(f"report: {_one_line(exc)}", file=sys.stderr)
                else:
                    print(f"--- {time.strftime('%H:%M:%S')}: {len(df)} points, "
                          f"{int(df['pareto'].sum())} on the frontier", flush=True)
                    print(pareto.format_table(df, baseline, only_pareto=only_pareto),
                          flush=True)
            elif stamp is None and looked == 1:
                print(f"report: no {pareto.FRONTIER_FILE} in {run_dir} yet; waiting",
                      flush=True)
            if rounds is None or looked < rounds:
                time.sleep(every_s)
    except KeyboardInterrupt:
        pass
    return 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.follow is not None:
        if not args.follow > 0:
            print(f"report: error: --follow must be > 0 seconds, got {args.follow:g}",
                  file=sys.stderr)
            return EXIT_BAD_RUN_DIR
        return follow(args.run_dir, args.follow, only_pareto=not args.all)
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
