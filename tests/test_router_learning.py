"""MST-Distill's router learns (Li et al., MST-Distill, ACM MM 2025; public code Gray-OREO/MST-Distill):
gate gradients, learning an instance-dependent teacher choice, load balancing, the public-code parity
options (schedules, load-balance scaling, MaskNet, cumulative mask hooks) and routing in result.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from crossmodal_kd.config import load_config
from crossmodal_kd.engine.trainer import Runner
from crossmodal_kd.losses import kd_kl, load_balance_kl
from crossmodal_kd.models.masks import OfficialMask, attached, layer_output_shape
from crossmodal_kd.methods.mst_distill import schedule_factor
from crossmodal_kd.models.routers import GateRouter

CONFIGS = Path(__file__).parent / "configs"
E, C = 4, 10


def routing_task(n: int, seed: int):
    """Instances in E clusters that the student's logits reveal; per instance, teacher ``cluster`` is right
    about the label, teacher ``cluster + 1`` only echoes the student, the others are noise."""
    g = torch.Generator().manual_seed(seed)
    cluster = torch.randint(0, E, (n,), generator=g)
    labels = torch.randint(0, C, (n,), generator=g)
    student = torch.randn(n, C, generator=g) + 4.0 * F.one_hot(cluster, C)
    teachers = torch.randn(n, E, C, generator=g)
    rows = torch.arange(n)
    teachers[rows, cluster] = 6.0 * F.one_hot(labels, C).float()
    teachers[rows, (cluster + 1) % E] = student
    return student, teachers, labels, cluster


def per_teacher_kd(student: torch.Tensor, teachers: torch.Tensor) -> torch.Tensor:
    return torch.stack([kd_kl(student, teachers[:, e], 4.0, reduction="none") for e in range(E)], dim=1)


def train_gate(router: GateRouter, steps: int = 100, w_lb: float = 0.5) -> GateRouter:
    """The stage-3 gate objective on a fixed student: KD term (when it reaches the gate), load balance on the
    batch mean, and the router's own loss."""
    student, teachers, labels, _ = routing_task(256, seed=0)
    kd = per_teacher_kd(student, teachers)
    opt = torch.optim.Adam(router.parameters(), lr=3e-2)
    for _ in range(steps):
        r = router({"logits": student}, teachers, {"label": labels})
        loss = w_lb * load_balance_kl(r.probs.mean(0)) + (r.weights * kd).sum(1).mean()
        if r.loss is not None:
            loss = loss + r.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return router


def held_out_routing(router: GateRouter, n: int = 1000, seed: int = 1):
    student, teachers, labels, cluster = routing_task(n, seed)
    with torch.no_grad():
        r = router({"logits": student}, teachers, {"label": labels})
    entropy = -(r.probs * r.probs.clamp_min(1e-12).log()).sum(1).mean().item()
    return r, entropy, cluster


# ----------------------------------------------------------------------------- gradients


def _gate_logit_grads(router: GateRouter, objective_loss) -> tuple[torch.Tensor, torch.Tensor]:
    """d loss / d gate logit of each instance's top-1 teacher, and the top-1 indices."""
    seen = {}

    def keep(_m, _i, out):
        out.retain_grad()
        seen["z"] = out

    router.net.register_forward_hook(keep)
    student, teachers, labels, _ = routing_task(64, seed=2)
    r = router({"logits": student}, teachers, {"label": labels})
    objective_loss(r, per_teacher_kd(student, teachers)).backward()
    top = r.probs.argmax(1)
    return seen["z"].grad.gather(1, top[:, None]).squeeze(1), top


@pytest.mark.parametrize(
    "params,loss",
    [
        ({"mode": "soft", "k": 2, "objective": "kd"}, lambda r, kd: (r.weights * kd).sum(1).mean()),
        ({"mode": "dense", "objective": "kd"}, lambda r, kd: (r.weights * kd).sum(1).mean()),
        ({"mode": "hard", "k": 1, "objective": "true_class"}, lambda r, kd: r.loss),
    ],
)
def test_gradient_on_the_selected_teacher_is_not_sign_fixed(params, loss):
    torch.manual_seed(0)
    grad, _ = _gate_logit_grads(GateRouter(E, C, 0, **params), loss)
    assert (grad > 1e-6).any() and (grad < -1e-6).any()  # some choices are reinforced, others discouraged


def test_hard_gate_gets_no_gradient_from_the_kd_term():
    r = GateRouter(E, C, 0, mode="hard", objective="kd")({"logits": torch.randn(3, C)}, torch.randn(3, E, C))
    assert not r.weights.requires_grad and r.loss is None


