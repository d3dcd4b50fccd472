"""Multi-teacher distillation (``multi_kd``: average, val_weighted, router), the ``static`` router, and the
batched training augmentations (``weak``, ``strong``) the engine applies to a stage's training batches."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import random_batch
from crossmodal_kd.data.augment import AugmentSet
from crossmodal_kd.config import ConfigError, validate_config
from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.models.io import save_model
from crossmodal_kd.registry import AUGMENTATIONS, METHODS, ROUTERS

SHAPES = {"image": (1, 12, 12), "audio": (1, 8, 8)}
CNN = {"name": "small_cnn", "params": {"channels": [4]}}
RAW = {
    "data": {"name": "synthetic"},
    "networks": {
        "student": {"name": "unimodal", "params": {"modality": "image", "encoder": CNN}},
        "audio_net": {"name": "unimodal", "params": {"modality": "audio", "encoder": CNN}},
    },
    "stages": [{"name": "t_image", "method": {"name": "supervised", "params": {"network": "student"}}},
               {"name": "t_audio", "method": {"name": "supervised", "params": {"network": "audio_net"}}}],
}


def make_batch(n: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_batch(SHAPES, n, seed)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> BuildContext:
    """Two trained-looking teachers: stage ``t_image`` (val acc 0.75, in its result.json) and a file ``audio.pt``
    beside a result.json giving it 0.25."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    context = BuildContext(validate_config(RAW), run, SHAPES, 4, make_batch(), where="test")
    for stage, net, acc in (("t_image", "student", 0.75), ("t_audio", "audio_net", 0.25)):
        folder = run / "stages" / stage
        save_model(context.network(net), folder / "models" / "model.pt")
        (folder / "result.json").write_text(json.dumps({"models": {"model": {"val": {"accuracy": acc}}}}))
    return context


def teachers(ctx, **extra):
    audio = str(ctx.run_dir / "stages" / "t_audio" / "models" / "model.pt")
    return [{"model": {"stage": "t_image"}}, {"model": {"path": audio}, "name": "audio", **extra}]


def build(ctx, **params):
    torch.manual_seed(0)
    params = {"student": "student", "teachers": teachers(ctx), **params}
    return METHODS.build("multi_kd", params, where="test", ctx=ctx)


def hand_loss(method, batch, weights, w_ce=0.6, tau=3.0):
    """sum_t w_t [w_ce CE + (1 - w_ce) tau^2 KL(p_t || p_s)], written out with softmaxes."""
    s = method.student(batch)["logits"]
    ce = F.cross_entropy(s, batch["label"])
    total = 0
    for w, t in zip(weights, method.teachers):
        p_t = F.softmax(t(batch)["logits"] / tau, 1)
        kl = (p_t * (p_t.log() - F.log_softmax(s / tau, 1))).sum(1).mean()
        total = total + w * (w_ce * ce + (1 - w_ce) * tau**2 * kl)
    return total


@pytest.mark.parametrize("combine,weights", [("average", [0.5, 0.5]), ("val_weighted", [0.75, 0.25])])
def test_loss_is_the_weighted_sum_of_per_teacher_losses(ctx, combine, weights):
    method = build(ctx, combine=combine)
    batch = make_batch()
    _, losses = method(batch)
    assert set(losses) == {"ce", "kd"}
    torch.testing.assert_close(sum(losses.values()), hand_loss(method, batch, weights))
    stats = method.summarize_stats(method.pop_stats())
    assert stats == pytest.approx({"weight/t_image": weights[0], "weight/audio": weights[1]})


