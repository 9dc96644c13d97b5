"""GPU benchmark: is the GPU fed? ResNet-50 at 224², bf16 autocast + channels_last, trained
through the full path (to-parquet shards -> Ray Data decode tasks -> uint8 -> one Ray Train GPU
worker -> normalised on the GPU) against a plain PyTorch loop on GPU-resident batches. The
issue-8 target: the full path reaches >= 80 % of the plain loop's img/s.

Measured, in order (each step is skipped, with the reason, when the time budget runs short):
  data      synthetic photo-like JPEGs (benchmarks/jpegs.py, ImageNet-like size) in a
            class-sorted ImageFolder, exported by to-parquet (shuffled, row groups of 64)
  plain     a minimal training loop (SGD, autocast bf16, channels_last, cudnn.benchmark) on
            one GPU-resident batch, and ccpcsa.train.run_epoch on the same batches
  pipeline  the input path alone: ParquetBatches (distributed.ingest) streaming uint8 batches to the
            GPU and normalising them there, no model: the most the data path can deliver
  inproc    the same stream feeding ccpcsa.train.run_epoch in the driver process, without Ray
            Train: whether a gap comes from one process holding both the input stream and
            the training loop, or from the Ray Train worker around them; once per
            --inproc-host-memory value (Ray Data pinning each batch, or pageable memory)
  full      RayRunner with 1 GPU worker (--cpus-per-worker for the trainer, the other CPUs
            decode): img/s of the last training epoch (the first pays cuDNN autotuning and
            Ray's worker start-up), its seconds waiting for input, wall time of the whole fit
            (start, epochs, evaluation); once per --cpus-per-worker value
            (`input_wait_s`: seconds the loop waited for the next batch, mostly each epoch's
            stream start-up; `fed_img_s`: img/s over the rest, the step's speed while fed)
  verdict   full / plain, against the 0.8 target
  scoring   the channel-scoring pass (compute_scores, ccpcsa criterion: forward passes plus
            the correlation statistics of every channel group) on --score-batches calibration
            batches, on the GPU and on the CPU (all its threads, fewer images): img/s of each
  rounds    --rounds pruning rounds (prune_loop: score, prune on the driver, BatchNorm
            re-estimation, --round-epochs fine-tune epochs, evaluation) on the full step's
            1-GPU worker group, already started: each round's wall time, the workers' time in
            it, and the rest (driver-side surgery and bookkeeping, Ray dispatch, the model's
            trips through the object store): the per-round fixed cost

Writes OUT/results.jsonl (one JSON object per measurement) and OUT/gpu_datapath.md (the
docs/benchmarks.md section); `--render OUT/results.jsonl --docs docs/benchmarks.md` puts that
section into the docs afterwards. Without CUDA it exits 2 unless --smoke-cpu, which runs every
step on the CPU at toy sizes (a code-path check; its numbers mean nothing).

On the lent GPU machine (one H100, 16 cores, Python 3.12 with torch but without ray): copy
/work/shared/device-kit into the working tree first (its wheels/ hold Ray 2.60 and
torch_pruning), then run from the repository root, within ~330 s of device time
(a smaller --budget-s skips the last steps, scoring and rounds, when time runs short):
  python3 -m pip install -q --no-index --no-deps --target /tmp/deps device-kit/wheels/*.whl &&
  PYTHONPATH=$PWD:/tmp/deps RAY_USAGE_STATS_ENABLED=0 \
  python3 benchmarks/gpu_datapath.py --out $OUT --budget-s 280
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from jpegs import jpeg_pool, write_parquet_dataset
from sections import write_section

SECTION = "## GPU: the full Parquet -> Ray Data -> Ray Train path vs a plain loop"
TARGET = 0.8
T0 = time.perf_counter()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[dict] = []
        self.out = Path(args.out) if args.out else None
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "results.jsonl").write_text("")

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - T0)

    def emit(self, step: str, **values) -> dict:
        row = {"step": step, "t": round(time.perf_counter() - T0, 1), **values}
        self.rows.append(row)
        line = json.dumps(row, default=str)
        print(line, flush=True)
        if self.out:
            with open(self.out / "results.jsonl", "a") as f:
                f.write(line + "\n")
        return row

    def enough(self, step: str, needed: float) -> bool:
        if self.left() >= needed:
            return True
        self.emit(step, skipped=f"time: {self.left():.0f} s left, needs ~{needed:.0f} s")
        return False


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------ steps


def _pool_part(args: tuple[int, int]) -> list[bytes]:
    count, seed = args
    return jpeg_pool(count, seed)


def make_data(b: Bench) -> str:
    a = b.args
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)  # to-parquet refuses a folder holding shards
    start = time.perf_counter()
    procs = min(16, os.cpu_count() or 1)
    per = max(1, a.pool // procs)
    # fork: the children only run numpy and PIL (no CUDA, no Ray yet)
    with multiprocessing.get_context("fork").Pool(procs) as workers:
        pool = [j for part in workers.map(_pool_part, [(per, s) for s in range(procs)])
                for j in part]
    root = write_parquet_dataset(work, {"train": a.images, "val": a.val_images}, a.classes,
                                 pool)
    b.emit("data", images=a.images, val_images=a.val_images, distinct_jpegs=len(pool),
           mean_kb=round(sum(map(len, pool)) / len(pool) / 1024, 1),
           seconds=round(time.perf_counter() - start, 1))
    return root


def plain_loop(b: Bench, device: torch.device) -> float | None:
    from ccpcsa.models import build_model
    from ccpcsa.train import TrainConfig, make_optimizer, run_epoch, to_device

    a = b.args
    cfg = TrainConfig(batch_size=a.batch)
    model = to_device(build_model(a.model, a.classes, with_bam=True), device, cfg)
    opt, sched = make_optimizer(model, cfg, 0.01, 10**6)
    x = torch.randn(a.batch, 3, a.size, a.size, device=device)
    x = x.contiguous(memory_format=torch.channels_last if device.type == "cuda"
                     else torch.contiguous_format)
    y = torch.randint(0, a.classes, (a.batch,), device=device)
    _plain_steps(model, opt, x, y, a.warmup_steps)  # cuDNN autotuning
    sync()
    start = time.perf_counter()
    _plain_steps(model, opt, x, y, a.steps)
    sync()
    plain = a.steps * a.batch / (time.perf_counter() - start)
    b.emit("plain", what="minimal loop, GPU-resident batch", img_s=round(plain, 1),
           batch=a.batch, steps=a.steps)
    start = time.perf_counter()
    run_epoch(model, [(x, y)] * a.steps, opt, sched, device, cfg)
    sync()
    ours = a.steps * a.batch / (time.perf_counter() - start)
    b.emit("plain", what="ccpcsa.train.run_epoch, same batch", img_s=round(ours, 1),
           of_plain=round(ours / plain, 3))
    if device.type == "cuda":
        b.emit("plain", max_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 1))
    return plain


def _plain_steps(model, opt, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
    """The textbook loop: nothing but forward, loss, backward, step."""
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(n):
        with torch.autocast(x.device.type, dtype=torch.bfloat16,
                            enabled=x.device.type == "cuda"):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def pipeline_only(b: Bench, root: str, device: torch.device) -> None:
    from ccpcsa.data import shard_index
    from ccpcsa.distributed.ingest import IngestConfig, ParquetBatches

    a = b.args
    source = ParquetBatches(shard_index(root, "train"), None, IngestConfig(a.size, a.batch),
                            device)
    for epoch in range(a.pipeline_epochs):
        if not b.enough(f"pipeline epoch {epoch}", a.images / 500 + 5):
            return
        start, seen = time.perf_counter(), 0
        for images, labels in source.epoch(epoch, 0, 1):
            source.normalize(images)
            seen += len(labels)
        sync()
        seconds = time.perf_counter() - start
        b.emit("pipeline", what=f"uint8 batches to the {device.type}, epoch {epoch}, no model",
               img_s=round(seen / seconds, 1), images=seen, seconds=round(seconds, 1),
               ray_cpus=a.ray_cpus)


def fed_img_s(images: int, seconds: float, input_wait_s: float) -> float:
    """img/s over the time the loop was not waiting for input: the step's speed while fed."""
    return round(images / max(seconds - input_wait_s, 1e-9), 1)


