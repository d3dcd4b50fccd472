"""TMKD (Zhang et al., arXiv 2603.24208): the ``text_guided`` router, the ``tmkd_teacher`` and ``tmkd``
methods, and the shipped avdigits configs end to end on synthetic data (a tiny BERT as the text tower of the
``text_aligned`` backend)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, read_json
from tiny_text import make_tiny_bert

from crossmodal_kd.clip.backends import ClipBackend, TextAlignedBackend
from crossmodal_kd.config import ConfigError, load_config, validate_config
from crossmodal_kd.data.synthetic import Synthetic
from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.models.io import load_model, model_path, save_model
from crossmodal_kd.engine.trainer import Runner
from crossmodal_kd.losses import text_anchored_contrastive
from crossmodal_kd.models.aligned import TextTower
from crossmodal_kd.models.networks import build_network
from crossmodal_kd.registry import CLIP_BACKENDS, METHODS, ROUTERS
from crossmodal_kd.registry import ROUTERS
from crossmodal_kd.clip.router import TEXT_GUIDED_PROMPTS, TextGuidedRouter
from crossmodal_kd.data.views import ViewSet

VIEWS = ("image", "image_edge", "image_hf")

# ----------------------------------------------------------------------------- the router on a hand-made case

CLASSES = ["cat", "dog"]
# text vectors of every (view prompt, class): prompts[v].format(c) -> a direction in 3-D
TEXT = {
    TEXT_GUIDED_PROMPTS[0].format("cat"): [1.0, 0.0, 0.0],
    TEXT_GUIDED_PROMPTS[1].format("cat"): [0.0, 1.0, 0.0],
    TEXT_GUIDED_PROMPTS[2].format("cat"): [0.0, 0.0, 1.0],
    TEXT_GUIDED_PROMPTS[0].format("dog"): [0.0, 1.0, 1.0],
    TEXT_GUIDED_PROMPTS[1].format("dog"): [1.0, 0.0, 1.0],
    TEXT_GUIDED_PROMPTS[2].format("dog"): [1.0, 1.0, 0.0],
}


class FakeClip(ClipBackend):
    """Images are their own embeddings (the first three pixels); texts come from a table."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        super().__init__(image_size=2)
        self.table, self.embed_dim, self.cache_key = table, 3, "fake"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().to(self.device)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.flatten(1)[:, :3]

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.table[t] for t in texts], device=self.device)


@pytest.fixture
def fake_clip(clean_registries):
    CLIP_BACKENDS.register("fake_clip")(FakeClip)
    return {"name": "fake_clip", "params": {"table": TEXT}}


def as_images(vectors: list[list[float]]) -> torch.Tensor:
    """(B, 1, 2, 2) images whose first three pixels are ``vectors``."""
    x = torch.zeros(len(vectors), 1, 2, 2)
    x.view(len(vectors), 4)[:, :3] = torch.tensor(vectors)
    return x


# sample 0 (cat): its edge view matches "an edge enhanced image of a cat." best;
# sample 1 (dog): its RGB view matches "a photo of a dog." best
HAND_BATCH = {
    "image": as_images([[0.6, 0.8, 0.0], [0.0, 0.7, 0.7]]),
    "image_edge": as_images([[0.1, 1.0, 0.1], [0.0, 1.0, 0.0]]),
    "image_hf": as_images([[1.0, 0.0, 0.3], [0.0, 0.0, 1.0]]),
    "label": torch.tensor([0, 1]),
}


def router(backend: dict, **params) -> TextGuidedRouter:
    return ROUTERS.build_spec({"name": "text_guided", "params": {"backend": backend, "class_names": CLASSES, **params}},
                        where="test", num_teachers=3, num_classes=2, views=VIEWS)


def similarity(b: int, view: int, c: int) -> torch.Tensor:
    """cos(sample b's view, the view's prompt for class c), by hand."""
    text = torch.tensor(TEXT[TEXT_GUIDED_PROMPTS[view].format(CLASSES[c])])
    return F.cosine_similarity(HAND_BATCH[VIEWS[view]][b].flatten()[:3], text, dim=0)


