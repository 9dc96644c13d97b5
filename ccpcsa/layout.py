"""Where BAM goes, and which stage each layer belongs to, for a model the registry does not
describe (any torchvision classification CNN, or a user's own): found by running a dummy input
through it and watching the resolution of the feature map along its main path.

The main path is the chain of the model's children, with every nn.Sequential unrolled into
its own children (so `features.3` of a VGG, `layer1` of a ResNet, `features.0.0` of a
MobileNet). Consecutive units with the same output resolution form a stage, named after that
resolution (`res56` = 56x56 at the traced input size; `head` = everything after the last
convolution). BAM goes after the last unit of each stage except the last one (the paper's
"where the feature map is downsampled"), and not after a first stage that holds a single
convolution (a stem: ResNet's conv1 at 112x112 gets none, as in the paper).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ccpcsa.attention import WithBAM
from ccpcsa.exits import first_line

HEAD = "head"


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class Layout:
    placements: dict[str, int]  # dotted path of the unit to wrap with BAM -> its channels
    stages: tuple[str, ...]  # in forward order, HEAD last
    unit_stages: dict[str, str]  # main-path unit -> its stage
    classifier: str  # path of the last Conv2d / Linear run: its outputs are the classes

    def stage_of(self, name: str) -> str:
        """Stage of a module path, in the model with or without BAM inserted."""
        name = plain_path(name, self.placements)
        while name:
            if name in self.unit_stages:
                return self.unit_stages[name]
            name = name.rpartition(".")[0]
        return HEAD


def trace_layout(model: nn.Module, input_shape: tuple[int, ...], label: str) -> Layout:
    """Run one zero input of shape (C, H, W) through `model` (without BAM) and derive its
    layout; `label` names the model in errors."""
    units = dict(main_path_units(model))
    calls: collections.Counter[str] = collections.Counter()
    started: list[str] = []
    shapes: dict[str, tuple[int, ...] | None] = {}
    compute: list[str] = []
    hooks = []

    def before(name: str):
        def hook(_module, _inputs):
            if not calls[name]:
                started.append(name)
            calls[name] += 1
        return hook

    def after(name: str):
        def hook(_module, _inputs, output):
            if name not in shapes:
                shapes[name] = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        return hook

    def ran(name: str):
        def hook(_module, _inputs, _output):
            compute.append(name)
        return hook

    for name, unit in units.items():
        hooks += [unit.register_forward_pre_hook(before(name)),
                  unit.register_forward_hook(after(name))]
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            hooks.append(module.register_forward_hook(ran(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    except Exception as exc:  # the user's model, any failure: one line naming the input
        raise LayoutError(f"{label} does not run on a {'x'.join(map(str, input_shape))} input "
                          f"({type(exc).__name__}: {first_line(exc)}); choose another "
                          f"--image-size") from None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not compute:
        raise LayoutError(f"{label} has no Conv2d or Linear layer: nothing to prune")
    return _layout(model, units, started, calls, shapes, compute[-1], label)


def output_channels(model: nn.Module, paths: list[str], input_shape: tuple[int, ...]
                    ) -> dict[str, int]:
    """The channels each module at `paths` outputs now (a pruned model's, not the original
    ones a placement recorded), from one zero input of shape (C, H, W)."""
    found: dict[str, int] = {}

    def record(path: str):
        def hook(_module, _inputs, output) -> None:  # returning a value would replace output
            found.setdefault(path, output.shape[1])
        return hook

    hooks = [resolve_module(model, p).register_forward_hook(record(p)) for p in paths]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return found


def main_path_units(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The model's children, nn.Sequential containers unrolled, in registration order."""

    def unroll(name: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        if isinstance(module, nn.Sequential):
            for child_name, child in module.named_children():
                yield from unroll(f"{name}.{child_name}" if name else child_name, child)
        elif name:
            yield name, module

    if isinstance(model, nn.Sequential):
        yield from unroll("", model)
    else:
        for name, child in model.named_children():
            yield from unroll(name, child)


def _layout(model, units, started, calls, shapes, classifier, label) -> Layout:
    order = [u for u in started if shapes.get(u) is not None]
    convs = {u: sum(isinstance(m, nn.Conv2d) for m in units[u].modules()) for u in order}
    with_conv = [i for i, u in enumerate(order) if convs[u] and len(shapes[u]) == 4]
    if not with_conv:
        raise LayoutError(f"{label} has no convolution on its main path: BAM needs feature maps")
    body, head = order[:with_conv[-1] + 1], order[with_conv[-1] + 1:]
    runs: list[list[str]] = []
    sizes: list[tuple[int, ...]] = []
    for unit in body:
        shape = shapes[unit]
        size = shape[-2:] if len(shape) == 4 else None  # a flatten inside the body: same stage
        if runs and (size is None or size == sizes[-1]):
            runs[-1].append(unit)
        elif size is not None:
            runs.append([unit])
            sizes.append(size)
    names = _stage_names(sizes)
    unit_stages = {u: name for run, name in zip(runs, names, strict=True) for u in run}
    unit_stages.update({u: HEAD for u in head})
    placements = {}
    for i, run in enumerate(runs[:-1]):
        if i == 0 and sum(convs[u] for u in run) < 2:  # a stem, not a block
            continue
        candidates = [u for u in run if calls[u] == 1 and len(shapes[u]) == 4]
        if candidates:
            placements[_outermost(model, candidates[-1])] = shapes[candidates[-1]][1]
    return Layout(placements, (*names, HEAD), unit_stages, classifier)


def _stage_names(sizes: list[tuple[int, ...]]) -> list[str]:
    names: list[str] = []
    for h, w in sizes:
        name = f"res{h}" if h == w else f"res{h}x{w}"
        suffix = sum(n == name or n.startswith(f"{name}_") for n in names)
        names.append(f"{name}_{suffix + 1}" if suffix else name)
    return names


def _outermost(model: nn.Module, path: str) -> str:
    """The outermost container whose output is this unit's: `layer1`, not `layer1.1`."""
    while "." in path:
        parent_path, _, last = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        if not isinstance(parent, nn.Sequential) or list(parent._modules)[-1] != last:
            break
        path = parent_path
    return path


def plain_path(name: str, placements: dict[str, int]) -> str:
    """A module path of the model with BAM -> the path of the same module without BAM
    (WithBAM moves a unit `p` to `p.stage` and adds `p.bam`, which maps to `p`)."""
    for p in sorted(placements, key=len):
        if name == f"{p}.bam" or name.startswith(f"{p}.bam."):
            name = p
        elif name == f"{p}.stage" or name.startswith(f"{p}.stage."):
            name = p + name[len(p) + len(".stage"):]
    return name


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """model.get_submodule(path) for a path of the model without BAM, BAM inserted or not."""
    module = model
    for part in path.split(".") if path else []:
        if isinstance(module, WithBAM):
            module = module.stage
        module = getattr(module, part)
    return module.stage if isinstance(module, WithBAM) else module