def in_process(b: Bench, root: str, device: torch.device, pin_memory: bool) -> None:
    """The full path's training loop without Ray Train: the same ParquetBatches stream feeding
    ccpcsa.train.run_epoch in this (driver) process. Beside `pipeline` (no model) and `full`
    (a Ray Train worker) it tells whether a gap comes from sharing one process between the
    input stream and the training loop, or from the Ray Train worker around them."""
    from ccpcsa.data import shard_index
    from ccpcsa.distributed.ingest import IngestConfig, ParquetBatches
    from ccpcsa.models import build_model
    from ccpcsa.train import InputWait, TrainConfig, make_optimizer, run_epoch, to_device

    a = b.args
    cfg = TrainConfig(batch_size=a.batch)
    source = ParquetBatches(shard_index(root, "train"), None,
                            IngestConfig(a.size, a.batch,
                                         host_copy="ray_pin" if pin_memory else "pageable"),
                            device)
    model = to_device(build_model(a.model, a.classes, with_bam=True), device, cfg)
    opt, sched = make_optimizer(model, cfg, 0.01, 10**6)
    host = "pinned" if pin_memory else "pageable"
    for epoch in range(a.inproc_epochs):
        if not b.enough(f"inproc epoch {epoch}", a.images / 500 + 5):
            return
        start = time.perf_counter()
        batches = InputWait((source.normalize(x), y) for x, y in source.epoch(epoch, 0, 1))
        _loss, seen = run_epoch(model, batches, opt, sched, device, cfg)
        sync()
        seconds = time.perf_counter() - start
        b.emit("inproc", what=f"run_epoch on the Parquet stream in the driver, {host} host "
               f"memory, epoch {epoch}", img_s=round(seen / seconds, 1), images=seen,
               seconds=round(seconds, 1), input_wait_s=round(batches.seconds, 1),
               fed_img_s=fed_img_s(seen, seconds, batches.seconds))
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()