def test_val_weights_come_from_result_json_unless_given(ctx):
    method = build(ctx, combine="val_weighted")
    assert method.val_accuracy == {"t_image": 0.75, "audio": 0.25}  # the audio file's accuracy: two folders up
    assert method.epoch_info() == {"val_accuracy/t_image": 0.75, "val_accuracy/audio": 0.25}
    given = build(ctx, combine="val_weighted", teachers=teachers(ctx, val_accuracy=0.75))
    torch.testing.assert_close(given.router.weights, torch.tensor([0.5, 0.5]))
    (ctx.run_dir / "lone").mkdir(exist_ok=True)
    save_model(ctx.network("student"), ctx.run_dir / "lone" / "x.pt")
    with pytest.raises(FileNotFoundError, match=r"val_weighted' needs the teacher's validation accuracy, but no result.json .*; give val_accuracy"):
        build(ctx, combine="val_weighted", teachers=[{"model": {"path": str(ctx.run_dir / "lone" / "x.pt")}}])


def test_w_ce_and_tau_are_the_papers_by_default(ctx):
    method = build(ctx)
    assert (method.w_ce, method.tau) == (0.6, 3.0)  # the paper's alpha = 0.6
    batch = make_batch()
    torch.testing.assert_close(sum(method(batch)[1].values()), hand_loss(method, batch, [0.5, 0.5], 0.6, 3.0))


def test_router_combination_trains_a_gate_with_load_balancing(ctx):
    method = build(ctx, combine="router", router={"name": "gate", "params": {"k": 1, "mode": "hard", "objective": "true_class"}})
    batch = make_batch()
    _, losses = method(batch)
    assert set(losses) == {"ce", "kd", "load_balance", "route"}
    assert method.parameter_counts()["router"] > 0
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    before = [p.clone() for p in method.router.parameters()]
    sum(losses.values()).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, method.router.parameters()))
    assert not any(p.requires_grad for t in method.teachers for p in t.module.parameters())


def test_multi_kd_errors_name_the_key(ctx):
    with pytest.raises(ConfigError, match="test.combine: unknown 'vote'; valid: average, val_weighted, router"):
        build(ctx, combine="vote")
    with pytest.raises(ConfigError, match="test.router: only used with combine: router"):
        build(ctx, router={"name": "gate"})
    with pytest.raises(ConfigError, match="test.router: combine 'router' needs router"):
        build(ctx, combine="router")
    with pytest.raises(ConfigError, match=r"test.teachers.0: expected \{model"):
        build(ctx, teachers=[{"stage": "t_image"}])
    with pytest.raises(ConfigError, match="duplicate teacher name 't_image'"):
        build(ctx, teachers=[{"model": {"stage": "t_image"}}, {"model": {"stage": "t_image"}}])
    with pytest.raises(ConfigError, match="test.teachers: at least one teacher"):
        build(ctx, teachers=[])
    with pytest.raises(ConfigError, match=r"^test\.alpha: renamed to w_ce$"):
        build(ctx, alpha=0.6)
    with pytest.raises(ConfigError, match=r"^test\.w_ce: Input should be less than or equal to 1 \(got 1\.5\)$"):
        build(ctx, w_ce=1.5)


def test_static_router_normalises_its_weights():
    router = ROUTERS.build("static", {"weights": [3, 1]}, num_teachers=2)
    torch.testing.assert_close(router(None, torch.zeros(5, 2, 4)).weights, torch.tensor([[0.75, 0.25]] * 5))
    with pytest.raises(ValueError, match="router 'static': weights must be 2 non-negative values"):
        ROUTERS.build("static", {"weights": [1, -1]}, num_teachers=2)


# ----------------------------------------------------------------------------- augmentations


def test_weak_shifts_each_image_by_at_most_shift_pixels_and_flips_on_request():
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0
    y = AUGMENTATIONS.build("weak", {"shift": 2})(x)
    pos = torch.stack([(img[0] == 1).nonzero()[0] for img in y])
    assert ((pos - 4).abs() <= 2).all() and len({tuple(p.tolist()) for p in pos}) > 5  # per-sample shifts
    assert torch.equal(AUGMENTATIONS.build("weak", {"shift": 0})(x), x)
    ramp = torch.arange(16.0).view(1, 1, 4, 4).repeat(3, 1, 1, 1)
    assert torch.equal(AUGMENTATIONS.build("weak", {"shift": 0, "flip": 1.0})(ramp), ramp.flip(-1))


