"""Hard faults: a training process killed with SIGKILL resumes to the same result as an uninterrupted run;
the router's global-batch load-balancing term is the same on 2 processes as on 1."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (
    CPU_ENV,
    REPO,
    accelerate_launch,
    assert_same_weights,
    read_json,
    stable_metrics,
    tiny_config,
    write_yaml,
)
from crossmodal_kd.engine.report import read_jsonl

pytestmark = pytest.mark.slow

CLI = Path(sys.executable).with_name("crossmodal-kd")
KILLED_STAGE = "baseline"


def cli_run(config: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [str(CLI)] if CLI.exists() else [sys.executable, "-m", "crossmodal_kd.cli"]
    cmd += ["run", str(config), "--output-dir", str(out), "--no-progress", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **CPU_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> None:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output[-4000:]}"


def killed_mid_stage(config: Path, out: Path, stage: str, timeout: float = 300) -> None:
    """Start a run and SIGKILL it as soon as ``stage`` has a complete epoch checkpoint."""
    proc = cli_run(config, out)
    deadline = time.monotonic() + timeout
    try:
        while not list((out / "stages" / stage / "checkpoints").glob("epoch_*/manifest.json")):
            if proc.poll() is not None:
                pytest.fail(f"run ended (exit {proc.returncode}) before stage {stage} saved a checkpoint:\n{proc.stdout.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint of stage {stage} after {timeout}s")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_mid_stage_then_resume_equals_an_uninterrupted_run(tmp_path):
    raw = tiny_config(n_train=512)  # 32 steps per epoch: the kill lands while the stage still has epochs to go
    raw["stages"][1]["epochs"] = 8
    config = write_yaml(tmp_path / "faults.yaml", raw)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    finish(cli_run(config, reference))

    killed_mid_stage(config, resumed, KILLED_STAGE)
    assert not (resumed / "stages" / KILLED_STAGE / "result.json").exists(), "the stage finished before the kill"
    assert not (resumed / "metrics.json").exists() or KILLED_STAGE not in read_json(resumed / "metrics.json")["stages"]
    finish(cli_run(config, resumed, "--resume"))

    assert stable_metrics(read_json(resumed / "metrics.json")) == stable_metrics(read_json(reference / "metrics.json"))
    models = sorted(p.relative_to(reference) for p in reference.glob("stages/*/models/*.pt"))
    assert models == sorted(p.relative_to(resumed) for p in resumed.glob("stages/*/models/*.pt"))
    assert len(models) == 3
    for rel in models:
        assert_same_weights(reference / rel, resumed / rel)
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert drop_time(read_jsonl(resumed / "log.jsonl")) == drop_time(read_jsonl(reference / "log.jsonl"))


def _ranks_script():
    path = REPO / "tests" / "scripts" / "load_balance_ranks.py"
    spec = importlib.util.spec_from_file_location("load_balance_ranks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def test_global_batch_load_balance_on_two_processes_equals_one_process(tmp_path):
    """Uneven local batches (4 + 3 rows): value, global mean gate and DDP-averaged gradient match one process."""
    script, ranks = _ranks_script()
    accelerate_launch(["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                       "--dynamo_backend", "no"], [str(script), str(tmp_path)])
    x, router = ranks.problem()
    value, mean_gate = ranks.load_balance(x, router)  # one process: the whole batch
    value.backward()
    for rank in (0, 1):
        got = read_json(tmp_path / f"rank{rank}.json")
        assert got["value"] == pytest.approx(value.item(), rel=1e-5, abs=1e-7)
        torch.testing.assert_close(torch.tensor(got["mean_gate"]), mean_gate.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.tensor(got["grad"]), router.weight.grad, rtol=1e-4, atol=1e-7)
    assert value.item() > 1e-4  # a non-trivial (non-uniform) gate, so the comparison means something
