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
