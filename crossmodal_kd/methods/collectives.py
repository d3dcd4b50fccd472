"""Collectives that keep gradients: statistics over the global batch under DDP."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of ``x`` across all processes, differentiable w.r.t. the local part.

    Every process must call it with the same trailing shape (batches may differ in size).
    """
    if world_size() == 1:
        return x.mean(0)
    from torch.distributed.nn.functional import all_gather

    sizes = [torch.zeros((), device=x.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor(float(x.shape[0]), device=x.device))
    total = torch.stack(sizes).sum()
    local_sum = x.sum(0)
    return torch.stack(all_gather(local_sum)).sum(0) / total


def gather_cat(x: torch.Tensor) -> torch.Tensor:
    """``x`` from every process concatenated along dim 0 in rank order, without gradients; sizes may differ.

    Used to apply identical updates to state that must stay equal on every rank (memory banks).
    """
    if world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    padded = x.new_zeros((int(max(sizes).item()), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(size.item())] for part, size in zip(parts, sizes)])
