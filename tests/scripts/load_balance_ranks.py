"""Run under ``accelerate launch``: the router's load-balancing term on a global batch split unevenly across ranks.

Every rank writes ``OUT/rank<r>.json`` with the term's value, the global mean gate and the router's
gradient averaged over ranks (what DDP applies), to compare with one process on the whole batch.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState

from crossmodal_kd.methods.collectives import global_mean
from crossmodal_kd.losses import load_balance_kl

TOTAL, SPLIT = 7, 4  # rank 0 gets rows 0..3, rank 1 rows 4..6 (uneven local batches)


def problem() -> tuple[torch.Tensor, torch.nn.Linear]:
    """The fixed global batch of features and router, the same in every process."""
    torch.manual_seed(0)
    return torch.randn(TOTAL, 5), torch.nn.Linear(5, 4)


def load_balance(x: torch.Tensor, router: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    mean_gate = global_mean(router(x).softmax(-1))
    return load_balance_kl(mean_gate), mean_gate


if __name__ == "__main__":
    state = PartialState(cpu=True)
    assert state.num_processes == 2, state.num_processes
    x, router = problem()
    rows = x[:SPLIT] if state.process_index == 0 else x[SPLIT:]
    value, mean_gate = load_balance(rows, router)
    value.backward()
    grad = router.weight.grad.clone()
    dist.all_reduce(grad)
    grad /= state.num_processes
    out = {"value": value.item(), "mean_gate": mean_gate.tolist(), "grad": grad.tolist()}
    Path(sys.argv[1], f"rank{state.process_index}.json").write_text(json.dumps(out))
    state.wait_for_everyone()
    # Leave without tearing gloo down: destroying the group (or leaving it to interpreter exit) races
    # with the other rank's exit under load and can abort with "terminate called without an active
    # exception". The result file is written and every rank has passed the barrier.
    os._exit(0)