def hand_weights(temperature: float, classes: list[int]) -> torch.Tensor:
    return torch.stack([F.softmax(torch.stack([similarity(b, v, c) for v in range(3)]) / temperature, dim=0)
                        for b, c in enumerate(classes)])


def test_text_guided_weights_follow_the_view_that_matches_its_prompt(fake_clip):
    r = router(fake_clip, temperature=0.1)
    w = r(None, torch.zeros(2, 3, 2), HAND_BATCH).weights
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    torch.testing.assert_close(w, hand_weights(0.1, [0, 1]))
    assert w.argmax(1).tolist() == [1, 0]  # cat: edge view; dog: RGB view
    # the class filling the prompts is the label: other labels, other weights
    flipped = r(None, None, {**HAND_BATCH, "label": torch.tensor([1, 0])}).weights
    torch.testing.assert_close(flipped, hand_weights(0.1, [1, 0]))
    # lower temperature, sharper weights (same ranking)
    sharp = router(fake_clip, temperature=0.01)(None, None, HAND_BATCH).weights
    soft = router(fake_clip, temperature=1.0)(None, None, HAND_BATCH).weights
    assert (sharp.max(1).values > w.max(1).values).all() and (w.max(1).values > soft.max(1).values).all()
    assert sharp.argmax(1).tolist() == soft.argmax(1).tolist() == [1, 0]
    assert not list(r.parameters()) and not r.state_dict()  # frozen: nothing trained, nothing saved


def test_zero_shot_class_source_never_reads_the_label(fake_clip):
    r = router(fake_clip, temperature=0.1, class_source="zero_shot")
    unlabelled = {k: v for k, v in HAND_BATCH.items() if k != "label"}
    w = r(None, None, unlabelled).weights
    guess = [max((0, 1), key=lambda c: sum(similarity(b, v, c) for v in range(3)).item()) for b in range(2)]
    torch.testing.assert_close(w, hand_weights(0.1, guess))
    with pytest.raises(KeyError, match="reads batch\\['label'\\]"):
        router(fake_clip)(None, None, unlabelled)


def test_text_guided_errors_name_the_problem(fake_clip):
    with pytest.raises(ValueError, match="one template per view, in view order.*defaults are for RGB, edge"):
        ROUTERS.build_spec({"name": "text_guided", "params": {"backend": fake_clip, "class_names": CLASSES}},
                     where="test", num_teachers=2, num_classes=2, views=VIEWS[:2])
    with pytest.raises(ValueError, match="exactly one '\\{\\}'"):
        router(fake_clip, prompts=["a {} {}", "b {}", "c {}"])
    with pytest.raises(ValueError, match="3 class names for 2 classes"):
        ROUTERS.build_spec({"name": "text_guided", "params": {"backend": fake_clip, "class_names": ["a", "b", "c"]}},
                     where="test", num_teachers=3, num_classes=2, views=VIEWS)
    with pytest.raises(TypeError, match=r"missing required parameter\(s\) views"):  # a teacher router, not a view router
        ROUTERS.build("text_guided", {"backend": fake_clip, "class_names": CLASSES}, where="test", num_teachers=3)
    assert ROUTERS.build_spec({"name": "uniform"}, where="test", num_teachers=3, views=VIEWS).num_teachers == 3  # views ignored


