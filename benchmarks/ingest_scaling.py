"""Benchmark: where the Parquet -> Ray Data input path loses throughput, on one node.

benchmarks/gpu_datapath.py measures the whole path against a plain GPU loop; this one takes the
input path apart, on the same synthetic ImageNet-size JPEG shards (benchmarks/jpegs.py), to
find what limits it. Measured, each as images per second of uint8 training batches (224²
RandomResizedCrop + flip, the Parquet path's own `decode_pieces`):

  decode    one process decoding on one core: the cost of an image, the bound per CPU
  pool      a multiprocessing pool of (CPUs - 1) processes running decode_pieces over the
            epoch's pieces (Parquet reads included), no Ray: the node's CPU bound
  tasks     the same pieces as plain Ray tasks (one CPU each), results fetched in order of
            completion: what Ray core adds
  ingest    ccpcsa.distributed.ingest.ParquetBatches epochs under variants of IngestConfig (the
            default: plan order preserved, local shuffle buffer, prefetch 2, batches moved to
            the device): what Ray Data's streaming execution and the consumer add

Writes OUT/ingest_scaling.jsonl (one JSON object per figure) and prints a markdown table
(`--docs docs/benchmarks.md` puts it there as its own section). Runs on a CPU-only machine too
(the batches then stay on the CPU).

    python benchmarks/ingest_scaling.py --images 2048 --out /tmp/ingest   # a laptop
    python benchmarks/ingest_scaling.py --out $OUT                       # the GPU machine
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from jpegs import jpeg_pool, write_parquet_dataset  # noqa: E402
from sections import write_section  # noqa: E402

SECTION = "## Input path scaling: decode, Ray tasks and Ray Data on one node"
VARIANTS = {  # name -> IngestConfig overrides
    "default: rows mixed in the decode tasks (4 pieces), ordered, no op reservation": {},
    "local shuffle buffer (512 rows) in the consumer instead": {"mix_pieces": 1,
                                                                "shuffle_buffer": 512},
    "Ray Data's op resource reservation on (Ray's default)": {"op_reservation": True},
    "unordered": {"preserve_order": False},
    "no shuffle at all": {"mix_pieces": 1},
    "unordered, prefetch 8": {"preserve_order": False, "prefetch_batches": 8},
}


def piece_batch(piece) -> dict[str, np.ndarray]:
    return {k: np.array([v]) for k, v in dataclasses.asdict(piece).items()}


def decode_piece(args: tuple) -> int:
    from ccpcsa.data import decode_pieces

    piece, size = args
    return len(decode_pieces(piece_batch(piece), size, True)["label"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="output folder")
    p.add_argument("--work", default="/tmp/ccpcsa-ingest-scaling", help="scratch folder")
    p.add_argument("--images", type=int, default=12288, help="training rows (default: 12288)")
    p.add_argument("--pool", type=int, default=256, help="distinct JPEGs (default: 256)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   metavar="NAME", help="IngestConfig variants to time (default: all)")
    p.add_argument("--docs", metavar="MARKDOWN", help="also write the section into this file")
    args = p.parse_args(argv)
    rows: list[dict] = []
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    def emit(step: str, **values) -> None:
        row = {"step": step, **values}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out:
            with open(out / "ingest_scaling.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    from ccpcsa.data import decode_pieces, shard_index, train_pieces
    from ccpcsa.data.imagefolder import decode_uint8_batch
    from ccpcsa.distributed import connect_ray, prefer_loopback
    from ccpcsa.distributed.ingest import IngestConfig, ParquetBatches

    prefer_loopback()
    cpus = os.cpu_count() or 1
    shm = shutil.disk_usage("/dev/shm").total if os.path.isdir("/dev/shm") else 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    emit("environment", cpus=cpus, dev_shm_gb=round(shm / 2**30, 1), device=str(device),
         python=platform.python_version(), torch=torch.__version__, images=args.images)

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    pool = jpeg_pool(args.pool, 0)
    index = shard_index(write_parquet_dataset(work, {"train": args.images}, 100, pool), "train")
    pieces = train_pieces(index, 0, 0, 0, 1, args.batch)

    torch.set_num_threads(1)
    sample = pool[:64]
    decode_uint8_batch(sample[:4], args.size, True)
    start = time.perf_counter()
    decode_uint8_batch(sample, args.size, True)
    emit("decode", what="one process, one core", img_s=round(len(sample) / (
        time.perf_counter() - start), 1))

    procs = max(1, cpus - 1)
    with multiprocessing.get_context("fork").Pool(procs) as workers:
        workers.map(decode_piece, [(pc, args.size) for pc in pieces[:procs]])  # imports
        start = time.perf_counter()
        done = sum(workers.imap_unordered(decode_piece, [(pc, args.size) for pc in pieces]))
        emit("pool", what=f"multiprocessing, {procs} processes", img_s=round(
            done / (time.perf_counter() - start), 1))

    ray = connect_ray()
    emit("ray", cpus=ray.cluster_resources().get("CPU"),
         object_store_gb=round(ray.cluster_resources().get("object_store_memory", 0) / 2**30, 1))
    remote = ray.remote(num_cpus=1)(decode_pieces)
    for attempt in ("warm-up", "timed"):
        start = time.perf_counter()
        pending = [remote.remote(piece_batch(pc), args.size, True) for pc in pieces]
        done = 0
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            done += len(ray.get(ready[0])["label"])
        if attempt == "timed":
            emit("tasks", what=f"Ray tasks, {procs + 1} CPUs", img_s=round(
                done / (time.perf_counter() - start), 1))

    for i, name in enumerate(args.variants):
        cfg = IngestConfig(args.size, args.batch, **VARIANTS[name])
        source = ParquetBatches(index, None, cfg, device)
        for epoch in range(2 if i == 0 else 1):  # the first epoch starts Ray Data's workers
            start, cpu, seen, steps = time.perf_counter(), time.process_time(), 0, 0
            for _batch, labels in source.epoch(epoch, 0, 1):
                seen, steps = seen + len(labels), steps + 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            if epoch == (1 if i == 0 else 0):
                emit("ingest", what=name, img_s=round(seen / (time.perf_counter() - start), 1),
                     consumer_cpu_ms_per_batch=round(
                         1000 * (time.process_time() - cpu) / max(steps, 1), 1))
    text = render(rows, "python benchmarks/ingest_scaling.py " + " ".join(sys.argv[1:]))
    print(text)
    if out:
        (out / "ingest_scaling.md").write_text(text)
    if args.docs:
        write_section(args.docs, SECTION, text)
    return 0


def render(rows: list[dict], command: str) -> str:
    env = next(r for r in rows if r["step"] == "environment")
    ray_row = next((r for r in rows if r["step"] == "ray"), {})
    lines = [SECTION, "", f"Command: `{command}`  ",
             f"Machine: {env['cpus']} CPU cores, /dev/shm {env['dev_shm_gb']} GiB, batches to "
             f"{env['device']}, Python {env['python']}, torch {env['torch']}; Ray object "
             f"store {ray_row.get('object_store_gb')} GiB. {env['images']} training rows of "
             "ImageNet-size JPEGs (benchmarks/jpegs.py), 224² RandomResizedCrop + flip.", "",
             "consumer CPU ms per batch: CPU time of the consuming process (all its threads: "
             "Ray Data's executor, prefetching, slicing or shuffling, pinning) per batch, the "
             "work that competes with a training loop in the same process.", "",
             "| step | what | img/s | consumer CPU ms per batch |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r.get('what', '')} | {r['img_s']} | "
              f"{r.get('consumer_cpu_ms_per_batch', '')} |" for r in rows if "img_s" in r]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