def full_path(b: Bench, root: str, device: torch.device, cpus_per_worker: float):
    from ccpcsa.data import DataConfig
    from ccpcsa.distributed import RayRunner
    from ccpcsa.models import build_model
    from ccpcsa.train import TrainConfig

    a = b.args
    gpu = device.type == "cuda"
    start = time.perf_counter()
    runner = RayRunner(DataConfig("parquet", root, a.size), TrainConfig(batch_size=a.batch),
                       1, str(Path(a.work) / "ray"), gpus_per_worker=1.0 if gpu else 0.0,
                       cpus_per_worker=cpus_per_worker)
    b.emit("full", what="RayRunner ready (cluster check, shard index)",
           seconds=round(time.perf_counter() - start, 1))
    model = build_model(a.model, a.classes, with_bam=True)
    start = time.perf_counter()
    runner.fit(model, a.epochs, 0.01, label="gpu-datapath")
    wall = time.perf_counter() - start
    m = runner.last_metrics
    img_s = m["last_samples"] / m["last_seconds"]
    b.emit("full", what=f"last of {a.epochs} epochs, 1 Ray Train worker, "
           f"{cpus_per_worker:g} CPU", img_s=round(img_s, 1),
           samples=m["last_samples"], epoch_s=round(m["last_seconds"], 1),
           input_wait_s=round(m["last_input_wait_s"], 1),
           fed_img_s=fed_img_s(m["last_samples"], m["last_seconds"], m["last_input_wait_s"]),
           fit_wall_s=round(wall, 1), evaluated=m.get("evaluated"))
    return img_s, runner, model