def test_multiview_network_hands_its_views_to_the_router_and_loads_by_path(fake_clip, tmp_path):
    shapes = {v: (1, 2, 2) for v in VIEWS}
    params = {"views": list(VIEWS), "encoder": {"name": "small_cnn", "params": {"channels": [2]}},
              "router": {"name": "text_guided", "params": {"backend": fake_clip, "class_names": CLASSES, "temperature": 0.1}}}
    net = build_network("multiview", params, shapes, 2).eval()
    assert net.router.views == VIEWS and isinstance(net.router.backend, FakeClip)
    out = net(HAND_BATCH)
    torch.testing.assert_close(out["view_weights"], hand_weights(0.1, [0, 0]))  # eval: the zero-shot guesses
    with net.router.as_trained():
        torch.testing.assert_close(net(HAND_BATCH)["view_weights"], hand_weights(0.1, [0, 1]))  # the labels
    assert not any("backend" in k or "prompt" in k for k in net.state_dict())  # the backend is rebuilt, not saved
    from crossmodal_kd.models.io import attach_spec

    save_model(attach_spec(net, "networks", "multiview", params, {"input_shapes": shapes, "num_classes": 2}), tmp_path / "t.pt")
    loaded = load_model(tmp_path / "t.pt").eval()
    torch.testing.assert_close(loaded(HAND_BATCH)["logits"], out["logits"])
    loaded.double()
    assert loaded.router.backend.clip_mean.dtype == torch.float64  # the backend follows the network's moves


# ----------------------------------------------------------------------------- the methods on synthetic data

SHAPES = {"image": (1, 12, 12), "audio": (1, 8, 8)}
CNN = {"name": "small_cnn", "params": {"channels": [4, 8]}}
VIEW_SPECS = {"image_edge": {"name": "edge"}, "image_hf": {"name": "highfreq"}}
TEACHER = {"name": "multiview", "params": {
    "views": list(VIEWS), "encoder": CNN,
    "router": {"name": "text_guided", "params": {"backend": {"name": "text_aligned", "params": {"image_model": {"stage": "align"}}},
                                                 "temperature": 0.07}}}}
RAW = {
    "data": {"name": "synthetic", "views": VIEW_SPECS},
    "networks": {"teacher": TEACHER, "student": {"name": "unimodal", "params": {"modality": "image", "encoder": CNN}}},
    "stages": [{"name": "align", "method": {"name": "supervised", "params": {"network": "student"}}}],
}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return str(make_tiny_bert(tmp_path_factory.mktemp("text") / "tiny_bert"))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_bert) -> BuildContext:
    """A build context whose run holds a finished ``align`` stage (a text_aligned image tower)."""
    cfg = validate_config(RAW)
    views = ViewSet(cfg.data.views)
    data = Synthetic("unused", num_classes=4, n_train=48, n_val=16, n_test=16, image_shape=SHAPES["image"],
                     audio_shape=SHAPES["audio"]).load()
    batch = views(data.train.__getitems__(list(range(16))))
    context = BuildContext(cfg, tmp_path_factory.mktemp("run"), views.input_shapes(SHAPES), 4, batch, where="test",
                           num_train=48, class_names=["class0", "class1", "class2", "class3"], train_data=data.train, views=views)
    torch.manual_seed(0)
    align = METHODS.build("align_to_text", {"image": {"encoder": CNN}, "text": {"model": tiny_bert}}, where="test", ctx=context)
    save_model(align.model, model_path(context.run_dir, "align", "model"))
    return context


@pytest.fixture(scope="module")
def teacher_file(ctx) -> str:
    torch.manual_seed(0)
    method = METHODS.build("tmkd_teacher", {"network": "teacher"}, where="test", ctx=ctx)
    path = ctx.run_dir / "teacher.pt"
    save_model(method.model, path)
    return str(path)


def test_tmkd_teacher_resolves_the_backend_and_class_names_and_loads_by_path(ctx, teacher_file):
    torch.manual_seed(0)  # as teacher_file's
    method = METHODS.build("tmkd_teacher", {"network": "teacher"}, where="test", ctx=ctx)
    r = method.model.router
    assert isinstance(r, TextGuidedRouter) and isinstance(r.backend, TextAlignedBackend)
    saved = method.model.build_spec["params"]["router"]["params"]
    assert saved["backend"]["params"]["image_model"] == str(model_path(ctx.run_dir, "align", "model").resolve())
    assert list(method.model.build_spec["context"]["class_names"]) == ctx.class_names and r.class_names == ctx.class_names
    loaded = load_model(teacher_file).eval()  # rebuilt from the file alone
    assert isinstance(loaded.router, TextGuidedRouter)
    method.eval()
    torch.testing.assert_close(loaded(ctx.sample_batch)["logits"], method.model(ctx.sample_batch)["logits"])
    method.train()
    out, losses = method(ctx.sample_batch)
    assert set(losses) == {"ce"} and out["view_weights"].shape == (16, 3)
    stats = method.summarize_stats(method.pop_stats())
    assert set(stats) == {f"view_weight/{v}" for v in VIEWS} and sum(stats.values()) == pytest.approx(1.0)


