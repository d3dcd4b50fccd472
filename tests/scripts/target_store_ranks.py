"""Run under ``accelerate launch`` with 2 processes: the target store is built once, by the main process.

Every rank attaches a table for the same frozen teacher and data, then writes ``OUT/rank<r>.json``: how
many teacher forwards it ran, a sha256 of the training table it serves, and whether it is complete.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from crossmodal_kd.config import validate_config
from crossmodal_kd.data.base import ArrayDataset, DataSplits
from crossmodal_kd.engine.targets import attach_targets
from crossmodal_kd.engine.trainer import make_accelerator
from crossmodal_kd.targets import TeacherCall

N, CLASSES = 40, 3


class CountingTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, CLASSES)
        self.forwards = 0

    def forward(self, batch):
        self.forwards += 1
        return {"logits": self.fc(batch["x"])}


def splits() -> DataSplits:
    g = torch.Generator().manual_seed(1)
    part = lambda n: ArrayDataset({"x": torch.randn(n, 6, generator=g)}, torch.arange(n) % CLASSES)  # noqa: E731
    return DataSplits(train=part(N), val=part(8), test=part(8), num_classes=CLASSES, class_names=["a", "b", "c"])


if __name__ == "__main__":
    cfg = validate_config({"data": {"name": "synthetic", "eval_batch_size": 16}, "accelerator": {"cpu": True},
                           "stages": [{"name": "s", "method": {"name": "supervised", "params": {"network": "n"}}}]})
    acc = make_accelerator(cfg)
    assert acc.num_processes == 2, acc.num_processes
    teacher = CountingTeacher().eval()
    call = TeacherCall("teacher", teacher, [teacher])
    info = attach_targets(acc, {"teacher": call}, cfg, splits(), lambda b: b, Path(sys.argv[1]), stage="s", progress=False)
    table = call.tables["train"]
    digest = hashlib.sha256(table.tensors["logits"].cpu().numpy().tobytes()).hexdigest()
    out = {"forwards": teacher.forwards, "sha256": digest, "complete": table.complete, "served": info["calls"]["teacher"]}
    Path(sys.argv[1], f"rank{acc.process_index}.json").write_text(json.dumps(out))
    acc.wait_for_everyone()
    os._exit(0)  # no gloo teardown (see load_balance_ranks.py)