def scoring(b: Bench, root: str, device: torch.device) -> None:
    """compute_scores on the GPU vs the CPU, on the same decoded calibration batches."""
    from ccpcsa.data import shard_index
    from ccpcsa.distributed.ingest import IngestConfig, ParquetBatches
    from ccpcsa.importance import compute_scores
    from ccpcsa.loop import channel_groups
    from ccpcsa.models import build_model

    a = b.args
    cpu = torch.device("cpu")
    source = ParquetBatches(shard_index(root, "train"), None,
                            IngestConfig(a.size, a.batch, augment=False), cpu)
    batches = [(source.normalize(x), y) for x, y in
               source.calibration(a.score_batches * a.batch, a.batch)]
    model = build_model(a.model, a.classes, with_bam=True).eval()
    runs = [(device, batches)] if device.type == "cuda" else []
    runs.append((cpu, [(x[:a.score_cpu_images], y[:a.score_cpu_images])
                       for x, y in batches[:1]]))
    for where, data in runs:
        if not b.enough(f"scoring {where.type}", 30):
            return
        model.to(where)
        _graph, groups = channel_groups(model, a.model, (3, a.size, a.size))
        compute_scores("ccpcsa", model, groups, [data[0]])  # warm-up (cuDNN, allocator)
        sync()
        start = time.perf_counter()
        compute_scores("ccpcsa", model, groups, data)
        sync()
        seconds = time.perf_counter() - start
        images = sum(len(y) for _, y in data)
        b.emit("scoring", what=f"compute_scores (ccpcsa) on the {where.type}, {images} images, "
               f"{len(groups)} channel groups", img_s=round(images / seconds, 1),
               seconds=round(seconds, 2), threads=torch.get_num_threads())


def rounds(b: Bench, root: str, device: torch.device, runner, model) -> None:
    """Pruning rounds on an already started worker group: the fixed cost of each."""
    from ccpcsa.data import DataConfig
    from ccpcsa.distributed import RayRunner
    from ccpcsa.loop import LoopConfig, prune_loop
    from ccpcsa.models import build_model
    from ccpcsa.prune import PruneLimits
    from ccpcsa.train import TrainConfig

    a = b.args
    if runner is None:  # the full step did not run: start a group here (round 1 pays it)
        runner = RayRunner(DataConfig("parquet", root, a.size), TrainConfig(batch_size=a.batch),
                           1, str(Path(a.work) / "ray"),
                           gpus_per_worker=1.0 if device.type == "cuda" else 0.0,
                           cpus_per_worker=a.cpus_per_worker[0])
        model = build_model(a.model, a.classes, with_bam=True)
    cfg = LoopConfig(groups_per_round=a.round_m, tolerance=100.0, max_rounds=a.rounds,
                     finetune_epochs=a.round_epochs, calibration_batches=a.score_batches,
                     bn_batches=a.score_batches, limits=PruneLimits(max_ratio=0.8))
    marks: list[tuple[float, int]] = [(time.perf_counter(), len(runner.timings))]

    def on_round(record, _model) -> None:
        if record.round == 0:
            return
        now, commands = time.perf_counter(), runner.timings[marks[-1][1]:]
        wall = now - marks[-1][0]
        workers = sum(c.worker_s for c in commands)
        b.emit("rounds", what=f"round {record.round}: {', '.join(c.op for c in commands)}",
               wall_s=round(wall, 2), workers_s=round(workers, 2),
               fixed_s=round(wall - workers, 2),
               dispatch_s=round(sum(c.wall_s - c.worker_s for c in commands), 2),
               removed=record.removed, round_to=cfg.round_to or (8 if runner.uses_cuda else 1))
        marks.append((now, len(runner.timings)))

    prune_loop(model, a.model, (3, a.size, a.size), 0.0, runner, cfg, on_round,
               initial_accuracy=0.0)
    b.emit("rounds", what=f"worker groups started: {runner.group_starts}")


# ------------------------------------------------------------------------------ report


