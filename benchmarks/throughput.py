"""Benchmark: training throughput of one process vs N Ray Train workers, and Ray Train's overhead.

For each model / image size: one epoch over the same ImageFolder of real PNG files (written once,
ImageNet-style layout) in one process (`train.fit`) and with RayRunner on 1..N workers, same
global batch. Reported: images/s inside the epoch (steady state), wall seconds end to end
(worker start-up, data set-up, evaluation and the weights' round trip included), and scaling
efficiency = img/s(N) / (N * img/s(1 worker)). On a GPU machine add --gpu to compare fp32 vs bf16
autocast and channels_last on/off in one process.

Usage: python benchmarks/throughput.py [--models resnet50:224 resnet20:32] [--images 64]
       [--workers 1 2] [--batch-size 16] [--out docs/benchmarks.md]
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

import numpy as np
import torch
from PIL import Image
from sections import write_section

from ccpcsa.data import DataConfig, build_datasets
from ccpcsa.models import build_model
from ccpcsa.train import TrainConfig, fit, pick_device

SECTION = "## Training throughput: one process vs Ray Train workers"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50:224", "resnet20:32"],
                   metavar="MODEL:SIZE", help="models and input sizes (default: %(default)s)")
    p.add_argument("--images", type=int, default=64,
                   help="training images per class folder x 2 classes (default: %(default)s)")
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2],
                   help="Ray Train worker counts to measure (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (default: 16)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the one-process baseline, = CPUs per worker")
    p.add_argument("--gpu", action="store_true",
                   help="also time fp32 / bf16 / channels_last in one process on CUDA")
    p.add_argument("--out", default="docs/benchmarks.md",
                   help="markdown file whose section this replaces (default: %(default)s)")
    return p


def write_folder(root: Path, images: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", max(images // 4, 2))):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")


def one_process(model_name: str, data: DataConfig, cfg: TrainConfig) -> dict:
    train_set, _ = build_datasets(data)
    model = build_model(model_name, 2, with_bam=True)
    start = time.perf_counter()
    fit(model, train_set, cfg, 1, 0.01, label="bench")
    seconds = time.perf_counter() - start
    samples = len(train_set) // cfg.batch_size * cfg.batch_size
    return {"img_s": samples / seconds, "wall": seconds}


def ray_workers(model_name: str, data: DataConfig, cfg: TrainConfig, workers: int,
                threads: int, storage: str) -> dict:
    from ccpcsa.distributed import RayRunner

    runner = RayRunner(data, cfg, workers, storage, cpus_per_worker=threads)
    model = build_model(model_name, 2, with_bam=True)
    start = time.perf_counter()
    runner.fit(model, 1, 0.01, label=f"bench-{workers}")
    wall = time.perf_counter() - start
    runner.close()
    metrics = runner.last_metrics
    return {"img_s": metrics["last_samples"] / metrics["last_seconds"], "wall": wall}


def gpu_variants(model_name: str, data: DataConfig, batch_size: int) -> list[tuple[str, dict]]:
    rows = []
    for label, amp, channels_last in (("fp32", False, False), ("bf16", True, False),
                                      ("bf16 + channels_last", True, True)):
        cfg = TrainConfig(batch_size=batch_size, amp=amp, channels_last=channels_last,
                          loader_workers=4)
        rows.append((label, one_process(model_name, data, cfg)))
    return rows


def run(args: argparse.Namespace) -> list[str]:
    from ccpcsa.distributed import prefer_loopback

    prefer_loopback()  # a local Ray instance on 127.0.0.1
    import ray

    torch.set_num_threads(args.threads)
    ray.init(num_cpus=max(args.workers) * args.threads, include_dashboard=False,
             log_to_driver=False)
    lines = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for item in args.models:
                model_name, size = item.split(":")
                folder = Path(tmp) / f"images{size}"
                if not folder.exists():
                    write_folder(folder, args.images, int(size))
                data = DataConfig("imagefolder", str(folder), int(size), augment=False)
                cfg = TrainConfig(batch_size=args.batch_size, device="cpu")
                base = one_process(model_name, data, cfg)
                print(f"{model_name}@{size}: one process {base['img_s']:.1f} img/s", flush=True)
                lines.append(_row(model_name, size, "one process", 0, base, None))
                single = None
                for workers in args.workers:
                    got = ray_workers(model_name, data, cfg, workers, args.threads,
                                      str(Path(tmp) / "ray"))
                    single = single or (got if workers == 1 else None)
                    eff = got["img_s"] / (workers * single["img_s"]) if single else None
                    print(f"{model_name}@{size}: {workers} workers {got['img_s']:.1f} img/s, "
                          f"wall {got['wall']:.1f}s", flush=True)
                    lines.append(_row(model_name, size, "Ray Train", workers, got, eff))
                if args.gpu and pick_device().type == "cuda":
                    for label, got in gpu_variants(model_name, data, args.batch_size):
                        lines.append(_row(model_name, size, f"GPU {label}", 0, got, None))
    finally:
        ray.shutdown()
    return lines


def _row(model: str, size: str, how: str, workers: int, got: dict, eff: float | None) -> str:
    eff_text = f"{eff:.2f}" if eff is not None else "–"
    return (f"| {model} | {size}² | {how} | {workers or 1} | {got['img_s']:.1f} | "
            f"{got['wall']:.1f} | {eff_text} |")


def render(lines: list[str], args: argparse.Namespace) -> str:
    command = "python benchmarks/throughput.py " + shlex.join(sys.argv[1:])
    cpu = platform.processor() or platform.machine()
    return "\n".join([
        SECTION, "",
        f"Command: `{command}`  ",
        f"Machine: {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; "
        f"{args.threads} torch thread(s) per process / CPU(s) per worker; one epoch over "
        f"{2 * args.images} real PNG files (ImageFolder), global batch {args.batch_size}, "
        "BAM inserted, fp32.", "",
        "| model | input | how | workers | img/s in the epoch | wall s (end to end) | "
        "scaling efficiency |",
        "|---|---|---|---|---|---|---|",
        *lines, "",
        "img/s in the epoch is samples / epoch seconds (from the workers' report; the epoch "
        "includes the first, slower steps); wall includes starting the workers, building the "
        "data, evaluating and returning the weights: a runner's first call pays the group's "
        "start, later calls reuse it (benchmarks/round_cost.py measures the per-round cost). "
        "Scaling efficiency is against one Ray Train worker.", "",
        *([] if torch.cuda.is_available() else [
            "No GPU on this machine: the GPU rows (fp32 vs bf16 autocast, channels_last on/off, "
            "`--gpu`) and GPU scaling are not measured here.", ""])])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    lines = run(args)
    write_section(args.out, SECTION, render(lines, args))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
