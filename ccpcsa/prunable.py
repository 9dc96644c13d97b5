"""Checks run once, before any training. Can this architecture be pruned consistently?
For models outside the registry: remove one channel (or one per conv group) from every
channel group of the BAM model, run it, and say which layer breaks if it does. Do the
weights fit it?"""

from __future__ import annotations

import torch
from torch import nn

from ccpcsa.exits import first_line
from ccpcsa.layout import plain_path
from ccpcsa.loop import PrepareConfig
from ccpcsa.models import build_model, get_spec, is_registered
from ccpcsa.prune import PruneError, build_graph, find_groups, remove_channels
from ccpcsa.weights import load_weights


def check_before_training(cfg: PrepareConfig) -> None:
    """Before stage 0 trains anything: a model outside the registry must prune consistently,
    and the weights must exist and fit the model (tensors, classes). One-line errors."""
    if not is_registered(cfg.model):
        check_prunable(cfg.model, cfg.num_classes, cfg.input_shape)
    if cfg.weights:
        model = build_model(cfg.model, cfg.num_classes, input_shape=cfg.input_shape)
        classifier = get_spec(cfg.model, cfg.input_shape).classifier(model)
        load_weights(model, cfg.weights, classifier, cfg.dataset)


def check_prunable(name: str, num_classes: int, input_shape: tuple[int, ...]) -> int:
    """Raise PruneError (one line, naming the layer) unless the BAM model `name` keeps
    working with channels removed from each of its groups; returns the number of groups."""
    spec = get_spec(name, input_shape)
    model = build_model(name, num_classes, with_bam=True, input_shape=input_shape).eval()
    example = torch.zeros(1, *input_shape)
    try:
        graph = build_graph(model, example)
    except Exception as exc:  # torch-pruning's tracer, on an architecture it cannot follow
        raise PruneError(f"{name} cannot be pruned: torch-pruning cannot trace it "
                         f"({_where(exc)}{type(exc).__name__}: {first_line(exc)})") from None
    groups = find_groups(model, graph, spec.classifier(model), spec.stage_of)
    if not groups:
        raise PruneError(f"{name} has no channel group that can be pruned")
    chosen = {g.key: [j * (g.width // g.interleave) for j in range(g.interleave)]
              for g in groups if g.width // g.interleave > 1}
    for group in groups:
        if group.key not in chosen:
            continue
        try:
            remove_channels(graph, [group], {group.key: chosen[group.key]})
        except Exception as exc:
            raise PruneError(f"{name} cannot be pruned consistently: removing a channel of "
                             f"layer {group.key} fails ({type(exc).__name__}: "
                             f"{first_line(exc)})") from None
    layer, output = _run_naming_failure(model, example)
    layer = plain_path(layer, spec.bam_placements)
    if isinstance(output, BaseException):
        raise PruneError(f"{name} cannot be pruned consistently: with channels removed, layer "
                         f"{layer} fails ({type(output).__name__}: {first_line(output)})")
    if not isinstance(output, torch.Tensor) or output.shape != (1, num_classes):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output)
        raise PruneError(f"{name} cannot be pruned consistently: with channels removed it "
                         f"returns {shape}, not (1, {num_classes})")
    return len(groups)


def _run_naming_failure(model: nn.Module, example: torch.Tensor):
    """(name of the innermost module running when the forward pass failed, the exception),
    or ("", output)."""
    names = {m: n for n, m in model.named_modules()}
    running: list[str] = []
    hooks = []

    def enter(module, _inputs) -> None:
        running.append(names[module])

    def leave(_module, _inputs, _output) -> None:
        running.pop()

    for module in model.modules():
        hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with torch.no_grad():
            return "", model(example)
    except Exception as exc:
        return (running[-1] if running else "(top level)"), exc
    finally:
        for h in hooks:
            h.remove()


def _where(exc: BaseException) -> str:
    """The torch-pruning graph node being handled when its tracer failed, if any."""
    tb = exc.__traceback__
    node = None
    while tb is not None:
        node = tb.tb_frame.f_locals.get("node", node)
        tb = tb.tb_next
    name = getattr(node, "name", None)
    return f"at {name}: " if name else ""