def render(rows: list[dict], command: str) -> str:
    env = next((r for r in rows if r["step"] == "environment"), {})
    lines = [SECTION, "",
             f"Command: `{command}`  ",
             f"Machine: {env.get('gpu') or 'no GPU'}, {env.get('cpus')} CPU cores, Python "
             f"{env.get('python')}, torch {env.get('torch')}, Ray {env.get('ray')}; "
             f"{env.get('model')} with BAM at {env.get('size')}², batch {env.get('batch')}, "
             f"bf16 autocast + channels_last on CUDA.", "",
             "| step | what | img/s | other |", "|---|---|---|---|"]
    for r in rows:
        if r["step"] == "environment":
            continue
        other = {k: v for k, v in r.items() if k not in ("step", "what", "img_s", "t")}
        lines.append(f"| {r['step']} | {r.get('what', '')} | {r.get('img_s', '')} | "
                     f"{', '.join(f'{k} {v}' for k, v in other.items())} |")
    verdict = next((r for r in rows if r["step"] == "verdict"), None)
    lines += ["", (f"Full path / plain loop = **{verdict['ratio']:.2f}** (target >= {TARGET}): "
                   f"{'met' if verdict['met'] else 'not met'}." if verdict and "ratio" in verdict
                   else "No verdict: a step was skipped or failed (see the table)."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="output folder")
    p.add_argument("--work", default="/tmp/ccpcsa-gpu-datapath", help="scratch folder")
    p.add_argument("--budget-s", type=float, default=200,
                   help="stop starting steps after this many seconds (default: %(default)s)")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128, help="per-GPU batch (default: 128)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--images", type=int, default=12288, help="training rows (default: 12288)")
    p.add_argument("--val-images", type=int, default=1024)
    p.add_argument("--pool", type=int, default=512, help="distinct JPEGs (default: 512)")
    p.add_argument("--steps", type=int, default=30, help="timed plain-loop steps")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--epochs", type=int, default=2, help="full-path epochs (default: 2)")
    p.add_argument("--pipeline-epochs", type=int, default=2,
                   help="epochs of the input path alone (default: 2; the first starts Ray's "
                        "worker processes)")
    p.add_argument("--score-batches", type=int, default=4,
                   help="calibration batches of --batch for the scoring pass and each round's "
                        "scoring and BatchNorm re-estimation (default: 4)")
    p.add_argument("--score-cpu-images", type=int, default=32,
                   help="images the CPU scoring pass gets (default: 32)")
    p.add_argument("--rounds", type=int, default=3, help="pruning rounds (default: 3)")
    p.add_argument("--round-m", type=int, default=256,
                   help="channels removed per round (default: 256)")
    p.add_argument("--round-epochs", type=int, default=0,
                   help="fine-tune epochs per round (default: 0: the fixed cost without the "
                        "epoch, whose speed the full step measures)")
    p.add_argument("--inproc-epochs", type=int, default=2,
                   help="epochs of the in-process step: the training loop on the Parquet "
                        "stream in the driver, without Ray Train (default: 2)")
    p.add_argument("--inproc-host-memory", nargs="+", default=["pinned"],
                   choices=("pinned", "pageable"),
                   help="host memory the in-process step's batches come from before the copy "
                        "to the GPU; several values run the step once each (default: pinned, "
                        "as the full path)")
    p.add_argument("--cpus-per-worker", type=float, nargs="+", default=[1.0],
                   help="CPUs the Ray Train worker reserves, the rest decode; several values "
                        "run the full step once each, the verdict takes the best (default: 1)")
    p.add_argument("--skip", nargs="+", default=[],
                   choices=("pipeline", "inproc", "scoring", "rounds"),
                   help="steps not to run (default: none)")
    p.add_argument("--smoke-cpu", action="store_true",
                   help="no GPU: every step on the CPU at toy sizes (checks the code paths)")
    p.add_argument("--render", metavar="RESULTS_JSONL",
                   help="only write the markdown section from an earlier results.jsonl")
    p.add_argument("--docs", metavar="MARKDOWN",
                   help="with --render: the file whose section to replace (docs/benchmarks.md)")
    args = p.parse_args(argv)
    command = "python benchmarks/gpu_datapath.py " + " ".join(sys.argv[1:])
    if args.render:
        rows = [json.loads(line) for line in Path(args.render).read_text().splitlines() if line]
        write_section(args.docs or "docs/benchmarks.md", SECTION,
                      render(rows, rows[0].get("command", command)))
        print(f"wrote {args.docs or 'docs/benchmarks.md'}")
        return 0
    cuda = torch.cuda.is_available()
    if args.smoke_cpu and not cuda:
        args.size, args.batch, args.classes, args.model = 16, 8, 4, "resnet18"
        args.images, args.val_images, args.pool = 32, 8, 8
        args.steps, args.warmup_steps, args.epochs = 2, 1, 1
        args.cpus_per_worker = [0.5] * len(args.cpus_per_worker)  # each value: one full step
        args.pipeline_epochs, args.score_batches, args.score_cpu_images = 1, 2, 8
        args.inproc_epochs = 1
        args.rounds, args.round_m = 2, 16
        torch.set_num_threads(1)  # as a 1-CPU worker; 2 threads on a busy 2-core box thrash
    b = Bench(args)
    from ccpcsa.distributed import connect_ray, prefer_loopback

    prefer_loopback()  # before Ray is imported: a private instance on 127.0.0.1
    ray_version = None
    if importlib.util.find_spec("ray") is not None:
        import ray

        ray_version = ray.__version__
    b.emit("environment", python=platform.python_version(), torch=torch.__version__,
           cuda=cuda, gpu=torch.cuda.get_device_name() if cuda else None,
           cpus=os.cpu_count(), ray=ray_version, model=args.model, size=args.size,
           batch=args.batch, budget_s=args.budget_s, command=command)
    if not cuda and not args.smoke_cpu:
        print("CUDA is not available: nothing to measure (--smoke-cpu checks the code paths "
              "on the CPU)", file=sys.stderr)
        return 2
    missing = [m for m in ("ray", "pyarrow", "pandas", "torchvision", "PIL")
               if importlib.util.find_spec(m) is None]
    if missing:
        print(f"error: missing modules {missing}; install device-kit/wheels (see --help)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    args.ray_cpus = None
    plain = full = runner = model = None
    try:
        root = make_data(b)
        plain = plain_loop(b, device) if b.enough("plain", 25) else None
        if cuda:
            torch.cuda.empty_cache()  # the plain loop's model is gone; the worker needs room
        ray = connect_ray()
        args.ray_cpus = ray.cluster_resources().get("CPU", 0)
        if "pipeline" not in args.skip and b.enough("pipeline", 20):
            pipeline_only(b, root, device)
        for pin in args.inproc_host_memory:
            if "inproc" not in args.skip and b.enough("inproc", 20):
                in_process(b, root, device, pin == "pinned")
        for cpus in args.cpus_per_worker:
            if not b.enough("full", 40 + args.epochs * args.images / 400):
                break
            if runner is not None:
                runner.close()  # its worker holds the GPU
            img_s, runner, model = full_path(b, root, device, cpus)
            full = max(full or 0.0, img_s)
        if "scoring" not in args.skip and b.enough("scoring", 40):
            scoring(b, root, device)
        round_s = 8 + args.round_epochs * args.images / 400
        if "rounds" not in args.skip and b.enough("rounds", 20 + args.rounds * round_s):
            rounds(b, root, device, runner, model)
    except Exception as exc:  # report what was measured so far
        b.emit("failed", error=f"{type(exc).__name__}: {exc}"[:400])
        raise
    finally:
        if runner is not None:
            runner.close()
        if plain and full:
            b.emit("verdict", ratio=round(full / plain, 3), target=TARGET,
                   met=full / plain >= TARGET)
        if b.out:
            (b.out / "gpu_datapath.md").write_text(render(b.rows, command))
        print(f"total {time.perf_counter() - T0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
