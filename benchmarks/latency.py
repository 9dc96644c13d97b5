"""Measured inference latency against FLOPs for ResNet-50 pruned to several FLOPs levels.

Does a FLOPs reduction turn into a speed-up on this device? Each level is reached by
ccpcsa's own physical pruning (dependency-aware, BAM included), removing channels in steps of
a few percent ranked by random scores (latency depends on the widths left, not on which
channels go) until the FLOPs reduction reaches the level. Every model is timed at batch 1 and
batch N (median of repeats after warm-up, ccpcsa.latency); the models are timed round-robin
in several rounds, and the median over rounds is reported, so that a slow spell of a shared
machine hits all of them alike. Rows: the baseline (unpruned, no BAM: the paper's reference),
each level with BAM (what CCPCSA returns) and with BAM stripped (what `export --strip-bam`
deploys).

Needs only torch, torchvision, torch-pruning and ccpcsa's core modules (no Ray, Optuna or
pyarrow), and runs unchanged on CPU or CUDA:

    python benchmarks/latency.py --out docs/benchmarks.md            # this machine's CPU
    python benchmarks/latency.py --device cuda --out docs/benchmarks.md
    python benchmarks/latency.py --image-size 32 --levels 0 30 --repeats 2 --rounds 1 --out -
"""

from __future__ import annotations

import argparse
import copy
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from sections import write_section  # noqa: E402

from ccpcsa.attention import strip_bam  # noqa: E402
from ccpcsa.flops import count_flops, count_params, human  # noqa: E402
from ccpcsa.latency import device_name, measure_latency  # noqa: E402
from ccpcsa.models import build_model  # noqa: E402
from ccpcsa.prune import PruneError, PruneLimits  # noqa: E402
from ccpcsa.pruner import Pruner  # noqa: E402

STEP = 0.03  # fraction of the original prunable channels removed per pruning step


@dataclass
class Variant:
    label: str
    model: torch.nn.Module
    flops: int
    params: int
    batch1: list[float]
    batch_n: list[float]


def prune_to_levels(name: str, shape: tuple[int, ...], levels: list[float], seed: int,
                    round_to: int = 1) -> list[tuple[float, torch.nn.Module]]:
    """(level, a copy of the BAM model whose FLOPs are >= level % below the baseline's);
    with round_to > 1 every pruned width stays a multiple of it (tensor-core friendly)."""
    base_flops = count_flops(build_model(name, 10, input_shape=shape), shape)
    model = build_model(name, 10, with_bam=True, input_shape=shape).eval()
    pruner = Pruner(model, name, shape, limits=PruneLimits(max_ratio=0.95), round_to=round_to)
    generator = torch.Generator().manual_seed(seed)

    def random_scores(_model, groups):
        return {g.key: torch.rand(g.width, generator=generator) for g in groups}

    found = []
    for level in sorted(levels):
        if level > 0:
            count = max(1, int(STEP * sum(pruner.original_widths.values())))
            try:
                pruner.prune_to(base_flops * (1 - level / 100), random_scores, count)
            except PruneError:
                raise SystemExit(f"cannot reach -{level} % FLOPs: every layer is at its cap"
                                 ) from None
        found.append((level, copy.deepcopy(model)))
    return found


def measure(variants: list[Variant], shape, device, batch: int, warmup: int, repeats: int,
            rounds: int, dtype: torch.dtype) -> None:
    for rnd in range(rounds):
        for v in variants:
            result = measure_latency(v.model, shape, device, batch, warmup, repeats, dtype)
            v.batch1.append(result.batch1_ms)
            v.batch_n.append(result.batch_ms)
        print(f"round {rnd + 1}/{rounds} done", file=sys.stderr, flush=True)


