"""TMKD (Zhang et al., arXiv 2603.24208) fidelity: label-free evaluation of the text-guided teacher, the
student distilling the teacher as trained, the feature noise relative to the teacher's scale, the stronger
multi-view teacher, and the benchmark files (rows, seeds, the view sweep selected on validation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from test_tmkd import (  # noqa: F401  (fixtures: ctx, teacher_file, tiny_bert, fake_clip)
    CLASSES,
    HAND_BATCH,
    VIEWS,
    ctx,
    fake_clip,
    hand_weights,
    router,
    teacher_file,
    tiny_bert,
    tmkd,
)

from crossmodal_kd.bench import load_bench
from crossmodal_kd.config import load_config
from crossmodal_kd.data.avdigits import AVDigits
from crossmodal_kd.losses import perturbed_feature_mse
from crossmodal_kd.methods.tmkd import feature_noise_std
from crossmodal_kd.models.networks import build_network
from crossmodal_kd.registry import ENCODERS, METHODS

UNLABELLED = {k: v for k, v in HAND_BATCH.items() if k != "label"}
WRONG_LABELS = (torch.tensor([1, 0]), torch.tensor([7, -3]))  # flipped; out of range (an index error if read)

# ----------------------------------------------------------------------------- label-free evaluation


def test_eval_routing_never_reads_the_label_and_training_routing_does(fake_clip):
    r = router(fake_clip, temperature=0.1).eval()  # class_source: label (the paper's), eval_class_source: zero_shot
    expected = hand_weights(0.1, [0, 0])  # the backend's zero-shot guesses (sample 1 is a dog guessed as a cat)
    torch.testing.assert_close(r(None, None, UNLABELLED).weights, expected)
    for labels in WRONG_LABELS:
        assert torch.equal(r(None, None, {**UNLABELLED, "label": labels}).weights, r(None, None, HAND_BATCH).weights)
    r.train()
    torch.testing.assert_close(r(None, None, HAND_BATCH).weights, hand_weights(0.1, [0, 1]))  # training: the labels
    torch.testing.assert_close(r(None, None, {**UNLABELLED, "label": WRONG_LABELS[0]}).weights, hand_weights(0.1, [1, 0]))
    r.eval()
    with r.as_trained():  # the frozen teacher of the tmkd stage, on its labelled training split
        torch.testing.assert_close(r(None, None, HAND_BATCH).weights, hand_weights(0.1, [0, 1]))
    assert r.active_class_source == "zero_shot"
    labelled_eval = router(fake_clip, temperature=0.1, eval_class_source="label").eval()  # opt-in, optimistic
    torch.testing.assert_close(labelled_eval(None, None, HAND_BATCH).weights, hand_weights(0.1, [0, 1]))
    with pytest.raises(ValueError, match="eval_class_source: Input should be 'label' or 'zero_shot'"):
        router(fake_clip, eval_class_source="oracle")


def test_eval_outputs_of_a_multiview_teacher_ignore_wrong_labels(fake_clip):
    params = {"views": list(VIEWS), "encoder": {"name": "small_cnn", "params": {"channels": [2]}},
              "router": {"name": "text_guided", "params": {"backend": fake_clip, "class_names": CLASSES, "temperature": 0.1}}}
    net = build_network("multiview", params, {v: (1, 2, 2) for v in VIEWS}, 2).eval()
    reference = net(UNLABELLED)
    for labels in WRONG_LABELS:
        out = net({**UNLABELLED, "label": labels})
        for key in ("logits", "features", "view_weights"):
            assert torch.equal(out[key], reference[key]), key


def test_teacher_stage_selects_and_evaluates_without_labels(ctx):
    """What the engine evaluates (``predict`` in eval mode: selection on validation, test) is the same with
    the true labels, shuffled ones and none."""
    torch.manual_seed(0)
    method = METHODS.build("tmkd_teacher", {"network": "teacher"}, where="test", ctx=ctx).eval()
    batch = ctx.sample_batch
    reference = method.predict({k: v for k, v in batch.items() if k != "label"})["model"]
    for labels in ((batch["label"] + 1) % 4, torch.full_like(batch["label"], 99)):
        assert torch.equal(method.predict({**batch, "label": labels})["model"], reference)
    method.train()  # training reads them (class_source: label)
    assert not torch.equal(method.model({**batch, "label": (batch["label"] + 1) % 4})["view_weights"],
                           method.model(batch)["view_weights"])


def test_tmkd_student_distils_the_teacher_as_trained(ctx, teacher_file):
    method = tmkd(ctx, teacher_file)
    teacher, batch = method.teacher.module, ctx.sample_batch
    wrong = {**batch, "label": (batch["label"] + 1) % 4}
    with teacher.router.as_trained():
        expected = teacher(wrong)["view_weights"]
    served = method.teacher(wrong)["view_weights"]
    torch.testing.assert_close(served, expected)  # routed by the labels, as in the teacher's training
    assert not torch.allclose(served, teacher(wrong)["view_weights"])  # not the label-free eval routing
    assert method.teacher.identity()["describe"] == {"router_class_source": "label"}  # its own target tables


# ----------------------------------------------------------------------------- feature noise relative to the teacher


def test_feature_noise_std_is_a_fraction_of_the_teacher_rms():
    t = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # RMS = sqrt(25 / 4) = 2.5
    assert feature_noise_std(t, 0.1, "teacher_rms") == pytest.approx(0.25)
    assert feature_noise_std(10 * t, 0.1, "teacher_rms") == pytest.approx(2.5)
    assert feature_noise_std(10 * t, 0.1, "absolute") == 0.1
    assert feature_noise_std(t, 0.0, "teacher_rms") == 0.0
    noise = torch.randn(2, 2, generator=torch.Generator().manual_seed(0))
    # student = teacher: the loss is the noise's mean square, std^2 * mean(n^2); x10 features: x10 noise, x100 loss
    for scale in (1.0, 10.0):
        loss = perturbed_feature_mse(scale * t, scale * t, feature_noise_std(scale * t, 0.1, "teacher_rms"),
                                     generator=torch.Generator().manual_seed(0))
        assert loss.item() == pytest.approx((0.25 * scale) ** 2 * noise.pow(2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("sigma_scale", ["teacher_rms", "absolute"])
def test_tmkd_feature_term_uses_the_scaled_noise(ctx, teacher_file, sigma_scale):
    method = tmkd(ctx, teacher_file, w_kd=0.0, w_crd=0.0, backend=None, sigma=0.5, sigma_scale=sigma_scale).eval()
    batch = ctx.sample_batch
    torch.manual_seed(3)
    feat = method(batch)[1]["feat"]
    t = method.teacher(batch)["features"]
    s = method.feat_head(method.student(batch)["features"])
    std = 0.5 * t.pow(2).mean().sqrt() if sigma_scale == "teacher_rms" else 0.5
    torch.manual_seed(3)  # eval mode: the noise is the forward's first draw
    torch.testing.assert_close(feat, F.mse_loss(s, t + std * torch.randn(t.shape)))


# ----------------------------------------------------------------------------- the stronger teacher and the configs

CONFIGS = REPO / "configs"


def test_resnet18_width_keeps_the_small_input_layout():
    shape = AVDigits("unused").input_spec()[0]["image"]  # (1, 28, 28)
    enc = ENCODERS.build("resnet18", {"width": 16}, input_shape=shape)
    seen = []
    enc.layer1.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[1:])))
    assert enc(torch.randn(2, *shape)).shape == (2, 128) and enc.out_dim == 128
    assert seen == [(16, 28, 28)]  # 3x3 stride-1 stem, no max-pool: stage 1 at full resolution
    assert enc.conv1.kernel_size == (3, 3) and enc.conv1.in_channels == 1
    assert ENCODERS.build("resnet18", {}, input_shape=shape).out_dim == 512


def test_default_teacher_is_a_resnet_against_a_lenet_student():
    cfg = load_config(CONFIGS / "avdigits" / "tmkd_ablations.yaml")
    teacher, lenet, student = (cfg.networks[n] for n in ("tmkd_teacher", "tmkd_teacher_lenet", "image_net"))
    assert teacher.params["encoder"]["name"] == "resnet18" and student.params["encoder"]["name"] == "lenet5"
    but_encoder = lambda spec: {k: v for k, v in spec.params.items() if k != "encoder"}
    assert but_encoder(lenet) == but_encoder(teacher)  # views, dropout, router: only the backbone differs
    shapes = {v: (1, 28, 28) for v in VIEWS}

    def count(spec) -> int:
        return sum(p.numel() for p in build_network("multiview", {**spec.params, "router": None}, shapes, 10).parameters())

    assert count(teacher) > 5 * count(lenet)
    zero_shot = cfg.networks["tmkd_teacher_zero_shot"].params
    assert zero_shot["router"]["params"]["class_source"] == "zero_shot" and zero_shot["encoder"] == teacher.params["encoder"]
    recipe = lambda stage: (cfg.stage(stage).optimizer, cfg.stage(stage).augment, cfg.stage(stage).method.params["label_smoothing"])
    assert recipe("teacher") == recipe("teacher_zero_shot")  # the label-free teacher differs by its router only
    assert set(cfg.stage("teacher").augment) == set(VIEWS)  # the regularised ResNet: every view shifted


def _rows(bench) -> dict[str, tuple[str, str]]:
    return {row.label: (e.config, row.stage) for e in bench.experiments for row in e.rows}


def test_tmkd_bench_rows():
    bench = load_bench(CONFIGS / "bench" / "tmkd.yaml")
    assert len(bench.seeds) == 5 and bench.reference == ["student only (no KD)"]
    rows = _rows(bench)
    stages = {"student_only", "tmkd", "tmkd_zero_shot", "tmkd_lenet", "teacher", "teacher_zero_shot", "teacher_lenet"}
    assert stages <= {stage for _, stage in rows.values()}
    for config, stage in rows.values():
        assert stage in {s.name for s in load_config(REPO / config).stages}, stage


def test_view_sweep_bench_selects_on_validation_with_few_settings():
    bench = load_bench(CONFIGS / "bench" / "tmkd_views.yaml")
    assert len(bench.seeds) == 3 and len(bench.experiments) <= 6
    settings = set()
    for e in bench.experiments:
        cfg = load_config(REPO / e.config, e.overrides)
        views = {m: (s.name, tuple(sorted(s.params.items()))) for m, s in cfg.data.views.items()}
        settings.add(tuple(sorted(views.items())))
        stages = {s.name for s in cfg.stages}
        assert "tmkd" in {row.stage for row in e.rows} and all(row.stage in stages for row in e.rows)
    assert len(settings) == len(bench.experiments)  # every experiment a distinct view setting
    assert "validation" in (CONFIGS / "bench" / "tmkd_views.yaml").read_text()
