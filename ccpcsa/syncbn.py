"""BatchNorm over the global batch of all data-parallel workers, on any device and backend.

torch's SyncBatchNorm runs on GPUs only; this one reduces the per-channel sums with a
differentiable all-reduce (gloo or NCCL), so N CPU workers with batch B/N normalise exactly like
one process with batch B. The state dict is that of the BatchNorm it replaces.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _SumOverWorkers(torch.autograd.Function):
    """all_reduce(sum) whose gradient is the all_reduce(sum) of the incoming gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CrossWorkerBatchNorm(_BatchNorm):
    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        count = x.new_tensor([x.numel() // channels], dtype=torch.float32)
        local = torch.cat([x.float().sum(dims), x.float().square().sum(dims), count])
        total = _SumOverWorkers.apply(local)
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels:2 * channels] / n - mean.square()).clamp_min(0)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * n / (n - 1).clamp_min(1))
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked += 1
        momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                    else self.momentum)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), momentum)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm (1d/2d) under `module` by CrossWorkerBatchNorm, sharing its
    parameters and buffers."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, CrossWorkerBatchNorm):
        out = CrossWorkerBatchNorm(module.num_features, module.eps, module.momentum,
                                   module.affine, module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_batchnorm(child))
    return out