def test_strong_keeps_shape_and_dtype_and_is_seeded():
    x = torch.randn(8, 1, 28, 28)
    aug = AUGMENTATIONS.build("strong", {})
    torch.manual_seed(1)
    a = aug(x)
    torch.manual_seed(1)
    assert torch.equal(aug(x), a) and a.shape == x.shape and a.dtype == x.dtype
    assert not torch.allclose(a, x)
    identity = {"degrees": 0, "scale": 0, "shear": 0, "translate": 0, "noise": 0, "cutout": 0}
    torch.testing.assert_close(AUGMENTATIONS.build("strong", identity)(x), x)  # the affine sampling is exact


def test_augment_set_errors_name_the_key():
    with pytest.raises(ConfigError, match="test.augment.depth: no such modality"):
        AugmentSet({"depth": {"name": "weak"}}, {"image": (1, 8, 8)}, where="test.augment")
    with pytest.raises(ConfigError, match=r"test.augment.text: augmentations transform images"):
        AugmentSet({"text": {"name": "weak"}}, {"text": (16,)}, where="test.augment")
    with pytest.raises(KeyError, match="unknown augmentation 'blur'; valid: none, strong, weak"):
        AugmentSet({"image": {"name": "blur"}}, {"image": (1, 8, 8)}, where="test.augment")
    with pytest.raises(TypeError, match=r"test.augment.image.params: unknown parameter\(s\) sigma"):
        AugmentSet({"image": {"name": "weak", "params": {"sigma": 1}}}, {"image": (1, 8, 8)}, where="test.augment")


def test_the_engine_augments_training_batches_only(tmp_path, monkeypatch):
    """``stages[i].augment`` is applied by the engine to training batches (any method), never to evaluation
    batches, and a stage that augments serves no stored teacher targets (the teacher's input changes)."""
    from conftest import run_config, tiny_config

    from crossmodal_kd.engine.trainer import StageTrainer

    seen: list[tuple[str, bool, torch.Tensor]] = []
    original = AugmentSet.__call__

    def spy(self, batch):
        out = original(self, batch)
        if self.transforms:
            seen.append(("call", True, out["image"]))
        return out

    monkeypatch.setattr(AugmentSet, "__call__", spy)
    build = StageTrainer._build

    def _build(self, build_targets=True):
        build(self, build_targets)
        if self.stage.name == "teacher":
            return
        net = self.core.models()["model" if "model" in self.core.models() else "student"]
        net.encoder.register_forward_hook(lambda mod, args, out: seen.append(("encoder", mod.training, args[0].clone())))

    monkeypatch.setattr(StageTrainer, "_build", _build)
    raw = tiny_config()
    raw["stages"][1]["augment"] = {"image": {"name": "strong"}}
    raw["stages"][2]["augment"] = {"image": {"name": "weak", "params": {"shift": 1}}}
    metrics = run_config(raw, tmp_path / "run", fast_dev_run=True)
    calls = [t for kind, _, t in seen if kind == "call"]
    trained = [t for kind, training, t in seen if kind == "encoder" and training]
    evaluated = [t for kind, training, t in seen if kind == "encoder" and not training]
    assert calls and len(calls) == len(trained)
    assert all(torch.equal(c, t) for c, t in zip(calls, trained))  # the model trains on the augmented batch
    assert evaluated and not any(any(torch.equal(e, c) for c in calls) for e in evaluated)
    assert metrics["stages"]["kd"]["targets"]["teacher"].startswith("the stage augments its training batches")
    raw["stages"][1]["method"]["params"]["augment"] = {"image": {"name": "weak"}}
    with pytest.raises(ConfigError, match=r"stages\[1\]\.method\.params\.augment: renamed to the stage key stages\[i\]\.augment"):
        run_config(raw, tmp_path / "old")
    raw["stages"][1]["method"]["params"].pop("augment")
    raw["stages"][1]["augment"] = {"image": {"name": "blur"}}
    with pytest.raises(ConfigError, match=r"stages\[1\]\.augment\.image.*unknown augmentation 'blur'"):
        run_config(raw, tmp_path / "bad")

