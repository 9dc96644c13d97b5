"""Which torchvision classification models ccpcsa can prune: for each, in its own process with
a time limit, on CPU, at the smallest input it accepts (16, 32, 64, 128 or 224 pixels):

1. build it and trace its BAM placement and stages (ccpcsa.layout),
2. the pre-flight check every run does (one channel off every group, forward pass),
3. insert BAM, remove 10 % of the prunable channels (random scores), run a forward pass,
4. count FLOPs with ccpcsa.flops and independently with torch.utils.flop_counter,
5. save a checkpoint and rebuild it with load_checkpoint: same outputs.

Results are merged into a JSON file (so the list can be run in parts) and the table in
docs/user-guide.md between the model-zoo markers is regenerated from it:

    python benchmarks/model_zoo.py                     # every model (~10-15 min on 2 cores)
    python benchmarks/model_zoo.py --models 'resnet*' 'vgg*'   # a part
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SIZES = (16, 32, 64, 128, 224)
START, END = "<!-- model-zoo:start -->", "<!-- model-zoo:end -->"
CLASSES = 10
FRACTION = 0.10


def check_one(name: str) -> dict:
    """Steps 1-5 for torchvision model `name`; a dict describing what happened."""
    import warnings

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ccpcsa.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
    from ccpcsa.flops import count_flops, count_params
    from ccpcsa.models import build_model, get_spec
    from ccpcsa.prunable import check_prunable
    from ccpcsa.pruner import Pruner

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model_name = f"torchvision:{name}"
    result: dict = {"model": name}
    spec, error = None, ""
    for size in SIZES:
        try:
            spec = get_spec(model_name, (3, size, size))
            break
        except ValueError as exc:
            error = str(exc)
            if "does not run on" not in error:
                break
    if spec is None:
        return {**result, "status": "fails", "step": "BAM placement", "error": error}
    shape = (3, size, size)
    result.update(input=size, bam=list(spec.bam_placements),
                  stages=[s for s in spec.stages if s != "head"])
    try:
        result["groups"] = check_prunable(model_name, CLASSES, shape)
    except ValueError as exc:
        return {**result, "status": "fails", "step": "pre-flight", "error": str(exc)}
    try:
        model = build_model(model_name, CLASSES, with_bam=True, input_shape=shape).eval()
        flops0, params0 = count_flops(model, shape), count_params(model)
        pruner = Pruner(model, spec, shape)
        units = sum(g.width // g.interleave for g in pruner.groups)
        removed = pruner.step(lambda _model, groups: {g.key: torch.rand(g.width) for g in groups},
                              max(1, int(FRACTION * units))).removed
        output = model(torch.randn(2, *shape))
        assert output.shape == (2, CLASSES), tuple(output.shape)
        flops = count_flops(model, shape)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, *shape))
        independent = counter.get_total_flops() / 2
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "m.pt")
            save_checkpoint(model, CheckpointInfo(model_name, CLASSES, True, shape), path)
            rebuilt = load_checkpoint(path)
        x = torch.randn(2, *shape)
        with torch.no_grad():
            same = bool(torch.allclose(rebuilt(x), model(x), atol=1e-5, rtol=1e-4))
    except Exception as exc:  # any failure of this model is the result, not a crash
        return {**result, "status": "fails", "step": "prune 10 %",
                "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"}
    agree = abs(independent - flops) <= 1e-6 * max(flops, 1)
    return {**result, "status": "ok" if agree and same else "fails",
            "step": "" if agree and same else ("FLOPs check" if not agree else "rebuild"),
            "removed": removed, "params": params0, "flops_before": flops0,
            "flops_after": flops, "flops_independent": independent, "rebuild_equal": same}


def run_isolated(name: str, timeout: float, max_params: float) -> dict:
    size = _declared_params(name)
    if max_params and size and size > max_params:
        return {"model": name, "status": "skipped", "step": "",
                "error": f"{size / 1e6:.0f} M params > --max-params {max_params / 1e6:.0f} M"}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True,
                              text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"model": name, "status": "timeout", "step": "",
                "error": f"no answer within {timeout:.0f} s", "seconds": timeout}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, "status": "fails", "step": "process", "error": tail}
    return {**json.loads(lines[-1]), "seconds": round(time.perf_counter() - start, 1)}


def _declared_params(name: str) -> int | None:
    """torchvision's documented parameter count (ImageNet head), without building it."""
    import torchvision

    try:
        return torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]
    except (ValueError, KeyError, AttributeError):
        return None