def test_true_class_weights_are_detached_from_the_gate():
    student, teachers, labels, _ = routing_task(8, seed=3)
    r = GateRouter(E, C, 0, mode="dense", objective="true_class")({"logits": student}, teachers, {"label": labels})
    assert not r.weights.requires_grad and r.loss.requires_grad  # the KD term cannot reward agreement


def test_soft_top1_is_refused_with_the_alternatives():
    with pytest.raises(ValueError, match="mode 'soft' with k=1 cannot learn.*mode 'hard'.*k >= 2.*'dense'"):
        GateRouter(E, C, 0, k=1, mode="soft")


def test_soft_top2_renormalises_with_full_gradient():
    router = GateRouter(E, 2, 0, k=2, mode="soft", objective="kd", detach_input=False)
    router.net = nn.Identity()  # gate logits = the input
    z = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log().requires_grad_()
    r = router({"logits": z}, torch.zeros(1, E, 2))
    assert torch.allclose(r.weights, torch.tensor([[0, 0, 3 / 7, 4 / 7]]), atol=1e-6)
    r.weights[0, 3].backward()  # w_3 = softmax(z_2, z_3)_3: d/dz_3 = w_3 (1 - w_3), d/dz_2 = -w_3 w_2
    assert torch.allclose(z.grad, torch.tensor([[0, 0, -12 / 49, 12 / 49]]), atol=1e-6)


# ----------------------------------------------------------------------------- learning


def test_true_class_gate_learns_the_instance_dependent_best_teacher():
    torch.manual_seed(0)
    router = train_gate(GateRouter(E, C, 0, mode="hard", k=1, objective="true_class"))
    r, entropy, cluster = held_out_routing(router)
    assert entropy < 0.5 * math.log(E)
    assert (r.top1 == cluster).float().mean().item() >= 0.9  # the teacher right about the label
    assert torch.allclose(r.probs.mean(0), torch.full((E,), 1 / E), atol=0.05)  # and balanced over the batch


def test_kd_objective_learns_but_prefers_the_teacher_that_agrees_with_the_student():
    torch.manual_seed(0)
    router = train_gate(GateRouter(E, C, 0, mode="dense", objective="kd"))
    r, entropy, cluster = held_out_routing(router)
    assert entropy < 0.5 * math.log(E)
    assert (r.top1 == (cluster + 1) % E).float().mean().item() >= 0.9  # the echo, not the informative teacher


def test_load_balance_moves_a_collapsed_gate_to_a_uniform_batch_mean():
    torch.manual_seed(0)
    router = GateRouter(E, C, 0, mode="hard", objective="kd")
    with torch.no_grad():
        router.net[2].bias.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))
    before = held_out_routing(router, 256, seed=0)[0].probs.mean(0)  # on the training batch
    router = train_gate(router, w_lb=1.0)  # hard + kd: load balance is the only gate signal
    after = held_out_routing(router, 256, seed=0)[0].probs.mean(0)
    assert before[0] > 0.8
    assert torch.allclose(after, torch.full((E,), 1 / E), atol=0.02)


def test_load_balance_batchmean_is_the_public_kldivloss_on_the_mean_gate():
    g = torch.tensor([0.4, 0.3, 0.2, 0.1])
    public = nn.KLDivLoss(reduction="batchmean")(g.log(), torch.full((4,), 0.25))
    assert load_balance_kl(g, "batchmean").item() == pytest.approx(public.item(), rel=1e-6)
    assert load_balance_kl(g).item() == pytest.approx(4 * public.item(), rel=1e-6)


def test_linear_undetached_gate_passes_the_load_balance_gradient_to_the_student():
    router = GateRouter(E, C, 0, mode="hard", objective="kd", hidden=2 * C, linear=True, detach_input=False)
    assert [type(m) for m in router.net] == [nn.Linear, nn.Identity, nn.Linear]
    logits = torch.randn(6, C, requires_grad=True)
    load_balance_kl(router({"logits": logits}, torch.randn(6, E, C)).probs.mean(0)).backward()
    assert logits.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("every,factor", [(30, 0.5), (10, 0.9)])
def test_include_epoch_0_matches_the_public_loop(every, factor):
    w, public = 1.0, []
    for epoch in range(100):  # main-MST-Distill.py: train with w, then `w *= factor if epoch % every == 0`
        public.append(w)
        w *= factor if epoch % every == 0 else 1
    ours = [schedule_factor(e, {"every": every, "factor": factor, "include_epoch_0": True}) for e in range(100)]
    assert ours == pytest.approx(public)
    assert ours[:2] == pytest.approx([1.0, factor])


def test_default_schedule_decays_from_epoch_every():
    assert [schedule_factor(e, {"every": 10, "factor": 0.9}) for e in (0, 9, 10, 20)] == pytest.approx([1, 1, 0.9, 0.81])


# ----------------------------------------------------------------------------- masks