def test_tmkd_teacher_errors_name_the_key(ctx):
    with pytest.raises(ConfigError, match="'student' is a 'unimodal' network; tmkd_teacher trains a 'multiview' one"):
        METHODS.build("tmkd_teacher", {"network": "student"}, where="test", ctx=ctx)
    with pytest.raises(ConfigError, match="unknown network 'nope'"):
        METHODS.build("tmkd_teacher", {"network": "nope"}, where="test", ctx=ctx)


def tmkd(ctx, teacher_file, **params):
    torch.manual_seed(0)
    base = {"student": "student", "teacher": {"path": teacher_file},
            "backend": {"name": "text_aligned", "params": {"image_model": {"stage": "align"}}}}
    return METHODS.build("tmkd", {**base, **params}, where="test", ctx=ctx)


def total_loss(method, batch) -> torch.Tensor:
    torch.manual_seed(1)  # the same teacher-side noise every time
    return sum(method(batch)[1].values())


def test_tmkd_terms_match_their_definitions_and_one_step_reduces_the_loss(ctx, teacher_file, tiny_bert):
    method = tmkd(ctx, teacher_file, w_kd=0.5, w_crd=0.3, w_feat=2.0, sigma=0.0)
    method.train()
    batch, y = ctx.sample_batch, ctx.sample_batch["label"]
    out, losses = method(batch)
    assert set(losses) == {"ce", "kd", "crd", "feat"}
    t_out = method.teacher(batch)
    anchors = F.normalize(TextTower(tiny_bert)([f"a photo of a class{c}." for c in range(4)]), dim=-1)
    torch.testing.assert_close(method.anchors, anchors)  # the backend's text embeddings of the class prompts
    torch.testing.assert_close(losses["crd"], 0.3 * text_anchored_contrastive(method.crd_head(out["features"]), anchors, y, 0.07))
    torch.testing.assert_close(losses["feat"], 2.0 * F.mse_loss(method.feat_head(out["features"]), t_out["features"]))
    assert not any(k.startswith(("teacher", "anchors")) for k in method.state_dict())
    assert {n.split(".")[0] for n, _ in method.named_parameters()} == {"student", "crd_head", "feat_head"}
    stats = method.summarize_stats(method.pop_stats())
    assert set(stats) == {f"teacher_view_weight/{v}" for v in VIEWS}

    noisy = tmkd(ctx, teacher_file, sigma=0.5)
    noisy.train()
    before = total_loss(noisy, batch)
    opt = torch.optim.SGD(noisy.parameters(), lr=0.05)
    opt.zero_grad()
    before.backward()
    opt.step()
    assert total_loss(noisy, batch).item() < before.item()


@pytest.mark.parametrize(("weight", "term", "head"), [("w_kd", "kd", None), ("w_crd", "crd", "crd_head"), ("w_feat", "feat", "feat_head")])
def test_a_zero_weight_removes_its_term_and_head(ctx, teacher_file, weight, term, head):
    method = tmkd(ctx, teacher_file, **{weight: 0.0})
    _, losses = method(ctx.sample_batch)
    assert term not in losses and len(losses) == 3
    if head:
        assert not hasattr(method, head)