def section(args, device: torch.device, variants: list[Variant], seconds: float) -> str:
    base = variants[0]
    b1, bn = statistics.median(base.batch1), statistics.median(base.batch_n)
    kind = "CUDA" if device.type == "cuda" else "CPU"
    dtype = "" if args.dtype == "float32" else f", {args.dtype}"
    lines = [
        f"## Latency vs FLOPs: pruned {args.model} ({kind}{dtype})", "",
        f"Command: `python benchmarks/latency.py {shlex.join(sys.argv[1:])}`  ",
        f"Device: {device_name(device)}; torch {torch.__version__}, Python "
        f"{platform.python_version()}; {seconds / 60:.1f} min.", "",
        f"{args.model} at {args.image_size}x{args.image_size}, random weights (latency does "
        f"not depend on them), eval mode, {args.dtype}. Each level removes channels with "
        f"ccpcsa's physical pruning ({STEP:.0%} of the channels per step, random ranking, "
        f"every layer keeps >= 5 %) until FLOPs are at least that much below the baseline; "
        f"'widths xN': every pruned width kept a multiple of N. "
        f"Latency: median over {args.rounds} interleaved rounds of the median of "
        f"{args.repeats} timed forward passes after {args.warmup} warm-up passes. "
        f"Speed-up and FLOPs ratio are against the baseline (no BAM); efficiency = speed-up "
        f"/ FLOPs ratio (1.0: latency falls as fast as FLOPs).", "",
        f"| model | FLOPs (MACs) | FLOPs ↓ | params | batch 1 ms | batch {args.batch} ms | "
        f"speed-up b1 | speed-up b{args.batch} | FLOPs ratio | efficiency b1 | "
        f"efficiency b{args.batch} |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        m1, mn = statistics.median(v.batch1), statistics.median(v.batch_n)
        ratio = base.flops / v.flops
        lines.append(
            f"| {v.label} | {human(v.flops)} | {100 * (1 - v.flops / base.flops):.1f} % | "
            f"{human(v.params)} | {m1:.2f} | {mn:.2f} | {b1 / m1:.2f}x | {bn / mn:.2f}x | "
            f"{ratio:.2f}x | {b1 / m1 / ratio:.2f} | {bn / mn / ratio:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50", help="model to prune (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=224, help="input side (default: 224)")
    p.add_argument("--levels", type=float, nargs="+", default=[0, 30, 50, 70],
                   help="FLOPs reductions in %% (0 = BAM inserted, nothing pruned; default: "
                        "%(default)s)")
    p.add_argument("--batch", type=int, default=8, help="the larger batch (default: 8)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up passes (default: 3)")
    p.add_argument("--repeats", type=int, default=10, help="timed passes (default: 10)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds over all models (default: 3)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="inference precision (default: float32)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round-to", type=int, nargs="+", default=[1], metavar="N",
                   help="prune each level once per N, keeping every pruned width a multiple "
                        "of N (1: any width; 8: what the loop does on CUDA; default: 1)")
    p.add_argument("--out", default="-",
                   help="markdown file whose section this replaces, or - to print")
    args = p.parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as a deployment would
    shape = (3, args.image_size, args.image_size)
    base = build_model(args.model, 10, input_shape=shape).eval()
    variants = [Variant("baseline (no BAM)", base, count_flops(base, shape),
                        count_params(base), [], [])]
    for round_to in args.round_to:
        widths = "" if round_to == 1 else f", widths x{round_to}"
        for level, model in prune_to_levels(args.model, shape, args.levels, args.seed,
                                            round_to):
            if level == 0 and round_to != args.round_to[0]:
                continue  # the unpruned BAM model once
            label = "BAM, unpruned" if level == 0 else f"-{level:g} % FLOPs{widths}, with BAM"
            variants.append(Variant(label, model, count_flops(model, shape),
                                    count_params(model), [], []))
            if level:
                stripped = strip_bam(copy.deepcopy(model))
                variants.append(Variant(f"-{level:g} % FLOPs{widths}, BAM stripped", stripped,
                                        count_flops(stripped, shape), count_params(stripped),
                                        [], []))
    print(f"{len(variants)} models built in {time.perf_counter() - started:.0f} s; timing on "
          f"{device_name(device)}", file=sys.stderr, flush=True)
    measure(variants, shape, device, args.batch, args.warmup, args.repeats, args.rounds,
            getattr(torch, args.dtype))
    text = section(args, device, variants, time.perf_counter() - started)
    if args.out == "-":
        print(text)
    else:
        write_section(args.out, text.splitlines()[0], text)
        print(f"wrote {text.splitlines()[0]!r} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