def test_official_mask_has_the_public_masknet_size_and_gates_in_0_1():
    c, h = 12, 12 // (2 * 3) * 3  # public: hidden = C // (hidden_dim_factor * heads) * heads
    mask = OfficialMask(c)
    expected = (c * h * c + h * c) + (3 * h * h + 3 * h) + (h * h + h) + (h + 1)  # embed, MHA in/out, fc
    assert sum(p.numel() for p in mask.parameters()) == expected
    x = torch.randn(5, c)
    g = mask.gate(x)
    assert g.shape == (5, c) and ((g > 0) & (g < 1)).all()
    assert torch.allclose(mask(x), x * g)
    conv = OfficialMask(8, spatial=True)
    assert conv(torch.randn(2, 8, 6, 6)).shape == (2, 8, 6, 6)
    with pytest.raises(ValueError, match="token width 0"):
        OfficialMask(4, hidden_dim_factor=2, num_heads=3)


def test_input_hook_point_masks_what_the_layer_reads():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    half = nn.Module()
    half.forward = lambda t: 0.5 * t
    x = torch.randn(5, 4)
    with attached(net, "2:input", half):
        masked = net(x)
    assert torch.allclose(masked, net[2](0.5 * net[1](net[0](x))))
    assert layer_output_shape(net, "0:input", x) == (5, 4)
    with pytest.raises(KeyError, match="only suffix is ':input'"):
        layer_output_shape(net, "0:output", x)


# ----------------------------------------------------------------------------- pipeline


@pytest.mark.slow
def test_parity_options_run_and_routing_reaches_result_json(tmp_path):
    """Cumulative mask hooks, an official mask on the fusion input, batchmean load balance, the public
    schedule, a linear undetached gate and CE selection, end to end on the synthetic data."""
    from crossmodal_kd.methods.context import BuildContext
    from crossmodal_kd.methods.mst_distill import MSTDistill

    raw = yaml.safe_load((CONFIGS / "synthetic_mst.yaml").read_text())
    collab, mask_mm_1, mask_cm_1, routed = raw["stages"]
    mask_mm_2 = {**mask_mm_1, "name": "mask_mm_2", "method": {"name": "mask", "params": {
        **mask_mm_1["method"]["params"], "layer": "fusion.0:input", "mask": {"name": "official", "params": {"hidden_dim_factor": 4}}}}}
    for s in (collab, mask_mm_1, mask_mm_2, mask_cm_1, routed):
        s["epochs"] = 1
    routed["select"] = {"metric": "loss"}
    routed["method"]["params"].update(
        teachers=[{"mask_stage": "mask_mm_1"}, {"mask_stage": "mask_mm_2"}, {"mask_stage": "mask_cm_1"}],
        router={"name": "gate", "params": {"mode": "hard", "k": 1, "objective": "kd", "hidden": 8, "linear": True, "detach_input": False}},
        mask_hooks="parity", lb_reduction="batchmean", val_loss="ce", w_lb=1.0,
        schedules={"w_kd": {"every": 30, "factor": 0.5, "include_epoch_0": True}},
    )
    raw["stages"] = [collab, mask_mm_1, mask_mm_2, mask_cm_1, routed]
    (tmp_path / "parity.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "parity.yaml")
    metrics = Runner(cfg, tmp_path / "run", progress=False).run()

    routing = json.loads((tmp_path / "run/stages/routed/result.json").read_text())["routing"]
    assert routing["max_entropy"] == pytest.approx(math.log(3)) and len(routing["entropy"]) == 1
    assert sum(v[0] for v in routing["shares"].values()) == pytest.approx(1.0)
    assert metrics["stages"]["routed"]["routing"] == routing
    assert metrics["stages"]["routed"]["parameters"]["mask/mask_mm_2"] > metrics["stages"]["routed"]["parameters"]["mask/mask_mm_1"]

    batch = {"image": torch.randn(4, 1, 12, 12), "audio": torch.randn(4, 1, 16, 16), "label": torch.tensor([0, 1, 2, 3])}
    ctx = BuildContext(cfg, tmp_path / "run", {"image": (1, 12, 12), "audio": (1, 16, 16)}, 4, batch)
    method = MSTDistill(ctx, MSTDistill.Params(**cfg.stage("routed").method.params))
    second = method.teachers[1]
    assert [layer for layer, _ in second.hooks] == ["encoders.audio.blocks.1", "fusion.0:input"]  # cumulative
    with attached(second.network, "encoders.audio.blocks.1", second.hooks[0][1]), attached(second.network, "fusion.0:input", second.mask):
        both = second.network(batch)["logits"]
    assert torch.allclose(second(batch), both)
    method.eval()
    _, losses = method(batch)
    assert set(losses) == {"ce"}  # val_loss: ce selects on the student's cross-entropy
