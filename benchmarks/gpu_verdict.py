"""GPU verdict (issue 27): is the full Parquet -> Ray Data -> Ray Train path at >= 0.9 of a plain
PyTorch loop, with CPU decode and with GPU decode, and what does a screened round cost?
ResNet-50 + BAM at 224², bf16 autocast + channels_last, one GPU, batch --batch.

Sections, in order; each is skipped (with a row saying so) when the --budget-s left is short,
and every row is written as it is measured (OUT/results.jsonl), so a cut run keeps its rows:
  env       machine, versions; `gpu_decode`: whether torchvision's decode_jpeg runs on CUDA
  data      synthetic photo-like JPEGs (benchmarks/jpegs.py) exported to Parquet, made here
  plain     the textbook loop on one GPU-resident batch: the reference img/s
  copy      the Parquet stream (one stream per fit, ParquetBatches.fit) feeding run_epoch in
            this process, once per host-copy mode (ring / ray_pin / pageable), CPU decode:
            img/s of the second epoch, its ratio to plain, and the machine's CPU cores busy
            during it (/proc/stat: decode tasks included); the best mode is used below
  prefetch  the best mode again with 4x --prefetch
  gpudec    the copy step with --decode gpu (Ray Data ships JPEG bytes, decode_jpeg on the GPU)
  full      RayRunner, 1 GPU worker, --epochs epochs in one stream, CPU decode (then, after
            rounds and gpudec, GPU decode): img/s of the last epoch, ratio to plain, cores
            busy over the fit
  rounds    --rounds screened pruning rounds on the CPU-decode worker group (score, prune,
            BatchNorm re-estimation, --round-epochs fine-tune epochs with their evaluation):
            each round's wall time split by command: the per-round fixed cost
  verdict   full / plain for each decode, against 0.9

Writes OUT/results.jsonl and OUT/gpu_verdict.md (the table, also printed last). On the lent
GPU machine run benchmarks/gpu_verdict.sh (installs device-kit/wheels first). --smoke-cpu runs
every section on the CPU at toy sizes (a code-path check; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_datapath import T0, Bench, fed_img_s, make_data, plain_loop, sync  # noqa: E402

TARGET = 0.9
HOST_COPIES = ("ring", "ray_pin", "pageable")


class CpuMeter:
    """CPU cores busy on the whole machine (every process: decode tasks, trainer, Ray) and in
    this process, between start() and stop(), from /proc/stat and os.times()."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _busy(self) -> float:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except OSError:
            return float("nan")
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / self.tick

    def start(self) -> None:
        self.t, self.busy, self.own = time.perf_counter(), self._busy(), _own_cpu()

    def stop(self) -> dict:
        wall = max(time.perf_counter() - self.t, 1e-9)
        return {"cores": round((self._busy() - self.busy) / wall, 2),
                "driver_cores": round((_own_cpu() - self.own) / wall, 2)}


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def gpu_decode_check(b: Bench, device: torch.device) -> bool:
    """Does decode_jpeg take a batch on this device (nvJPEG on CUDA)? Else the worker's
    fallback decodes on its CPU and the gpudec rows would not measure GPU decode."""
    import torchvision
    from jpegs import jpeg_pool
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpeg_pool(4, 1)]
    try:
        out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        ok = all(o.device.type == device.type for o in out)
        error = None
    except Exception as exc:  # noqa: BLE001 - reported, the rows below say what ran
        ok, error = False, f"{type(exc).__name__}: {exc}"[:200]
    b.emit("env", what="decode_jpeg on a batch", device=device.type, works=ok,
           torchvision=torchvision.__version__, error=error)
    return ok


