"""Channel importance: CCPCSA's channel-correlation score, its variants and Torch-Pruning's
baselines, behind one interface: compute_scores(kind, ...) -> {group key: scores of its width}.

Where a group's channels are observed (every data-driven criterion): at the inputs of the
Conv2d / Linear layers that read them (`ChannelGroup.consumers`), i.e. after BN, ReLU and,
where a BAM sits on the channels, after its attention: F + F * M(F) is what the next stage
reads. That is our definition (docs/design.md, "Score": "the layer's output after BN,
weighted by attention where attention applies"); "the nearest BAM downstream" cannot weight
a block's inner channels, because BAM's attention is over the residual stream's channels, not
theirs. A residual stream is read at every block it feeds, so its statistics pool all those
reads (members' *statistics* are combined, not their normalised scores). A group no layer
reads at full width (VGG's last conv, read through a flatten) is observed at its BN outputs.

Scores over the pooled activations X (C x samples) of a group, R = Pearson correlation of X's
channels, strength a_i = mean |X_i|:
- ccpcsa:   a_i * (1 - mean_{j!=i} |R_ij|)          (our reading of the paper)
- strength: a_i                                      (attention-weighted mean |x|)
- maxcorr:  a_i * (1 - max_{j!=i} |R_ij|)            (redundancy = the closest twin)
- dedup:    a_i, except that among the group's most correlated pairs (|R_ij| at least
            DEDUP_FLOOR and at least the DEDUP_QUANTILE of the channels' max |R|), taken
            greedily from the most correlated, the weaker of each pair keeps a_i * (1 - |R_ij|)
- attention: mean BAM attention M(F) on BAM channels, strength elsewhere (PCAS-style)
A constant (dead) channel carries nothing: it scores 0 under every data-driven criterion.

Baselines are Torch-Pruning's importances on the group's full dependency group (pruned
layers' filters, consumers' input slices, BN): l1 = MagnitudeImportance(p=1), bn_scale =
BNScaleImportance, lamp = LAMPImportance, fpgm = FPGMImportance, taylor =
GroupTaylorImportance (|w * dL/dw| after a backward pass on labelled calibration batches),
random = RandomImportance (seeded).

Every result is normalised per group by its mean (LAMP keeps its own normaliser, its point),
which only matters to the global allocation policies (prune.select_channels).

Default: `l1` (DEFAULT_IMPORTANCE, with uniform allocation), decided by the Fashion-MNIST
benchmark (benchmarks/importance.py, docs/benchmarks.md; resnet20 and resnet56, 1 fine-tune
epoch; every cell on 3 seeds, the 8 deciding cells on 6): on six seeds it is best or within
noise of the best after fine-tuning in all 4 settings (-50/-70 % on both models), ahead of
random on every seed, near the top right after pruning, and it needs no calibration data.
lamp and fpgm under uniform allocation do as well. The paper's `ccpcsa` is within noise in 3
settings but 2.94 points below the best (lamp) at -70 % on resnet20, behind on all 6 seeds;
its redundancy term adds +0.6 points over strength alone after fine-tuning on average,
beyond noise in 1 of 4 settings (docs/design.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch_pruning as tp
from torch import nn

from ccpcsa.prune import ChannelGroup

# The library's default criterion, decided by benchmarks/importance.py (module docstring).
DEFAULT_IMPORTANCE = "l1"
OBSERVED = ("ccpcsa", "strength", "maxcorr", "dedup", "attention")
TORCH_PRUNING: dict[str, Callable[[], tp.importance.Importance]] = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "bn_scale": tp.importance.BNScaleImportance,
    "taylor": tp.importance.GroupTaylorImportance,
    "lamp": tp.importance.LAMPImportance,
    "fpgm": tp.importance.FPGMImportance,
    "random": tp.importance.RandomImportance,
}
IMPORTANCES = (*OBSERVED, *TORCH_PRUNING)
NEEDS_BATCHES = (*OBSERVED, "taylor")
# dedup: a pair is a near-duplicate when its |R| is at least DEDUP_FLOOR and among the top
# quarter of the group's channels' max |R|. A fixed 0.9 (docs/design.md) matched no pair
# at all in a trained resnet20 on digits (the largest |R| of a layer was 0.52-0.84), which made
# dedup the same as strength; relative to the layer, it always acts on its closest twins.
DEDUP_FLOOR = 0.5
DEDUP_QUANTILE = 0.75
_CHUNK = 1 << 22  # elements per product block when accumulating (bounds transient memory)
_BLOCK = 8192  # samples per float32 product block: keeps its rounding near 1e-6 relative
_DEAD = 1e-12  # a channel whose standard deviation is below this is constant

# Sums each tensor of the list over the data-parallel workers, in place (every worker calls it
# with tensors of the same shapes, in the same order); None = one process.
Reduce = Callable[[list[torch.Tensor]], None]


class ImportanceError(ValueError):
    pass


class CorrelationStats:
    """Streaming sums for the channel correlation of one group: n, sum(d), d d^T, sum|x|,
    with d = x - shift (the first batch's mean) so large means do not cancel precision.
    Every update adds samples: reads of the same channels at several places pool.

    Each block of at most _BLOCK samples is multiplied in float32 (fast on a GPU; TF32 is off
    while scoring, see _observe) and added to float64 totals: d is nearly centred and a block
    short, so the float32 rounding stays near 1e-6 of the result. merge() sums the statistics
    of data-parallel workers, each on its own share of the calibration images."""

    def __init__(self, channels: int | None = None, device: torch.device | str = "cpu") -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.sum_d: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None
        if channels is not None:
            self._allocate(channels, torch.device(device))

    def _allocate(self, channels: int, device: torch.device) -> None:
        zeros = dict(dtype=torch.float64, device=device)
        self.shift = torch.zeros(channels, **zeros)
        self.sum_d = torch.zeros(channels, **zeros)
        self.outer = torch.zeros(channels, channels, **zeros)
        self.abs_sum = torch.zeros(channels, **zeros)

    def update(self, x: torch.Tensor) -> None:
        flat = channels_first(x).float()
        channels = flat.shape[0]
        if self.shift is None or self.shift.device != flat.device:
            self._allocate(channels, flat.device)
        if self.n == 0:
            self.shift = flat.double().mean(1)
        shift = self.shift.float()[:, None]
        step = min(_BLOCK, max(1, _CHUNK // max(channels, 1)))
        for start in range(0, flat.shape[1], step):
            block = flat[:, start:start + step]
            d = block - shift
            self.sum_d += d.sum(1, dtype=torch.float64)
            self.outer += (d @ d.T).double()
            self.abs_sum += block.abs().sum(1, dtype=torch.float64)
        self.n += flat.shape[1]

    def recentre(self, shift: torch.Tensor) -> None:
        """Express the sums relative to another shift: d' = x - shift = d + (old - shift)."""
        assert self.shift is not None and self.sum_d is not None and self.outer is not None
        delta = self.shift - shift
        self.outer += (torch.outer(self.sum_d, delta) + torch.outer(delta, self.sum_d)
                       + self.n * torch.outer(delta, delta))
        self.sum_d += self.n * delta
        self.shift = shift

    def _std_and_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n < 2:
            raise ImportanceError("correlation needs at least 2 samples per channel")
        mean_d = self.sum_d / self.n
        cov = self.outer / self.n - torch.outer(mean_d, mean_d)
        return cov.diagonal().clamp_min(0).sqrt(), cov

    def alive(self) -> torch.Tensor:
        return self._std_and_cov()[0] > _DEAD

    def correlation(self) -> torch.Tensor:
        std, cov = self._std_and_cov()
        alive = std > _DEAD
        corr = (cov / torch.outer(std, std).clamp_min(1e-24)).clamp(-1.0, 1.0)
        return corr * torch.outer(alive, alive)  # a constant channel correlates with nothing

    def strength(self) -> torch.Tensor:
        return self.abs_sum / self.n

    def scores(self, kind: str = "ccpcsa") -> torch.Tensor:
        return score_from_stats(kind, self.strength(), self.correlation(), self.alive())


def score_from_stats(kind: str, strength: torch.Tensor, corr: torch.Tensor,
                     alive: torch.Tensor) -> torch.Tensor:
    """A data-driven score from a group's strength, correlation matrix and live channels."""
    a = strength.double() / strength.max().clamp_min(1e-12)
    off = corr.abs().double().fill_diagonal_(0.0)
    channels = corr.shape[0]
    if kind == "ccpcsa":
        score = a * (1.0 - off.sum(1) / max(channels - 1, 1))
    elif kind == "maxcorr":
        score = a * (1.0 - (off.max(1).values if channels > 1 else torch.zeros_like(a)))
    elif kind == "dedup":
        score = a * (1.0 - duplicates(a, off, dedup_threshold(off)))
    elif kind in ("strength", "attention"):
        score = a
    else:
        raise ImportanceError(f"no correlation score named {kind!r}")
    return (score * alive).float()


def dedup_threshold(abs_corr: torch.Tensor) -> float:
    """|R| from which a pair of the group counts as near-duplicate (see DEDUP_QUANTILE)."""
    if abs_corr.shape[0] < 2:
        return 1.0
    closest = abs_corr.max(1).values
    return max(DEDUP_FLOOR, float(closest.quantile(DEDUP_QUANTILE)))


def duplicates(strength: torch.Tensor, abs_corr: torch.Tensor, threshold: float
               ) -> torch.Tensor:
    """Per channel, |R| with the partner it duplicates (0 if none): the most correlated pairs
    at or above `threshold` first, the weaker channel of each pair is the duplicate; a channel
    already marked no longer pairs (its partner stays)."""
    found = torch.zeros_like(strength, dtype=torch.float64)
    i, j = torch.triu(abs_corr >= threshold, diagonal=1).nonzero(as_tuple=True)
    marked: set[int] = set()
    for k in torch.argsort(abs_corr[i, j], descending=True, stable=True).tolist():
        a, b = int(i[k]), int(j[k])
        if a in marked or b in marked:
            continue
        weaker = a if strength[a] < strength[b] else b
        marked.add(weaker)
        found[weaker] = abs_corr[a, b]
    return found


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """N x C x ... -> C x (N * ...)."""
    return x.detach().transpose(0, 1).reshape(x.shape[1], -1)


def correlation_scores(x: torch.Tensor, kind: str = "ccpcsa") -> torch.Tensor:
    """One-shot scores of activations N x C x H x W (the reference for the streaming)."""
    flat = channels_first(x).double()
    alive = flat.std(1) > _DEAD
    corr = torch.corrcoef(flat).nan_to_num(0.0) * torch.outer(alive, alive)
    return score_from_stats(kind, flat.abs().mean(1), corr, alive)


class MeanStats:
    """Streaming per-channel mean of a non-negative map (BAM's attention)."""

    def __init__(self, channels: int | None = None, device: torch.device | str = "cpu") -> None:
        self.total: torch.Tensor | None = None
        if channels is not None:
            self.total = torch.zeros(channels, dtype=torch.float64, device=device)
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        flat = channels_first(x).double()
        self.total = flat.sum(1) if self.total is None else self.total + flat.sum(1)
        self.n += flat.shape[1]

    def mean(self) -> torch.Tensor:
        return self.total / max(self.n, 1)


def merge_over_workers(stats: list[CorrelationStats], means: list[MeanStats], reduce: Reduce
                       ) -> None:
    """Sum every worker's statistics (each accumulated on its own share of the calibration
    images) so that every worker holds the totals of all samples: two collective calls. The
    correlation sums are first re-centred on a common shift (the sample-weighted mean of the
    workers' shifts), since each worker's d = x - shift used its own first batch."""
    if any(s.shift is None for s in stats) or any(m.total is None for m in means):
        raise ImportanceError("merging statistics needs their channel counts up front")
    counts = [torch.tensor([float(s.n)], dtype=torch.float64, device=s.shift.device)
              for s in stats]
    weighted = [s.shift * c for s, c in zip(stats, counts, strict=True)]
    mean_counts = [torch.tensor([float(m.n)], dtype=torch.float64, device=m.total.device)
                   for m in means]
    reduce([*counts, *weighted, *(m.total for m in means), *mean_counts])
    for s, c, w in zip(stats, counts, weighted, strict=True):
        s.recentre(w / c.clamp_min(1.0))
    reduce([t for s in stats for t in (s.sum_d, s.outer, s.abs_sum)])
    for s, c in zip(stats, counts, strict=True):
        s.n = int(round(float(c)))
    for m, c in zip(means, mean_counts, strict=True):
        m.n = int(round(float(c)))


def compute_scores(
    kind: str,
    model: nn.Module,
    groups: list[ChannelGroup],
    batches: Iterable = (),
    seed: int = 0,
    reduce: Reduce | None = None,
) -> dict[str, torch.Tensor]:
    """Per-group channel scores (higher = more important), one tensor of group.width each,
    normalised per group (see the module docstring). `batches` are (images, labels) pairs
    (bare image tensors do for every criterion but taylor), unaugmented training data, on the
    model's device. Data-parallel workers pass their own share of the batches and `reduce`
    (a sum over the workers): the statistics, or taylor's gradients, are summed before any
    score is computed, so every worker gets the scores of all the batches together."""
    if kind not in IMPORTANCES:
        raise ImportanceError(f"unknown importance {kind!r}; choose one of: "
                              f"{', '.join(IMPORTANCES)}")
    if kind in OBSERVED:
        raw = _observe(kind, model, groups, batches, reduce)
    else:
        raw = _torch_pruning(kind, model, groups, batches, seed, reduce)
    if kind == "lamp":
        return raw
    return {key: s / (s.abs().mean() + 1e-12) for key, s in raw.items()}


# ---------------------------------------------------------------- Torch-Pruning baselines


def _torch_pruning(kind: str, model: nn.Module, groups: list[ChannelGroup], batches: Iterable,
                   seed: int, reduce: Reduce | None) -> dict[str, torch.Tensor]:
    importance = TORCH_PRUNING[kind]()
    missing = [g.key for g in groups if g.pruning_group is None]
    if missing:
        raise ImportanceError(f"groups without a Torch-Pruning group: {', '.join(missing)} "
                              "(make them with prune.find_groups)")
    if kind == "taylor":
        _accumulate_gradients(model, batches, reduce)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # RandomImportance draws from torch's global generator
            scores = {g.key: importance(g.pruning_group) for g in groups}
    finally:
        if kind == "taylor":
            model.zero_grad(set_to_none=True)
    for key, s in scores.items():
        if s is None:
            raise ImportanceError(f"{kind} cannot score group {key}: it has no weights")
    return {key: s.detach().float().cpu() for key, s in scores.items()}


def _accumulate_gradients(model: nn.Module, batches: Iterable, reduce: Reduce | None) -> None:
    """dL/dw of the mean loss over every labelled calibration sample (all workers' together),
    in eval mode (BatchNorm running statistics are used and left alone)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    seen = torch.zeros(1, dtype=torch.float64, device=device)
    try:
        for batch in batches:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ImportanceError("taylor needs (images, labels) calibration batches")
            images, labels = batch[0].to(device), batch[1].to(device)
            loss = nn.functional.cross_entropy(model(images), labels, reduction="sum")
            loss.backward()
            seen += len(labels)
    finally:
        model.train(was_training)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if reduce is not None:
        reduce([*grads, seen])
    if float(seen) == 0:
        raise ImportanceError("taylor needs at least one calibration batch")
    for g in grads:
        g /= float(seen)


# ---------------------------------------------------------------- observed criteria


def observation_points(group: ChannelGroup) -> tuple[list[nn.Module], str]:
    """The modules whose input ("input") or, failing any, output ("output") shows the group's
    channels as the network reads them; see the module docstring."""
    if group.consumers:
        return [m for _, m in group.consumers], "input"
    return [m for _, m in (group.norms or group.producers)], "output"


def _observe(kind: str, model: nn.Module, groups: list[ChannelGroup], batches: Iterable,
             reduce: Reduce | None) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    stats = {g.key: CorrelationStats(g.width, device) for g in groups}
    attention = {g.key: MeanStats(g.width, device) for g in groups
                 if kind == "attention" and g.bams}
    seen_this_batch: list[torch.Tensor] = []  # kept alive so ids cannot be reused

    widths = {g.key: g.width for g in groups}

    def record(key: str, x: torch.Tensor) -> None:
        if any(x is t for t in seen_this_batch):
            return  # two consumers of one tensor (a conv and a downsample): count it once
        seen_this_batch.append(x)
        if x.dim() > 2 and x.shape[1] != widths[key] and x.shape[-1] == widths[key]:
            x = x.movedim(-1, 1)  # a channels-last layer (ConvNeXt's Linear and LayerNorm)
        stats[key].update(x)

    hooks = []
    for g in groups:
        modules, where = observation_points(g)
        for module in modules:
            if where == "input":
                hooks.append(module.register_forward_pre_hook(
                    lambda _m, inputs, key=g.key: record(key, inputs[0])))
            else:
                hooks.append(module.register_forward_hook(
                    lambda _m, _inputs, output, key=g.key: record(key, output)))
        if g.key in attention:
            for _name, bam in g.bams:
                hooks.append(bam.register_forward_hook(
                    lambda m, inputs, _out, key=g.key: attention[key].update(
                        m.attention(inputs[0]))))
    was_training = model.training
    precision = torch.get_float32_matmul_precision()
    seen = 0
    try:
        model.eval()
        torch.set_float32_matmul_precision("highest")  # no TF32 in the d d^T products
        with torch.no_grad():
            for batch in batches:
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                seen_this_batch.clear()
                model(images.to(device))
                seen += 1
    finally:
        torch.set_float32_matmul_precision(precision)
        seen_this_batch.clear()
        for h in hooks:
            h.remove()
        model.train(was_training)
    if reduce is not None:
        total = torch.tensor([float(seen)], dtype=torch.float64, device=device)
        reduce([total])
        seen = int(total)
    if seen == 0:
        raise ImportanceError("data-driven importance needs at least one calibration batch")
    if reduce is not None:
        merge_over_workers(list(stats.values()), list(attention.values()), reduce)
    scores = {}
    for key, s in stats.items():
        score = s.scores(kind).cpu()
        if key in attention:  # PCAS: the mean attention mask, where BAM applies
            score = attention[key].mean().float().cpu() * s.alive().cpu()
        scores[key] = score
    return scores
