"""MST-Distill components: masks, routers, losses, stage 1 detaching, and the pipeline end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from crossmodal_kd.config import load_config
from crossmodal_kd.engine.trainer import Runner
from crossmodal_kd.losses import kd_kl, load_balance_kl
from crossmodal_kd.models.masks import ChannelGate, attached, layer_output_shape
from crossmodal_kd.models.routers import FixedRouter, GateRouter, UniformRouter

CONFIGS = Path(__file__).parent / "configs"


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, batch):
        return {"logits": self.head(self.mid(self.conv(batch["x"])))}


# ----------------------------------------------------------------------------- losses (hand-computed)


def test_kd_kl_matches_hand_computed_value():
    s = torch.tensor([[0.0, math.log(3.0)]])  # p_s = (1/4, 3/4) at tau=1
    t = torch.tensor([[0.0, 0.0]])  # p_t = (1/2, 1/2)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kd_kl(s, t, tau=1.0).item() == pytest.approx(expected, rel=1e-6)
    # tau scales logits by 1/tau and the loss by tau^2
    s2, t2 = s * 2.0, t * 2.0
    assert kd_kl(s2, t2, tau=2.0).item() == pytest.approx(4.0 * expected, rel=1e-6)


def test_load_balance_is_zero_for_uniform_and_hand_value_otherwise():
    assert load_balance_kl(torch.full((4,), 0.25)).item() == pytest.approx(0.0, abs=1e-7)
    g = torch.tensor([0.5, 0.25, 0.25])
    expected = sum((1 / 3) * math.log((1 / 3) / p) for p in g.tolist())
    assert load_balance_kl(g).item() == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- masks


def test_mask_changes_only_its_layer_and_only_while_active():
    torch.manual_seed(0)
    net = TwoLayer().eval()
    batch = {"x": torch.randn(5, 1, 6, 6)}
    mask = ChannelGate(channels=4, hidden=8)
    with torch.no_grad():
        mask.net[2].weight.normal_()  # a non-trivial gate
    seen = {}
    hooks = [getattr(net, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.clone())) for n in ("conv", "mid")]
    plain = net(batch)["logits"]
    plain_seen = dict(seen)
    with attached(net, "mid", mask):
        masked = net(batch)["logits"]
    masked_seen = dict(seen)
    after = net(batch)["logits"]
    for h in hooks:
        h.remove()
    # hooks registered before the mask see the pre-mask output: compare the layer *before* the mask
    assert torch.equal(plain_seen["conv"], masked_seen["conv"])  # upstream layer untouched
    assert not torch.allclose(plain, masked)  # the masked layer changes the teacher's prediction
    assert torch.equal(plain, after)  # and only while attached
    assert len(net.mid._forward_hooks) == 0


def test_mask_gates_conv_channels_and_linear_features():
    mask = ChannelGate(channels=3, hidden=4, init_bias=0.0)  # zero weights -> gate = sigmoid(0) = 0.5
    conv_out = torch.randn(2, 3, 5, 5)
    assert torch.allclose(mask(conv_out), 0.5 * conv_out)
    lin_out = torch.randn(2, 3)
    assert torch.allclose(mask(lin_out), 0.5 * lin_out)
    with pytest.raises(ValueError, match="3 channels"):
        mask(torch.randn(2, 5))


def test_mask_is_light_at_596_channels():
    params = sum(p.numel() for p in ChannelGate(channels=596, hidden=64).parameters())
    assert params == 2 * 596 * 64 + 64 + 596
    assert params < 1_000_000


def test_unknown_layer_lists_valid_layers_and_probe_reports_shape():
    net = TwoLayer()
    with pytest.raises(KeyError, match="layers: conv, mid"):
        with attached(net, "nope", nn.Identity()):
            pass
    assert layer_output_shape(net, "mid", {"x": torch.randn(2, 1, 6, 6)}) == (2, 4, 6, 6)


# ----------------------------------------------------------------------------- routers


def _student_out(b=6, c=5, d=7):
    torch.manual_seed(1)
    return {"logits": torch.randn(b, c), "features": torch.randn(b, d)}


@pytest.mark.parametrize("mode,k,expect_grad", [("dense", 1, True), ("soft", 2, True), ("hard", 1, False), ("hard", 2, False)])
def test_router_gradient_from_kd_term(mode, k, expect_grad):
    router = GateRouter(num_teachers=3, num_classes=5, feature_dim=7, k=k, mode=mode, objective="kd")
    out = _student_out()
    teacher_logits = torch.randn(6, 3, 5)
    routing = router(out, teacher_logits)
    per_teacher = torch.stack([kd_kl(out["logits"], teacher_logits[:, e], 4.0, "none") for e in range(3)], 1)
    kd = (routing.weights * per_teacher).sum(1).mean()
    router.zero_grad()
    if expect_grad:
        kd.backward()
        grads = [p.grad for p in router.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    else:
        assert not kd.requires_grad  # the KD term cannot reach the hard gate
        load_balance_kl(routing.probs.mean(0)).backward()  # it learns from load balancing only
        assert sum(p.grad.abs().sum() for p in router.parameters()) > 0


def test_topk_selection_on_hand_made_gate():
    router = GateRouter(num_teachers=4, num_classes=2, feature_dim=2, k=2, mode="soft", objective="kd", hidden=4)
    logits_to_probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.15, 0.05]])
    router.net = nn.Sequential(nn.Identity())  # gate logits = log-probs below
    out = {"logits": logits_to_probs.log(), "features": torch.zeros(2, 2)}
    r = router(out, torch.zeros(2, 4, 2))
    assert torch.allclose(r.probs, logits_to_probs, atol=1e-6)
    # soft: top-2 renormalised: row 0 -> teachers 3, 2 with 0.4/0.7, 0.3/0.7; row 1 -> teachers 0, 2
    expected = torch.tensor([[0, 0, 0.3 / 0.7, 0.4 / 0.7], [0.7 / 0.85, 0, 0.15 / 0.85, 0]])
    assert torch.allclose(r.weights, expected, atol=1e-6)
    assert r.top1.tolist() == [3, 0]
    router.mode = "hard"
    r = router(out, torch.zeros(2, 4, 2))
    assert torch.allclose(r.weights, torch.tensor([[0, 0, 0.5, 0.5], [0.5, 0, 0.5, 0]]))
    # load balance over this batch: mean gate = (0.4, 0.15, 0.225, 0.225)
    mean = logits_to_probs.mean(0)
    assert load_balance_kl(mean).item() == pytest.approx(sum(0.25 * math.log(0.25 / p) for p in mean.tolist()), rel=1e-6)


def test_degenerate_routers():
    t = torch.zeros(3, 4, 5)
    assert torch.allclose(UniformRouter(4)(None, t).weights, torch.full((3, 4), 0.25))
    w = FixedRouter(4, index=2)(None, t).weights
    assert w[:, 2].eq(1).all() and w.sum().item() == 3
    with pytest.raises(ValueError, match="k=5"):
        GateRouter(num_teachers=4, num_classes=5, feature_dim=3, k=5)


# ----------------------------------------------------------------------------- pipeline


def _run(tmp_path, name, overrides=(), resume=False):
    cfg = load_config(CONFIGS / "synthetic_mst.yaml", list(overrides))
    return Runner(cfg, tmp_path / name, resume=resume, progress=False).run()


def test_collaborative_detach_switch(tmp_path):
    from crossmodal_kd.methods.context import BuildContext
    from crossmodal_kd.methods.collaborative import Collaborative

    cfg = load_config(CONFIGS / "synthetic_mst.yaml")
    batch = {"image": torch.randn(4, 1, 12, 12), "audio": torch.randn(4, 1, 16, 16), "label": torch.tensor([0, 1, 2, 3])}
    ctx = BuildContext(cfg, tmp_path, {"image": (1, 12, 12), "audio": (1, 16, 16)}, 4, batch)
    for detach, expect in ((True, False), (False, True)):
        torch.manual_seed(0)
        m = Collaborative(ctx, Collaborative.Params(networks={"a": "student", "b": "crossmodal_teacher"}, detach_peers=detach))
        _, losses = m(batch)
        losses["kd/a"].backward()  # a's KD term: does it push b?
        b_grad = sum(p.grad.abs().sum() for p in m.nets["b"].parameters() if p.grad is not None)
        assert (float(b_grad) > 0) == expect


@pytest.mark.slow
def test_mst_pipeline_runs_and_logs_routing(tmp_path):
    metrics = _run(tmp_path, "run")
    routed = metrics["stages"]["routed"]
    assert set(routed["parameters"]) == {"student", "router", "mask/mask_mm_1", "mask/mask_cm_1"}
    assert routed["parameters"]["mask/mask_mm_1"] == 2 * 16 * 64 + 64 + 16  # channel_gate at 16 channels
    rows = [json.loads(l) for l in (tmp_path / "run/stages/routed/log.jsonl").read_text().splitlines()]
    for r in rows:
        shares = [v for k, v in r.items() if k.startswith("route/share/")]
        assert len(shares) == 2 and sum(shares) == pytest.approx(1.0)
        assert 0 <= r["route/entropy"] <= math.log(2) + 1e-6
    assert rows[1]["w_lb"] == pytest.approx(0.5 * 0.9)  # schedule: x0.9 every epoch in this config
    mask_result = json.loads((tmp_path / "run/stages/mask_mm_1/result.json").read_text())
    assert mask_result["selection"]["metric"] == "loss"
    assert (tmp_path / "run/stages/routed/curves.png").stat().st_size > 0


@pytest.mark.slow
def test_mst_pipeline_resumes_after_interrupted_stage(tmp_path):
    full = _run(tmp_path, "full")
    # interrupted: stages up to the masks finished, then the process died
    cfg = load_config(CONFIGS / "synthetic_mst.yaml")
    runner = Runner(cfg, tmp_path / "cut", progress=False)
    runner._prepare_run_dir()
    runner.data = runner._load_data()
    for i, stage in enumerate(cfg.stages[:3]):
        runner.run_stage(i, stage)
    collab_model = tmp_path / "cut/stages/collab/models/student.pt"
    mtime = collab_model.stat().st_mtime_ns
    resumed = _run(tmp_path, "cut", resume=True)
    assert collab_model.stat().st_mtime_ns == mtime  # finished stages are not retrained
    for stage in ("collab", "mask_mm_1", "routed"):
        for model, m in full["stages"][stage]["models"].items():
            assert resumed["stages"][stage]["models"][model]["test"] == m["test"]


@pytest.mark.slow
def test_no_mask_pool_and_hard_k2_ablation_configs_build(tmp_path):
    metrics = _run(tmp_path, "abl", [
        "stages.routed.method.params.teachers=[{model: {stage: collab, model: teacher_mm}}, {model: {stage: collab, model: teacher_cm}}]",
        "stages.routed.method.params.router={name: gate, params: {k: 2, mode: hard}}",
    ])
    assert set(metrics["stages"]["routed"]["parameters"]) == {"student", "router"}


def test_a_stage_trains_identically_in_any_config_that_contains_it(tmp_path):
    """Stage seeds depend on the run seed and the stage name, not on the stage's position."""
    from crossmodal_kd.models.io import load_model

    cfg_full = load_config(CONFIGS / "synthetic_kd.yaml")
    cfg_alone = load_config(CONFIGS / "synthetic_kd.yaml", ["stages=[{name: kd_mm, method: {name: kd, params: {student: image_student, teacher: {stage: teacher_mm}}}, epochs: 3}, {name: teacher_mm, method: {name: supervised, params: {network: fusion}}, epochs: 3}]"])
    Runner(cfg_full, tmp_path / "full", progress=False).run()
    runner = Runner(cfg_alone, tmp_path / "alone", progress=False)
    runner._prepare_run_dir()
    runner.data = runner._load_data()
    runner.run_stage(1, cfg_alone.stages[1])  # teacher_mm first run at position 1 instead of 0
    a = load_model(tmp_path / "full/stages/teacher_mm/models/model.pt").state_dict()
    b = load_model(tmp_path / "alone/stages/teacher_mm/models/model.pt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
