"""Benchmark: JPEG decode + augmentation throughput on the training worker's thread vs in Ray Data.

Data: synthetic photo-like JPEGs (benchmarks/jpegs.py: ImageNet-like resolution and file size)
in a class-sorted ImageFolder, exported with `to-parquet`. Measured, with ImageNet train
transforms (RandomResizedCrop + flip) at --size:

- one core, on the calling thread: the old path (decode_image_batch: PIL -> ToTensor +
  Normalize, float32) vs the new one (decode_uint8_batch: PIL -> uint8 pixels; normalisation
  moves to the device);
- the old worker loop: Ray Data streams the Parquet bytes, the consumer decodes them on its own
  thread (decode_image_batch), as distributed.py did before (second epoch);
- the new path: ParquetBatches (distributed.ingest) decodes in map_batches tasks on --cpus CPUs
  and the consumer receives uint8 batches; per-core = img/s / --cpus. The first epoch includes
  starting Ray's worker processes; the second is the steady state.

Usage: python benchmarks/datapath.py [--images 1024] [--size 224] [--cpus 2]
       [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from jpegs import jpeg_pool, write_parquet_dataset
from sections import write_section

from ccpcsa.data import (
    decode_image_batch,
    decode_uint8_batch,
    parquet_shards,
    shard_index,
)

SECTION = "## Data path: decoding on the worker thread vs in Ray Data map_batches"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1024,
                   help="training images in the Parquet data set (default: %(default)s)")
    p.add_argument("--pool", type=int, default=128,
                   help="distinct JPEGs, cycled through (default: %(default)s)")
    p.add_argument("--size", type=int, default=224, help="crop size (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="batch (default: %(default)s)")
    p.add_argument("--cpus", type=int, default=2,
                   help="CPUs Ray Data may use for decode tasks (default: %(default)s)")
    p.add_argument("--out", default="docs/benchmarks.md",
                   help="markdown file whose section this replaces (default: %(default)s)")
    return p


def one_thread(pool: list[bytes], size: int, repeats: int = 2) -> dict[str, float]:
    """img/s of each decode function on this thread, one torch thread."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rates = {}
    try:
        for name, fn in (("float32 (old)", decode_image_batch),
                         ("uint8 (new)", decode_uint8_batch)):
            fn(pool[:8], size, True)  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                fn(pool, size, True)
            rates[name] = repeats * len(pool) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(old_threads)
    return rates


def old_worker_loop(root: str, size: int, batch: int) -> list[float]:
    """img/s of two epochs: Ray Data streams the raw bytes, this thread decodes them (the
    worker loop before issue 8)."""
    import ray.data

    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ds = ray.data.read_parquet(parquet_shards(root, "train")).select_columns(["image", "label"])
    rates = []
    for _ in range(2):
        start, seen = time.perf_counter(), 0
        for b in ds.iter_batches(batch_size=batch, batch_format="numpy"):
            decode_image_batch(list(b["image"]), size, True)
            seen += len(b["label"])
        rates.append(seen / (time.perf_counter() - start))
    torch.set_num_threads(old_threads)
    return rates


def new_path(root: str, size: int, batch: int) -> list[float]:
    """img/s of two epochs of ParquetBatches (decode in map_batches tasks, uint8 out)."""
    from ccpcsa.distributed.ingest import IngestConfig, ParquetBatches

    source = ParquetBatches(shard_index(root, "train"), None, IngestConfig(size, batch),
                            torch.device("cpu"))
    rates = []
    for epoch in range(2):
        start, seen = time.perf_counter(), 0
        for _images, labels in source.epoch(epoch, 0, 1):
            seen += len(labels)
        rates.append(seen / (time.perf_counter() - start))
    return rates


def run(args: argparse.Namespace) -> dict:
    from ccpcsa.distributed import prefer_loopback

    prefer_loopback()
    import ray

    pool = jpeg_pool(args.pool)
    results: dict = {"jpeg_kb": sum(map(len, pool)) / len(pool) / 1024,
                     "load": [os.getloadavg()[0]]}
    results["one_thread"] = one_thread(pool, args.size)
    print(f"one thread: {results['one_thread']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_parquet_dataset(Path(tmp), {"train": args.images}, 10, pool)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            results["old_loop"] = old_worker_loop(root, args.size, args.batch_size)
            print(f"old worker loop: {results['old_loop']} img/s", flush=True)
            results["map_batches"] = new_path(root, args.size, args.batch_size)
            print(f"map_batches: {results['map_batches']} img/s", flush=True)
        finally:
            ray.shutdown()
    results["load"].append(os.getloadavg()[0])
    return results


def render(results: dict, args: argparse.Namespace, seconds: float) -> str:
    command = "python benchmarks/datapath.py " + shlex.join(sys.argv[1:])
    cpu = platform.processor() or platform.machine()
    old1, new1 = results["one_thread"]["float32 (old)"], results["one_thread"]["uint8 (new)"]
    cold, warm = results["map_batches"]
    pixel_bytes = 3 * args.size * args.size
    return "\n".join([
        SECTION, "",
        f"Command: `{command}` ({seconds:.0f} s)  ",
        f"Machine: {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}; "
        f"{args.images} synthetic photo-like JPEGs (mean {results['jpeg_kb']:.0f} KB, "
        f"~460 x 330 px), ImageNet train transforms (RandomResizedCrop {args.size} + flip), "
        f"batches of {args.batch_size}.", "",
        "| path | where decoding runs | img/s | img/s per decoding core |",
        "|---|---|---|---|",
        f"| old: decode_image_batch (float32, ToTensor + Normalize on the CPU) | calling "
        f"thread | {old1:.1f} | {old1:.1f} |",
        f"| new: decode_uint8_batch (uint8, normalised later on the device) | calling thread "
        f"| {new1:.1f} | {new1:.1f} |",
        f"| old worker loop: Ray Data streams bytes, the worker decodes (float32), second "
        f"epoch | the worker's thread | {results['old_loop'][1]:.1f} | "
        f"{results['old_loop'][1]:.1f} |",
        f"| new: ParquetBatches, map_batches tasks, uint8 to the worker, first epoch | "
        f"{args.cpus} Ray Data tasks | {cold:.1f} | {cold / args.cpus:.1f} |",
        f"| new: ParquetBatches, second epoch (steady state) | {args.cpus} Ray Data tasks | "
        f"{warm:.1f} | {warm / args.cpus:.1f} |", "",
        f"Bytes per image sent to the worker: {pixel_bytes:,} as uint8 vs {4 * pixel_bytes:,} "
        f"as float32. The old worker decoded on its one training thread however many CPUs it "
        f"had reserved; the new path decodes on every CPU the workers leave free, so its "
        f"throughput grows with them. The map_batches rows include Ray Data's per-epoch start "
        f"and the consumer's own work; here the consumer, Ray's own processes and the "
        f"{args.cpus} decode tasks share the same {os.cpu_count()} cores (load average "
        f"{results['load'][0]:.1f} before, {results['load'][1]:.1f} after: other jobs ran "
        f"too), so their per-core figure understates a decode CPU on a node with free cores. "
        f"`benchmarks/gpu_datapath.py` measures the path on a GPU node.", ""])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    results = run(args)
    write_section(args.out, SECTION, render(results, args, time.perf_counter() - start))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
