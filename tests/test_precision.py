"""Mixed precision: bf16 autocast on CPU trains the MST-Distill and KD pipelines with finite losses,
losses are computed in fp32, and fp16 on CPU (which Accelerate would silently run in fp32) is refused."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TEST_CONFIGS, read_json
from crossmodal_kd.config import ConfigError, load_config
from crossmodal_kd.engine.report import read_jsonl
from crossmodal_kd.engine.trainer import Runner, StageTrainer, make_accelerator
from crossmodal_kd.losses import cross_entropy, kd_kl, load_balance_kl

BF16 = ["accelerator.mixed_precision=bf16", "accelerator.cpu=true"]


def test_losses_on_bf16_inputs_are_fp32_and_match_fp32():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
    labels = torch.randint(10, (16,), generator=g)
    gate = torch.softmax(torch.randn(16, 4, generator=g), -1).mean(0)
    cases = [
        (lambda a, b: kd_kl(a, b, 4.0), (s, t)),
        (lambda a, b: kd_kl(a, b, 1.0, reduction="none"), (s, t)),
        (lambda a: cross_entropy(a, labels), (s,)),
        (load_balance_kl, (gate,)),
    ]
    for fn, inputs in cases:
        low = fn(*(x.bfloat16() for x in inputs))
        assert low.dtype == torch.float32
        # the only error left is bf16's rounding of the inputs (8 bits of mantissa)
        ref = fn(*(x.bfloat16().float() for x in inputs))
        torch.testing.assert_close(low, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(low, fn(*inputs), rtol=2e-2, atol=2e-2)


@pytest.fixture
def autocast_probe(monkeypatch):
    """Records the dtypes of every stage's layer outputs (autocast really on) and of its loss terms."""
    seen: dict[str, dict[str, set]] = {}
    build, check = StageTrainer._build, StageTrainer._check_finite

    def _build(self):
        build(self)
        record = seen.setdefault(self.stage.name, {"activations": set(), "losses": set()})
        for module in self.core.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.register_forward_hook(lambda m, i, o: record["activations"].add(o.dtype) if m.training else None)

    def _check_finite(self, loss, losses, epoch, step):
        seen[self.stage.name]["losses"].update(v.dtype for v in [loss, *losses.values()])
        return check(self, loss, losses, epoch, step)

    monkeypatch.setattr(StageTrainer, "_build", _build)
    monkeypatch.setattr(StageTrainer, "_check_finite", _check_finite)
    return seen


def assert_finite_run(run_dir, metrics, stages):
    assert read_json(run_dir / "environment.json")["mixed_precision"] == "bf16"
    assert list(metrics["stages"]) == stages
    for stage, result in metrics["stages"].items():
        rows = read_jsonl(run_dir / "stages" / stage / "log.jsonl")
        assert rows
        for row in rows:
            bad = {k: v for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
            assert not bad, f"{stage} epoch {row['epoch']}: non-finite {bad}"
            assert any(k.startswith("train/") for k in row)
        for model in result["models"].values():
            for split in ("val", "test"):
                assert math.isfinite(model[split]["accuracy"]) and math.isfinite(model[split]["macro_f1"])


@pytest.mark.parametrize(
    ("config", "stages"),
    [
        ("synthetic_mst.yaml", ["collab", "mask_mm_1", "mask_cm_1", "routed"]),
        ("synthetic_kd.yaml", ["teacher_mm", "student_only", "kd_mm"]),
    ],
)
def test_bf16_on_cpu_trains_with_finite_losses_and_metrics(tmp_path, autocast_probe, config, stages):
    cfg = load_config(TEST_CONFIGS / config, [*BF16, *(f"stages.{s}.epochs=1" for s in stages)])
    metrics = Runner(cfg, tmp_path / "run", progress=False).run()
    assert_finite_run(tmp_path / "run", metrics, stages)
    for stage in stages:
        assert torch.bfloat16 in autocast_probe[stage]["activations"], f"{stage}: autocast was not active"
        assert autocast_probe[stage]["losses"] == {torch.float32}, stage


def test_fp16_on_cpu_is_refused_with_a_clear_error():
    cfg = load_config(TEST_CONFIGS / "synthetic_kd.yaml", ["accelerator.mixed_precision=fp16", "accelerator.cpu=true"])
    with pytest.raises(ConfigError, match=r"mixed_precision=fp16 needs a GPU.*bf16"):
        make_accelerator(cfg)


def test_channels_last_trains_the_same_model_in_nhwc(tmp_path, monkeypatch):
    """accelerator.channels_last: every 4-D weight of the trained (and frozen, masked) networks is NHWC during
    training, and MST-Distill's three stages reach the same losses as the default layout (float rounding aside)."""
    layouts = []
    build = StageTrainer._build

    def _build(self, *args, **kwargs):
        build(self, *args, **kwargs)
        modules = [self.core, *self.core.frozen_modules().values()]
        weights = [p for m in modules for p in m.parameters() if p.dim() == 4]
        layouts.append((all(p.is_contiguous() for p in weights), all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)))

    monkeypatch.setattr(StageTrainer, "_build", _build)
    losses = {}
    for layout in ("false", "true"):
        cfg = load_config(TEST_CONFIGS / "synthetic_mst.yaml", [f"accelerator.channels_last={layout}", "accelerator.cpu=true"])
        Runner(cfg, tmp_path / layout, progress=False).run()
        losses[layout] = [r["train/loss"] for r in read_jsonl(tmp_path / layout / "log.jsonl") if "train/loss" in r]
    half = len(layouts) // 2
    assert all(cl for _, cl in layouts[half:]) and all(contiguous for contiguous, _ in layouts[:half])
    assert not any(contiguous for contiguous, _ in layouts[half:])  # 3x3 convs over several channels: a real change
    assert len(losses["true"]) == len(losses["false"]) > 4
    torch.testing.assert_close(torch.tensor(losses["true"]), torch.tensor(losses["false"]), rtol=1e-3, atol=1e-4)
