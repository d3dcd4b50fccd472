"""Shared fixtures: tiny synthetic configs, isolated registries, Accelerate state reset between tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import crossmodal_kd
from crossmodal_kd.registry import ALL_REGISTRIES

crossmodal_kd.load_components()

REPO = Path(__file__).resolve().parents[1]
TEST_CONFIGS = REPO / "tests" / "configs"
AVDIGITS_ON_SYNTHETIC = [  # overrides: the avdigits networks on synthetic data of avdigits' shapes
    "data.name=synthetic",
    "data.params={n_train: 32, n_val: 16, n_test: 16, image_shape: [1, 28, 28], audio_shape: [1, 40, 51]}",
    "data.batch_size=16",
    "data.eval_batch_size=16",
    "accelerator.cpu=true",
]


def random_batch(shapes: dict[str, tuple[int, ...]], n: int, seed: int = 0, num_classes: int = 4) -> dict[str, torch.Tensor]:
    """A batch of ``n`` Gaussian inputs per modality, labels cycling over ``num_classes``, sample indices 0..n-1."""
    g = torch.Generator().manual_seed(seed)
    batch = {m: torch.randn(n, *s, generator=g) for m, s in shapes.items()}
    batch["label"] = torch.arange(n) % num_classes
    batch["index"] = torch.arange(n)
    return batch
ACCELERATE = Path(sys.executable).with_name("accelerate")
CPU_ENV = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(launcher_args: list[str], script: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``ACCELERATE_USE_CPU=1 accelerate launch LAUNCHER_ARGS --main_process_port FREE SCRIPT...`` in the
    repository; must succeed."""
    if not ACCELERATE.exists():
        pytest.skip("accelerate launcher not installed in this environment")
    cmd = [str(ACCELERATE), "launch", *launcher_args, "--main_process_port", str(free_port()), *script]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **CPU_ENV}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(autouse=True)
def _reset_accelerate_state():
    """Every test starts and ends without a live Accelerate singleton (state leaks across tests otherwise)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def clean_registries():
    """Whatever a test registers (test methods, plug-ins) is removed afterwards, plug-in modules included."""
    saved = {k: dict(r._items) for k, r in ALL_REGISTRIES.items()}
    modules = set(sys.modules)
    yield
    for k, r in ALL_REGISTRIES.items():
        r._items.clear()
        r._items.update(saved[k])
    for name in set(sys.modules) - modules:
        if name.startswith("crossmodal_kd_plugin_"):
            del sys.modules[name]


def small_cnn(channels=(4,)) -> dict[str, Any]:
    return {"name": "small_cnn", "params": {"channels": list(channels)}}


def tiny_config(**data_params: Any) -> dict[str, Any]:
    """A 3-stage teacher / baseline / KD run on tiny synthetic data (a few seconds per stage on CPU)."""
    params = {"n_train": 64, "n_val": 32, "n_test": 32, "image_shape": [1, 8, 8], "audio_shape": [1, 8, 8], **data_params}
    return {
        "seed": 0,
        "data": {"name": "synthetic", "root": "unused", "params": params, "batch_size": 16, "eval_batch_size": 32},
        # CPU even where a GPU exists: resume and selection tests compare exact numbers
        "accelerator": {"cpu": True},
        "networks": {
            "image_student": {"name": "unimodal", "params": {"modality": "image", "encoder": small_cnn()}},
            "fusion": {
                "name": "fusion",
                "params": {"encoders": {"image": small_cnn(), "audio": small_cnn()}, "hidden": 8, "dropout": 0.2},
            },
        },
        "stages": [
            {
                "name": "teacher",
                "method": {"name": "supervised", "params": {"network": "fusion"}},
                "epochs": 3,
                "optimizer": {"name": "adamw", "params": {"lr": 0.01}},
            },
            {
                "name": "baseline",
                "method": {"name": "supervised", "params": {"network": "image_student"}},
                "epochs": 2,
                "optimizer": {"name": "adamw", "params": {"lr": 0.03}},
            },
            {
                "name": "kd",
                "method": {"name": "kd", "params": {"student": "image_student", "teacher": {"stage": "teacher"}}},
                "epochs": 3,
                "optimizer": {"name": "adamw", "params": {"lr": 0.01}},
            },
        ],
    }


def one_stage_config(epochs: int = 3, **data_params: Any) -> dict[str, Any]:
    raw = tiny_config(**data_params)
    raw["stages"] = [dict(raw["stages"][1], epochs=epochs)]
    return raw


def write_yaml(path: Path, raw: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_config(raw: dict[str, Any], run_dir: Path, **kwargs: Any) -> dict[str, Any]:
    from crossmodal_kd.config import validate_config
    from crossmodal_kd.engine.trainer import Runner

    kwargs.setdefault("progress", False)
    return Runner(validate_config(raw), run_dir, **kwargs).run()


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = load_state_dict(a), load_state_dict(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{a} and {b} differ in {k}"


RESULT_VOLATILE = {"train_time_s", "train_samples_per_s", "peak_memory_mb", "target_build_s", "teacher_live_batches"}


def stable_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json without timings and memory, which legitimately differ between runs."""
    return {
        "stages": {
            s: {k: v for k, v in r.items() if k not in RESULT_VOLATILE} for s, r in metrics["stages"].items()
        }
    }
