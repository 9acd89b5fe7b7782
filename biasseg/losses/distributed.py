"""Sums across DDP processes that keep their gradient (for batch Dice over the global batch)."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _SumAcrossProcesses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every process's loss depends on the pooled sum, so this process's share receives
        # the gradients of all of them; DDP then averages over processes, which gives exactly
        # the gradient of one process holding the whole batch (nnU-Net's AllGatherGrad).
        total = grad.clone()
        dist.all_reduce(total)
        return total


def sum_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """``Σ`` of ``tensor`` over all processes, differentiable; the tensor itself without DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _SumAcrossProcesses.apply(tensor)