def family(name: str) -> str:
    return re.match(r"[a-z]+", name).group(0)


def table(results: dict[str, dict]) -> str:
    ok = sum(r["status"] == "ok" for r in results.values())
    skipped = sum(r["status"] == "skipped" for r in results.values())
    lines = [START, "",
             f"{ok} of the {len(results) - skipped} torchvision classification models tried "
             f"prune ({skipped} larger ones skipped in this run: --max-params) "
             f"(`python benchmarks/model_zoo.py`; 10 classes, CPU, the smallest input of "
             f"{'/'.join(map(str, SIZES))} px each accepts; FLOPs = MACs at that input, with "
             f"BAM, before and after removing 10 % of the prunable channels, cross-checked "
             f"with torch.utils.flop_counter; the pruned model survives a checkpoint round "
             f"trip).", "",
             "| family | model | result | input | BAM after | groups | MACs | after 10 % |",
             "|---|---|---|---|---|---|---|---|"]
    for name in sorted(results, key=lambda n: (family(n), n)):
        r = results[name]
        error = r.get("error", "").removeprefix(f"torchvision:{name} ")
        status = "ok" if r["status"] == "ok" else (
            f"{r['status']}{' at ' + r['step'] if r.get('step') else ''}: {_md(error)}")
        macs = (f"{_human(r['flops_before'])} | {_human(r['flops_after'])}"
                if "flops_after" in r else " | ")
        lines.append(f"| {family(name)} | {name} | {status} | {r.get('input', '')} | "
                     f"{len(r.get('bam', []))} | {r.get('groups', '')} | {macs} |")
    untried = sorted(set(_all_names()) - set(results))
    if untried:
        lines += ["", f"Not tried yet ({len(untried)}): {', '.join(untried)}."]
    lines += ["", END]
    return "\n".join(lines)


def _all_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _md(text: str) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= 160 else text[:157] + "..."


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def write_readme(path: Path, text: str) -> None:
    old = path.read_text(encoding="utf-8")
    if START in old and END in old:
        new = old[:old.index(START)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["*"],
                   help="fnmatch patterns of torchvision model names (default: all)")
    p.add_argument("--timeout", type=float, default=300,
                   help="seconds per model (default: %(default)s)")
    p.add_argument("--max-params", type=float, default=150e6,
                   help="skip models torchvision documents as larger (0 = none; "
                        "default: %(default)g)")
    p.add_argument("--json", default=str(REPO / "docs" / "model_zoo.json"),
                   help="results file, merged by model name (default: %(default)s)")
    p.add_argument("--readme", default=str(REPO / "docs" / "user-guide.md"),
                   help="file whose model-zoo table is regenerated ('-' = print only)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: check one model, print JSON
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(check_one(args.one)), flush=True)
        return 0
    names = [n for n in _all_names() if any(fnmatch.fnmatch(n, pat) for pat in args.models)]
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in names:
        results[name] = run_isolated(name, args.timeout, args.max_params)
        r = results[name]
        print(f"{name:24s} {r['status']:8s} {r.get('seconds', 0):6.1f}s "
              f"{r.get('error', '')[:120]}", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    text = table(results)
    if args.readme == "-":
        print(text)
    else:
        write_readme(Path(args.readme), text)
        print(f"table of {len(results)} models -> {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