def attempt(b: Bench, step: str, fn, *args):
    """One section; a failure becomes a row (with its last traceback lines) and the run goes
    on: one device run has to bring back every figure it can."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported in the results
        tail = traceback.format_exc().strip().splitlines()[-6:]
        b.emit("failed", what=step, error=f"{type(exc).__name__}: {exc}"[:300],
               trace=" | ".join(tail)[:600])
        return None


def stream_fit(b: Bench, root: str, device: torch.device, plain: float | None, step: str,
               decode: str, host_copy: str, prefetch: int) -> float | None:
    """run_epoch in this process on one ParquetBatches stream of 2 epochs; the 2nd is timed."""
    from ccpcsa.data import shard_index
    from ccpcsa.distributed.ingest import IngestConfig, ParquetBatches
    from ccpcsa.models import build_model
    from ccpcsa.train import InputWait, TrainConfig, make_optimizer, run_epoch, to_device

    a = b.args
    cfg = TrainConfig(batch_size=a.batch)
    source = ParquetBatches(shard_index(root, "train"), None,
                            IngestConfig(a.size, a.batch, host_copy=host_copy, decode=decode,
                                         prefetch_batches=prefetch), device)
    model = to_device(build_model(a.model, a.classes, with_bam=True), device, cfg)
    opt, sched = make_optimizer(model, cfg, 0.01, 10**6)
    stream = source.fit(range(2), 0, 1)
    meter, img_s = CpuMeter(), None
    try:
        for epoch in range(2):
            meter.start()
            start = time.perf_counter()
            batches = InputWait((source.normalize(x), y) for x, y in stream.epoch(epoch))
            _loss, seen = run_epoch(model, batches, opt, sched, device, cfg)
            sync()
            seconds = time.perf_counter() - start
            if epoch == 0 and seconds > b.args.epoch_cap_s:
                b.emit(step, what=f"decode {decode}, host copy {host_copy}: epoch 1 took "
                       f"{seconds:.0f} s, epoch 2 skipped", img_s=round(seen / seconds, 1),
                       seconds=round(seconds, 1), decode=decode, host_copy=host_copy)
                return seen / seconds
            if epoch == 1:
                img_s = seen / seconds
                cpu = meter.stop()
                b.emit(step, what=f"run_epoch on one stream in the driver, decode {decode}, "
                       f"host copy {host_copy}, prefetch {prefetch}, epoch 2",
                       img_s=round(img_s, 1),
                       ratio=round(img_s / plain, 3) if plain else None,
                       input_wait_s=round(batches.seconds, 2),
                       fed_img_s=fed_img_s(seen, seconds, batches.seconds),
                       img_s_per_core=round(img_s / max(cpu["cores"], 1e-9), 1),
                       seconds=round(seconds, 1), decode=decode, host_copy=host_copy,
                       prefetch=prefetch, **cpu)
            elif epoch == 0:
                b.emit(step, what=f"decode {decode}, host copy {host_copy}, epoch 1 (stream "
                       "start, cuDNN autotuning)", img_s=round(seen / seconds, 1),
                       seconds=round(seconds, 1), decode=decode, host_copy=host_copy)
    finally:
        stream.close()
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return img_s


def full_fit(b: Bench, root: str, device: torch.device, plain: float | None, decode: str,
             host_copy: str):
    from ccpcsa.data import DataConfig
    from ccpcsa.distributed import RayRunner
    from ccpcsa.models import build_model
    from ccpcsa.train import TrainConfig

    a = b.args
    gpu = device.type == "cuda"
    start = time.perf_counter()
    data = DataConfig("parquet", root, a.size, decode=decode, host_copy=host_copy,
                      prefetch_batches=a.prefetch)
    runner = RayRunner(data, TrainConfig(batch_size=a.batch), 1,
                       str(Path(a.work) / f"ray-{decode}"), gpus_per_worker=1.0 if gpu else 0.0,
                       cpus_per_worker=a.cpus_per_worker)
    model = build_model(a.model, a.classes, with_bam=True)
    meter = CpuMeter()
    meter.start()
    fit_start = time.perf_counter()
    runner.fit(model, a.epochs, 0.01, label=f"verdict-{decode}")
    fit_wall = time.perf_counter() - fit_start
    cpu = meter.stop()
    m = runner.last_metrics
    img_s = m["last_samples"] / m["last_seconds"]
    b.emit("full", what=f"Ray Train 1 worker, decode {decode}, host copy {host_copy}, last of "
           f"{a.epochs} epochs (one stream); cores busy over the whole fit", img_s=round(img_s, 1),
           ratio=round(img_s / plain, 3) if plain else None,
           input_wait_s=round(m["last_input_wait_s"], 2),
           fed_img_s=fed_img_s(m["last_samples"], m["last_seconds"], m["last_input_wait_s"]),
           fit_wall_s=round(fit_wall, 1), ready_s=round(fit_start - start, 1),
           decode=decode, host_copy=host_copy, cores=cpu["cores"],
           evaluated=m.get("evaluated"))
    return img_s, runner, model


def rounds(b: Bench, device: torch.device, runner, model) -> None:
    """Screened pruning rounds on the started group: each round's wall time by command."""
    from ccpcsa.loop import LoopConfig, prune_loop
    from ccpcsa.prune import PruneLimits

    a = b.args
    cfg = LoopConfig(groups_per_round=a.round_m, tolerance=100.0, max_rounds=a.rounds,
                     finetune_epochs=a.round_epochs, calibration_batches=a.score_batches,
                     bn_batches=a.score_batches, limits=PruneLimits(max_ratio=0.8))
    marks = [(time.perf_counter(), len(runner.timings))]

    def on_round(record, _model) -> None:
        if record.round == 0:
            return
        now, commands = time.perf_counter(), runner.timings[marks[-1][1]:]
        wall = now - marks[-1][0]
        by_op: dict[str, float] = {}
        for c in commands:
            by_op[c.op] = round(by_op.get(c.op, 0.0) + c.worker_s, 2)
        workers = sum(c.worker_s for c in commands)
        b.emit("rounds", what=f"round {record.round} ({a.round_epochs} fine-tune epochs)",
               wall_s=round(wall, 2), workers_s=round(workers, 2),
               driver_and_dispatch_s=round(wall - workers, 2), **{f"{k}_s": v for k, v in
                                                                  by_op.items()})
        marks.append((now, len(runner.timings)))

    prune_loop(model, a.model, (3, a.size, a.size), 0.0, runner, cfg, on_round,
               initial_accuracy=0.0)