def test_tmkd_errors_name_the_key(ctx, teacher_file):
    with pytest.raises(ConfigError, match="test.backend: the text-anchored term .* or set w_crd: 0"):
        tmkd(ctx, teacher_file, backend=None)
    assert "crd" not in tmkd(ctx, teacher_file, backend=None, w_crd=0.0)(ctx.sample_batch)[1]
    with pytest.raises(ConfigError, match=r"test\.w_feat: Input should be greater than or equal to 0 \(got -1\.0\)"):
        tmkd(ctx, teacher_file, w_feat=-1.0)
    with pytest.raises(ConfigError, match=r"^test\.alpha: renamed to w_kd\ntest\.gamma: renamed to w_feat$"):
        tmkd(ctx, teacher_file, alpha=1.0, gamma=1.0)
    with pytest.raises(ConfigError, match="test.class_prompts"):
        tmkd(ctx, teacher_file, class_prompts=["no slot"])


# ----------------------------------------------------------------------------- the shipped configs

CONFIGS = REPO / "configs" / "avdigits"
ON_SYNTHETIC = [
    "data.name=synthetic",
    "data.params={n_train: 32, n_val: 16, n_test: 16, image_shape: [1, 28, 28], audio_shape: [1, 8, 8]}",
    "data.batch_size=16",
    "data.eval_batch_size=16",
    "accelerator.cpu=true",
]


def log_row(run, stage) -> dict:
    return json.loads((run / "stages" / stage / "log.jsonl").read_text().splitlines()[0])


def test_tmkd_configs_fast_dev_run(tmp_path, tiny_bert):
    """The recipe, then its ablations resumed in the same run directory: the shared stages are reused."""
    small = [f"stages.align.method.params.text.model={tiny_bert}"]
    run = tmp_path / "run"
    main = Runner(load_config(CONFIGS / "tmkd.yaml", [*ON_SYNTHETIC, *small]), run, fast_dev_run=True, progress=False).run()
    assert list(main["stages"]) == ["align", "teacher", "student_only", "tmkd"]
    assert {f"view_weight/{v}" for v in VIEWS} <= set(log_row(run, "teacher"))
    assert {"train/ce", "train/kd", "train/crd", "train/feat"} <= set(log_row(run, "tmkd"))
    teacher = load_model(run / "stages" / "teacher" / "models" / "model.pt")
    assert isinstance(teacher.router, TextGuidedRouter) and teacher.modalities == VIEWS
    assert teacher.build_spec["params"]["encoder"] == {"name": "resnet18", "params": {"width": 16}}

    ablations = Runner(load_config(CONFIGS / "tmkd_ablations.yaml", [*ON_SYNTHETIC, *small]), run, resume=True,
                       fast_dev_run=True, progress=False).run()["stages"]
    assert ablations["teacher"] == main["stages"]["teacher"]  # reused, not retrained
    assert list(ablations)[4:] == ["teacher_lenet", "teacher_zero_shot", "teacher_rgb", "teacher_rgb_edge", "teacher_rgb_hf",
                                   "teacher_uniform", "tmkd_lenet", "tmkd_zero_shot", "tmkd_rgb", "tmkd_rgb_edge", "tmkd_rgb_hf",
                                   "tmkd_uniform", "tmkd_no_logit", "tmkd_no_crd", "tmkd_no_feat"]
    assert load_model(run / "stages" / "teacher_zero_shot" / "models" / "model.pt").router.class_source == "zero_shot"
    for stage, views in (("teacher_rgb", ("image",)), ("teacher_rgb_edge", VIEWS[:2]), ("teacher_rgb_hf", ("image", "image_hf"))):
        assert load_model(run / "stages" / stage / "models" / "model.pt").modalities == views
    assert log_row(run, "teacher_uniform")["view_weight/image_hf"] == pytest.approx(1 / 3)
    for stage, term in (("tmkd_no_logit", "kd"), ("tmkd_no_crd", "crd"), ("tmkd_no_feat", "feat")):
        row = log_row(run, stage)
        assert f"train/{term}" not in row and "train/ce" in row
    assert "accuracy" in read_json(run / "stages" / "tmkd_no_feat" / "result.json")["models"]["student"]["test"]
