"""`python -m ccpcsa export`: a checkpoint -> a deployable file (TorchScript, torch.export or
ONNX) with a dynamic batch dimension, checked against the checkpoint's own outputs.

    python -m ccpcsa export runs/prune/final.pt --format onnx --out final.onnx --strip-bam
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ccpcsa import exits, storage
from ccpcsa.attention import has_bam, strip_bam
from ccpcsa.checkpoint import info_of, model_from_payload, read_payload
from ccpcsa.command import refusing

FORMATS = ("torchscript", "exported", "onnx")
SUFFIXES = {"torchscript": ".torchscript.pt", "exported": ".pt2", "onnx": ".onnx"}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# outputs must agree to |exported - checkpoint| <= ATOL + RTOL * |checkpoint| (float32; ONNX
# Runtime picks other convolution algorithms than torch, hence not bit-exact)
ATOL, RTOL = 1e-4, 1e-3
CHECK_BATCHES = (1, 3)  # other than the export's example batch (2): the batch is dynamic


class ExportError(ValueError):
    pass


@dataclass(frozen=True)
class ExportResult:
    path: str
    max_abs_diff: float
    within_tolerance: bool


def add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="write a checkpoint as TorchScript, torch.export or ONNX, and check it",
        description="Export a ccpcsa checkpoint (final.pt, a frontier/*.pt, ...) to a file "
                    "that runs without ccpcsa: TorchScript (torch.jit.load), torch.export "
                    "(torch.export.load(...).module()) or ONNX (onnxruntime; needs the "
                    "optional extra: pip install 'ccpcsa[onnx]'). The batch dimension is "
                    "dynamic, the image size is the checkpoint's. The exported model's outputs "
                    f"are compared with the checkpoint's on random inputs of batch "
                    f"{' and '.join(map(str, CHECK_BATCHES))}: they must agree to "
                    f"{ATOL:g} + {RTOL:g}*|output|; exit status 1 if not.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="ccpcsa checkpoint (path or URI)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="torchscript (traced), exported (torch.export, .pt2) or onnx")
    p.add_argument("--out", default=None,
                   help="output file (path or URI; default: CHECKPOINT with the format's "
                        f"suffix: {', '.join(SUFFIXES.values())})")
    p.add_argument("--strip-bam", action="store_true",
                   help="remove BAM first, as the paper's final model. The outputs, and so the "
                        "accuracy, change unless the checkpoint was fine-tuned without BAM "
                        "(prune --strip-bam writes such a final_nobam.pt)")
    p.add_argument("--trust-model-code", action="store_true",
                   help="allow a checkpoint whose model is MODULE:CALLABLE (your own code): "
                        "loading it imports that module and calls it. Without this flag such "
                        "a checkpoint is refused before anything is imported; registry models "
                        "and torchvision:NAME need no flag")


def run_export(args: argparse.Namespace) -> int:
    with refusing():  # what is wrong before the export starts
        check_format(args.format)
        payload = read_payload(args.checkpoint)
        info = info_of(payload)
        model = model_from_payload(payload, source=repr(args.checkpoint),
                                   trust_model_code=args.trust_model_code)
    note = ""
    if args.strip_bam:
        if has_bam(model):
            strip_bam(model)
            note = ("BAM removed: outputs and accuracy differ from the checkpoint's metrics "
                    "unless it was fine-tuned without BAM")
        else:
            note = "the checkpoint has no BAM: --strip-bam changes nothing"
    out = args.out or _default_out(args.checkpoint, args.format)
    result = export_model(model.eval(), tuple(info.input_shape), args.format, out)
    size = len(storage.read_bytes(result.path)) / 1e6
    bam = "BAM stripped" if args.strip_bam and note.startswith("BAM") else (
        "with BAM" if has_bam(model) else "no BAM")
    print(f"exported {args.checkpoint} ({info.model}, {bam}) -> {result.path} "
          f"({args.format}, {size:.1f} MB)")
    print(f"input: float32 [batch, {', '.join(map(str, info.input_shape))}] -> "
          f"[batch, {info.num_classes}] logits")
    if note:
        print(f"note: {note}")
    verdict = "OK" if result.within_tolerance else "MISMATCH"
    print(f"check: max |exported - checkpoint| = {result.max_abs_diff:.3g} on random inputs "
          f"of batch {' and '.join(map(str, CHECK_BATCHES))} (tolerance {ATOL:g} + "
          f"{RTOL:g}*|output|): {verdict}")
    return exits.OK if result.within_tolerance else exits.FAILED


def check_format(fmt: str) -> None:
    """A known format whose packages are installed; ExportError otherwise."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "onnx":
        missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
        if missing:
            raise ExportError(f"--format onnx needs the optional extra (missing: "
                              f"{', '.join(missing)}): pip install 'ccpcsa[onnx]'")


def export_model(model: nn.Module, input_shape: tuple[int, ...], fmt: str, out: str
                 ) -> ExportResult:
    """Write `model` (eval mode, CPU) to `out` in format `fmt`, load it back and compare."""
    check_format(fmt)
    model = model.cpu().eval()
    example = torch.randn(2, *input_shape)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model" + SUFFIXES[fmt])
        try:
            _WRITERS[fmt](model, example, local)
        except Exception as exc:  # the exporters' own errors: one line naming the format
            raise ExportError(f"{fmt} export failed: {type(exc).__name__}: "
                              f"{exits.first_line(exc)}") from None
        run = _LOADERS[fmt](local)
        diff, ok = 0.0, True
        generator = torch.Generator().manual_seed(0)
        for batch in CHECK_BATCHES:
            x = torch.randn(batch, *input_shape, generator=generator)
            with torch.no_grad():
                expected = model(x)
            got = run(x)
            diff = max(diff, float((got - expected).abs().max()))
            ok = ok and bool(((got - expected).abs() <= ATOL + RTOL * expected.abs()).all())
        with open(local, "rb") as f:
            storage.write_bytes(out, f.read())
    return ExportResult(out, diff, ok)


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: str) -> None:
    with warnings.catch_warnings():  # torch.jit is deprecated but still what many serve
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, example), path)


def _write_exported(model: nn.Module, example: torch.Tensor, path: str) -> None:
    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch())
    torch.export.save(program, path)


def _write_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), path, dynamo=True, input_names=["input"],
                          output_names=["logits"], dynamic_shapes=_dynamic_batch(),
                          external_data=False, verbose=False)


def _dynamic_batch() -> tuple[dict[int, object]]:
    return ({0: torch.export.Dim("batch", min=1)},)


def _load_torchscript(path: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(path)
    return lambda x: module(x).detach()


def _load_exported(path: str):
    module = torch.export.load(path).module()
    return lambda x: module(x).detach()


def _load_onnx(path: str):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


_WRITERS = {"torchscript": _write_torchscript, "exported": _write_exported,
            "onnx": _write_onnx}
_LOADERS = {"torchscript": _load_torchscript, "exported": _load_exported, "onnx": _load_onnx}


def _default_out(checkpoint: str, fmt: str) -> str:
    root, ext = os.path.splitext(checkpoint)
    return (root if ext == ".pt" else checkpoint) + SUFFIXES[fmt]
