"""How fast `to-parquet` exports ImageNet-sized JPEGs, per worker process.

Writes an ImageFolder of synthetic ImageNet-sized JPEGs (benchmarks/jpegs.py: ~106 KB on
average), then exports it with `python -m ccpcsa.data to-parquet` at each --workers count,
from the page cache (the folder is read once before timing) into a local folder; prints rows/s
and MB/s and writes them to docs/benchmarks.md. An export from a network disk or to object
storage is bounded by that I/O instead; this measures what the export itself costs per core.

    python benchmarks/to_parquet_rate.py --images 6000 --workers 1 2
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from jpegs import jpeg_pool, write_imagefolder  # noqa: E402
from sections import write_section  # noqa: E402

HEADING = "## to-parquet: export rate per worker"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6000, help="images to export")
    parser.add_argument("--classes", type=int, default=20, help="class folders")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="--workers values to time")
    parser.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ccpcsa-to-parquet-"))
    try:
        write_imagefolder(work / "folder", {"train": args.images}, args.classes,
                          jpeg_pool(256))
        megabytes = sum(p.stat().st_size for p in (work / "folder").rglob("*.jpg")) / 1e6
        rows = []
        for workers in args.workers:
            dst = work / f"out-{workers}"
            load = os.getloadavg()[0]
            started = time.monotonic()
            subprocess.run([sys.executable, "-m", "ccpcsa.data", "to-parquet",
                            str(work / "folder" / "train"), str(dst), "--workers",
                            str(workers)], check=True, cwd=REPO, capture_output=True)
            seconds = time.monotonic() - started
            rows.append((workers, seconds, args.images / seconds, megabytes / seconds, load))
            print(f"workers {workers}: {seconds:.1f} s, {args.images / seconds:,.0f} rows/s, "
                  f"{megabytes / seconds:,.0f} MB/s (load before: {load:.1f})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = "\n".join(f"| {w} | {s:.1f} | {r:,.0f} | {r / w:,.0f} | {m:,.0f} | {lo:.1f} |"
                      for w, s, r, m, lo in rows)
    write_section(args.doc, HEADING, f"""{HEADING}

*Command:* `python benchmarks/to_parquet_rate.py --images {args.images} --workers
{' '.join(map(str, args.workers))}` on {platform.processor() or platform.machine()},
{os.cpu_count()} CPUs; {args.images:,} synthetic ImageNet-sized JPEGs ({megabytes:,.0f} MB,
benchmarks/jpegs.py) from the page cache to a local folder; the time includes starting the
command and listing the folder.

| --workers | seconds | rows/s | rows/s per worker | MB/s | load average before |
|---|---|---|---|---|---|
{table}

The export reads the encoded bytes and writes them as they are (no decode), so a worker moves
what the disks and the network give it: ImageNet's 1.28 M training images at the per-worker
rate above take 1.28 M ÷ (rate × workers) seconds on one machine, and `--part I/N` splits
them across N machines (each writes every N-th shard of the same plan).
""")


if __name__ == "__main__":
    main()