def render(rows: list[dict], command: str) -> str:
    env = next((r for r in rows if r["step"] == "env" and "cpus" in r), {})
    lines = ["### GPU verdict (benchmarks/gpu_verdict.py)", "", f"Command: `{command}`  ",
             f"Machine: {env.get('gpu') or 'no GPU'}, {env.get('cpus')} CPU cores, Python "
             f"{env.get('python')}, torch {env.get('torch')}, Ray {env.get('ray')}; "
             f"{env.get('model')} + BAM at {env.get('size')}², batch {env.get('batch')}.", "",
             "| step | what | img/s | / plain | cores busy | other |", "|---|---|---|---|---|---|"]
    shown = ("step", "what", "img_s", "ratio", "cores", "t")
    for r in rows:
        if r["step"] == "env" and "cpus" in r:
            continue
        other = ", ".join(f"{k} {v}" for k, v in r.items() if k not in shown)
        lines.append(f"| {r['step']} | {r.get('what', '')} | {r.get('img_s', '')} | "
                     f"{r.get('ratio', '')} | {r.get('cores', '')} | {other} |")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="output folder")
    p.add_argument("--work", default="/tmp/ccpcsa-gpu-verdict", help="scratch folder")
    p.add_argument("--budget-s", type=float, default=400,
                   help="start no section past this many seconds (default: %(default)s)")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128, help="per-GPU batch (default: 128)")
    p.add_argument("--prefetch", type=int, default=2,
                   help="batches Ray Data prefetches (default: 2, the product default; the "
                        "prefetch row tries 4x that)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--images", type=int, default=7680, help="training rows (default: 7680)")
    p.add_argument("--val-images", type=int, default=512)
    p.add_argument("--pool", type=int, default=512, help="distinct JPEGs (default: 512)")
    p.add_argument("--steps", type=int, default=30, help="timed plain-loop steps")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--epochs", type=int, default=3, help="full-path epochs (default: 3)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--epoch-cap-s", type=float, default=45,
                   help="copy/gpudec: no second epoch after a first epoch this long")
    p.add_argument("--score-batches", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--round-m", type=int, default=256)
    p.add_argument("--round-epochs", type=int, default=1)
    p.add_argument("--smoke-cpu", action="store_true",
                   help="no GPU: every section on the CPU at toy sizes (checks the code paths)")
    args = p.parse_args(argv)
    if args.smoke_cpu and not torch.cuda.is_available():
        args.size, args.batch, args.classes, args.model = 16, 8, 4, "resnet18"
        args.images, args.val_images, args.pool = 48, 16, 8
        args.steps, args.warmup_steps, args.epochs, args.prefetch = 2, 1, 2, 1
        args.cpus_per_worker, args.score_batches, args.rounds, args.round_m = 0.5, 2, 2, 16
        torch.set_num_threads(1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    command = "python benchmarks/gpu_verdict.py " + " ".join(sys.argv[1:])
    b = Bench(args)
    from ccpcsa.distributed import connect_ray, prefer_loopback

    prefer_loopback()
    cuda = torch.cuda.is_available()
    ray_version = None
    if importlib.util.find_spec("ray") is not None:
        import ray

        ray_version = ray.__version__
    b.emit("env", python=platform.python_version(), torch=torch.__version__, cuda=cuda,
           gpu=torch.cuda.get_device_name() if cuda else None, cpus=os.cpu_count(),
           ray=ray_version, model=args.model, size=args.size, batch=args.batch,
           budget_s=args.budget_s, command=command)
    if not cuda and not args.smoke_cpu:
        print("CUDA is not available (--smoke-cpu checks the code paths on the CPU)",
              file=sys.stderr)
        return 2
    if ray_version is None:
        print("error: ray is missing; run benchmarks/gpu_verdict.sh (installs the wheels)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    plain = None
    full: dict[str, float] = {}
    runner = model = None
    try:
        gpu_decode_check(b, device)
        root = make_data(b)
        plain = plain_loop(b, device) if b.enough("plain", 25) else None
        if cuda:
            torch.cuda.empty_cache()
        connect_ray()
        measured: dict[str, float] = {}
        for mode in HOST_COPIES:
            if b.enough(f"copy {mode}", 25):
                img_s = attempt(b, f"copy {mode}", stream_fit, b, root, device, plain, "copy",
                                "cpu", mode, args.prefetch)
                if img_s:
                    measured[mode] = img_s
        best = max(measured, key=measured.get) if measured else "pageable"
        b.emit("copy", what="best host copy (used below)", host_copy=best)
        if b.enough("prefetch", 25):
            attempt(b, "prefetch", stream_fit, b, root, device, plain, "prefetch", "cpu", best,
                    args.prefetch * 4)
        # CPU decode's verdict and the round cost first: a slow GPU decode cannot crowd them out
        if b.enough("full cpu", 45):
            done = attempt(b, "full cpu", full_fit, b, root, device, plain, "cpu", best)
            if done:
                full["cpu"], runner, model = done
        if runner is not None and b.enough("rounds", 15 + 12 * args.rounds):
            attempt(b, "rounds", rounds, b, device, runner, model)
        if runner is not None:
            runner.close()  # its worker holds the GPU
            runner = None
        if b.enough("gpudec", 25):
            attempt(b, "gpudec", stream_fit, b, root, device, plain, "gpudec", "gpu", best,
                    args.prefetch)
        if b.enough("full gpu", 45):
            done = attempt(b, "full gpu", full_fit, b, root, device, plain, "gpu", best)
            if done:
                full["gpu"], runner, model = done
    except Exception as exc:  # data or plain failed: report what was measured so far
        b.emit("failed", error=f"{type(exc).__name__}: {exc}"[:400])
        raise
    finally:
        if runner is not None:
            runner.close()
        for decode, img_s in full.items():
            if plain:
                b.emit("verdict", what=f"full path / plain loop, decode {decode}",
                       img_s=round(img_s, 1), ratio=round(img_s / plain, 3), target=TARGET,
                       met=img_s / plain >= TARGET)
        table = render(b.rows, command)
        if b.out:
            (b.out / "gpu_verdict.md").write_text(table)
        print(f"total {time.perf_counter() - T0:.0f} s", flush=True)
        print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
