"""The WordNet-relaxed CLIP teacher (Guo et al., arXiv 2503.24017): the ``text_aligned`` CLIP stand-in and
its ``align_to_text`` stage, T_x (``relaxed_clip`` network, ``wordnet_clip`` stage), the leakage guard, the
noun cache, the ``after_step`` hook, and the shipped avdigits configs end to end on synthetic data with a tiny BERT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import AVDIGITS_ON_SYNTHETIC, REPO, read_json
from tiny_text import make_tiny_bert

from crossmodal_kd.clip.backends import TextAlignedBackend, build_clip_backend
from crossmodal_kd.clip.nouns import PAPER_TEMPLATES, class_name_synonyms, noun_pool
from crossmodal_kd.config import ConfigError, load_config, validate_config
from crossmodal_kd.data.synthetic import Synthetic
from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.models.io import load_model, save_model
from crossmodal_kd.engine.trainer import Runner, train_step
from crossmodal_kd.methods.base import Method
from crossmodal_kd.models.aligned import TextTower
from crossmodal_kd.clip.relaxed import RelaxedClipTeacher
from crossmodal_kd.registry import METHODS

SHAPES = {"image": (1, 12, 12), "audio": (1, 8, 8)}
CNN = {"name": "small_cnn", "params": {"channels": [4, 8]}}
CLASSES = ["dog", "cat", "seven", "tree"]  # real WordNet nouns with synonyms, to test their exclusion
RAW = {
    "data": {"name": "synthetic"},
    "networks": {"student": {"name": "unimodal", "params": {"modality": "image", "encoder": CNN}}},
    "stages": [{"name": "align", "method": {"name": "supervised", "params": {"network": "student"}}}],
}
CLASS_TREE = {"source": "class_tree", "depth": 1}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return str(make_tiny_bert(tmp_path_factory.mktemp("text") / "tiny_bert", words=CLASSES))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> BuildContext:
    data = Synthetic("unused", num_classes=4, n_train=48, n_val=16, n_test=16,
                     image_shape=SHAPES["image"], audio_shape=SHAPES["audio"]).load()
    batch = data.train.__getitems__(list(range(16)))
    return BuildContext(validate_config(RAW), tmp_path_factory.mktemp("run"), SHAPES, 4, batch, where="test",
                        num_train=len(data.train), class_names=CLASSES, train_data=data.train)


def build(ctx: BuildContext, name: str, **params) -> Method:
    torch.manual_seed(0)
    return METHODS.build(name, params, where="test", ctx=ctx)


@pytest.fixture(scope="module")
def aligned(ctx, tiny_bert) -> Path:
    """A saved ``text_aligned_image`` network (the model file of an ``align_to_text`` stage)."""
    method = build(ctx, "align_to_text", image={"encoder": CNN}, text={"model": tiny_bert}, templates=["a photo of the {}."])
    path = ctx.run_dir / "align.pt"
    save_model(method.model, path)
    return path


def tx_params(aligned: Path, cache: Path, **extra) -> dict:
    params = {
        "backend": {"name": "text_aligned", "params": {"image_model": str(aligned)}},
        "pool": CLASS_TREE,
        "filtering": {"k": 4, "top_m": 5},
        "teacher": {"hidden": 16},
        "cache_dir": str(cache),
    }
    return {**params, **extra}


@pytest.fixture(scope="module")
def tx_method(ctx, aligned, tmp_path_factory) -> Method:
    return build(ctx, "wordnet_clip", **tx_params(aligned, tmp_path_factory.mktemp("nouns")))


# ----------------------------------------------------------------------------- the CLIP stand-in


def test_align_to_text_logits_are_scaled_cosines_to_the_class_prompts(ctx, tiny_bert):
    templates = ["a photo of the {}.", "the {}."]
    method = build(ctx, "align_to_text", image={"encoder": CNN}, text={"model": tiny_bert}, templates=templates)
    tower = TextTower(tiny_bert)
    prompts = F.normalize(tower([t.format(c) for c in CLASSES for t in templates]), dim=-1).view(4, 2, -1)
    torch.testing.assert_close(method.prompts, prompts)
    torch.testing.assert_close(method.model.class_text, F.normalize(prompts.mean(1), dim=-1))
    out, losses = method(ctx.sample_batch)
    torch.testing.assert_close(out["embedding"].norm(dim=1), torch.ones(16))
    torch.testing.assert_close(out["logits"], out["embedding"] @ method.model.class_text.T / 0.07)
    # InfoNCE over the class prompts, averaged over the templates
    expected = sum(F.cross_entropy(out["embedding"] @ prompts[:, k].T / 0.07, ctx.sample_batch["label"]) for k in range(2)) / 2
    torch.testing.assert_close(losses["infonce"], expected)
    opt = torch.optim.SGD(method.parameters(), lr=0.5)
    before = losses["infonce"].item()
    for _ in range(3):
        opt.zero_grad()
        method(ctx.sample_batch)[1]["infonce"].backward()
        opt.step()
    assert method(ctx.sample_batch)[1]["infonce"].item() < before
    assert not any("prompts" in k for k in method.model.state_dict())  # the text side is not saved


def test_text_aligned_backend_pairs_the_image_network_with_its_text_tower(ctx, aligned, tiny_bert):
    backend = build_clip_backend("text_aligned", {"image_model": str(aligned)})
    assert backend._text_tower is None  # loaded on first use: image-only teachers never load it
    net = load_model(aligned).eval()
    images = ctx.sample_batch["image"]
    torch.testing.assert_close(backend.encode_image(images), net.embed(images)[0])
    texts = ["a photo of a dog.", "a picture of a tree."]
    torch.testing.assert_close(backend.encode_text(texts), F.normalize(TextTower(tiny_bert)(texts), dim=-1))
    assert backend.embed_dim == 32 and backend._text_tower is not None
    assert not any(p.requires_grad for p in backend.parameters())
    # the cache key names the text tower only: another image network aligned to it shares text caches
    other = build(ctx, "align_to_text", image={"encoder": {"name": "small_cnn", "params": {"channels": [2]}}},
                  text={"model": tiny_bert})
    save_model(other.model, ctx.run_dir / "other.pt")
    assert build_clip_backend("text_aligned", {"image_model": str(ctx.run_dir / "other.pt")}).cache_key == backend.cache_key


def test_text_aligned_backend_errors_name_the_problem(ctx, aligned, tiny_bert):
    with pytest.raises(ValueError, match="text_model='minilm', but .* was aligned to model="):
        build_clip_backend("text_aligned", {"image_model": str(aligned), "text_model": "minilm"})
    save_model(ctx.network("student"), ctx.run_dir / "plain.pt")
    with pytest.raises(TypeError, match="holds a 'unimodal' network, not a 'text_aligned_image'"):
        build_clip_backend("text_aligned", {"image_model": str(ctx.run_dir / "plain.pt")})
    with pytest.raises(FileNotFoundError, match="model file not found"):
        build_clip_backend("text_aligned", {"image_model": str(ctx.run_dir / "missing.pt")})
    backend = build_clip_backend("text_aligned", {"image_model": str(aligned)})
    with pytest.raises(ValueError, match=r"expected images \(1, 12, 12\)"):
        backend.encode_image(torch.zeros(2, 3, 12, 12))


# ----------------------------------------------------------------------------- T_x


def test_tx_never_reads_a_class_name_or_synonym(tx_method):
    """Leakage guard: the nouns T_x reads hold no class name nor WordNet synonym of one; its relaxed
    embedding is a convex mixture of its own noun rows; no class embedding is part of T_x; it runs on a
    batch without labels (it never reads them)."""
    tx = tx_method.model
    assert not tx.label_oracle
    banned = {form for forms in class_name_synonyms(CLASSES).values() for form in forms}
    assert {"dog", "domestic dog", "7", "seven", "septet", "tree", "cat"} <= banned
    assert tx.nouns and not banned & {n.lower() for n in tx.nouns}
    assert not banned & set(tx.build_spec["params"]["nouns"])  # what a saved teacher is rebuilt from
    assert tx_method.noun_counts["nouns/excluded"] >= 40 and tx_method.noun_counts["nouns/kept"] == len(tx.nouns)
    assert tx_method.noun_counts["nouns/kept"] <= 4 * 5 < tx_method.noun_counts["nouns/pool"]
    assert set(tx.state_dict()) == {"noun_embeddings", "pretrained_nouns", "mlp.0.weight", "mlp.0.bias", "head.weight", "head.bias"}
    tx.eval()
    out = tx({"image": torch.randn(8, *SHAPES["image"])})
    w = out["noun_weights"]
    assert w.shape == (8, len(tx.nouns)) and (w >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(8))
    torch.testing.assert_close(out["relaxed"], F.normalize(w @ tx.noun_embeddings, dim=-1))
    logits = tx.head(tx.mlp(torch.cat([out["image_embedding"], out["relaxed"]], 1)))
    torch.testing.assert_close(out["logits"], logits)  # the head reads [image, relaxed] and nothing else


def test_tx_backend_stays_outside_the_module_tree_and_follows_moves(tx_method, tmp_path):
    tx = tx_method.model
    assert isinstance(tx, RelaxedClipTeacher) and isinstance(tx.backend, TextAlignedBackend)
    names = {n for n, _ in tx_method.named_parameters()}
    assert names == {"model.noun_embeddings", "model.mlp.0.weight", "model.mlp.0.bias", "model.head.weight", "model.head.bias"}
    assert not any(k.startswith("model._backend") or "image_net" in k for k in tx_method.state_dict())
    tx.train()
    assert not tx.backend.training
    # a saved T_x is a teacher of the zoo: rebuilt from its file alone, same outputs
    save_model(tx, tmp_path / "tx.pt")
    loaded = load_model(tmp_path / "tx.pt").eval()
    tx.eval()
    batch = {"image": torch.randn(4, *SHAPES["image"])}
    torch.testing.assert_close(loaded(batch)["logits"], tx(batch)["logits"])
    assert loaded.nouns == tx.nouns
    loaded.double()
    assert loaded.backend.image_net.projection.weight.dtype == torch.float64  # moves with the network


def test_hierarchical_loss_terms_and_renormalisation_after_each_step(ctx, aligned, tmp_path):
    tx_method = build(ctx, "wordnet_clip", **tx_params(aligned, tmp_path))
    tx_method.train()
    out, terms = tx_method(ctx.sample_batch)
    assert set(terms) == {"ce", "class", "pretrained"}
    y = ctx.sample_batch["label"]
    cls = tx_method.class_text[y]
    torch.testing.assert_close(terms["class"], 0.2 * (1 - F.cosine_similarity(cls, out["relaxed"])).mean())
    assert terms["pretrained"].item() == pytest.approx(0.0, abs=1e-6)  # the noun matrix is still the pretrained one
    acc = Accelerator(cpu=True)
    opt = torch.optim.SGD(tx_method.parameters(), lr=5.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    train_step(acc, tx_method, opt, sched, ctx.sample_batch)
    nouns = tx_method.model.noun_embeddings
    assert not torch.equal(nouns, tx_method.model.pretrained_nouns)  # trained
    torch.testing.assert_close(nouns.norm(dim=1), torch.ones(len(nouns)))  # and renormalised by after_step
    # the public code's third term: row-wise over the noun matrix, mean over the nouns
    out, terms = tx_method(ctx.sample_batch)
    drift = (1 - F.cosine_similarity(nouns, tx_method.model.pretrained_nouns)).mean()
    assert drift.item() > 0
    torch.testing.assert_close(terms["pretrained"], 0.005 * drift)
    # the option: the relaxed embeddings over the learned vs the initial matrix, mean over the batch
    tx_method.pretrained_term = "relaxed"
    out, terms = tx_method(ctx.sample_batch)
    torch.testing.assert_close(terms["pretrained"], 0.005 * (1 - F.cosine_similarity(out["relaxed"], out["relaxed_pretrained"])).mean())


class CountingMethod(Method):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.w = torch.nn.Parameter(torch.ones(3))
        self.after_steps = 0

    def forward(self, batch):
        return {}, {"l": (self.w * batch["image"].mean()).sum() ** 2}

    def after_step(self):
        self.after_steps += 1

    def models(self):
        return {}


def test_after_step_runs_once_per_optimizer_update(ctx):
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    method = CountingMethod(ctx)
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    method, opt, sched = acc.prepare(method, opt, sched)
    for _ in range(4):
        train_step(acc, method, opt, sched, ctx.sample_batch)
    assert acc.unwrap_model(method).after_steps == 2  # 4 batches, 2 accumulated per update


def test_noun_embeddings_are_cached_and_reused(ctx, aligned, tmp_path, monkeypatch):
    calls = []
    encode = TextAlignedBackend._text_features
    monkeypatch.setattr(TextAlignedBackend, "_text_features", lambda self, texts: calls.extend(texts) or encode(self, texts))
    first = build(ctx, "wordnet_clip", **tx_params(aligned, tmp_path))
    # every pool noun and every class name in the paper's 7 templates, and nothing else
    pool = noun_pool(class_names=CLASSES, **CLASS_TREE).nouns
    assert len(pool) == first.noun_counts["nouns/pool"]
    assert sorted(calls) == sorted(t.format(n) for n in [*pool, *CLASSES] for t in PAPER_TEMPLATES)
    calls.clear()
    second = build(ctx, "wordnet_clip", **tx_params(aligned, tmp_path))
    assert calls == []  # the pool and the class prompts came from the cache
    assert second.model.nouns == first.model.nouns
    torch.testing.assert_close(second.model.noun_embeddings, first.model.noun_embeddings)
    assert len(list(tmp_path.glob("nouns-*.pt"))) == 2  # the pool, the class prompts


def test_exact_class_name_pool_is_an_explicit_ablation(ctx, aligned, tmp_path):
    with pytest.raises(ConfigError, match="exact class names .* set pool.exclude_class_names: false"):
        build(ctx, "wordnet_clip", **tx_params(aligned, tmp_path, pool={"source": "class_names"}))
    templates = ["a photo of the {}."]
    leak = build(ctx, "wordnet_clip", **tx_params(aligned, tmp_path, pool={"source": "class_names", "exclude_class_names": False},
                                                  filtering=None, templates=templates, class_templates=templates))
    assert leak.model.nouns == CLASSES and leak.noun_counts == {"nouns/pool": 4, "nouns/excluded": 0, "nouns/kept": 4}
    torch.testing.assert_close(leak.model.noun_embeddings, leak.class_text)  # T_x reads the class prompts themselves
    # the naive leaky teacher: its text input is the true label's class-name prompt
    oracle = build(ctx, "wordnet_clip", **tx_params(aligned, tmp_path, pool={"source": "class_names", "exclude_class_names": False},
                                                    filtering=None, teacher={"hidden": 16, "label_oracle": True}))
    out = oracle.model(ctx.sample_batch)
    torch.testing.assert_close(out["relaxed"], F.normalize(oracle.model.noun_embeddings[ctx.sample_batch["label"]], dim=-1))
    with pytest.raises(ConfigError, match="label_oracle: needs pool source class_names and filtering: null"):
        build(ctx, "wordnet_clip", **tx_params(aligned, tmp_path, teacher={"label_oracle": True}))


def test_wordnet_clip_config_errors_name_the_key(ctx, aligned, tmp_path):
    with pytest.raises(TypeError, match=r"test.pool: unknown parameter\(s\) colour"):
        build(ctx, "wordnet_clip", **tx_params(aligned, tmp_path, pool={"colour": 1}))
    with pytest.raises(ConfigError, match=r"test.filtering: unknown key\(s\) kk"):
        build(ctx, "wordnet_clip", **tx_params(aligned, tmp_path, filtering={"kk": 3}))
    with pytest.raises(ConfigError, match="test.filtering.k: 500 clusters for 48 training images"):
        build(ctx, "wordnet_clip", **tx_params(aligned, tmp_path, filtering={"k": 500}))
    with pytest.raises(ConfigError, match="no stage named 'nope'"):
        build(ctx, "wordnet_clip", **tx_params(aligned, tmp_path, backend={"name": "text_aligned", "params": {"image_model": {"stage": "nope"}}}))
    with pytest.raises(FileNotFoundError, match="image_model: .*align/models/model.pt does not exist"):
        build(ctx, "wordnet_clip", **tx_params(aligned, tmp_path, backend={"name": "text_aligned", "params": {"image_model": {"stage": "align"}}}))


# ----------------------------------------------------------------------------- the shipped configs

CONFIGS = REPO / "configs" / "avdigits"


def test_wordnet_clip_configs_fast_dev_run(tmp_path, tiny_bert):
    """The main recipe, then both recipes (main + leakage ablation) resumed in the same run directory: the
    shared stages (same names, same settings: fingerprints match) are reused, only T_x on the exact class
    names and its students are new."""
    small = [f"stages.align.method.params.text.model={tiny_bert}", "stages.tx.method.params.pool.max_nouns=300",
             f"stages.tx.method.params.cache_dir={tmp_path / 'nouns'}"]
    run = tmp_path / "run"
    main = Runner(load_config(CONFIGS / "wordnet_clip.yaml", [*AVDIGITS_ON_SYNTHETIC, *small]),
                  run, fast_dev_run=True, progress=False).run()
    stages = main["stages"]
    assert list(stages) == ["align", "student_only", "visual_strong", "visual_weak", "tx", "student_visual",
                            "student_wordnet", "student_wordnet_val", "student_wordnet_router"]
    tx_log = [json.loads(line) for line in (run / "stages" / "tx" / "log.jsonl").read_text().splitlines()]
    assert tx_log[0]["nouns/pool"] == 64 and 0 < tx_log[0]["nouns/kept"] <= 100  # max_nouns 300, fast-dev cap 64
    assert {"train/ce", "train/class", "train/pretrained"} <= set(tx_log[0])
    val_log = json.loads((run / "stages" / "student_wordnet_val" / "log.jsonl").read_text().splitlines()[0])
    acc = {t: read_json(run / "stages" / t / "result.json")["models"]["model"]["val"]["accuracy"]
           for t in ("visual_strong", "visual_weak", "tx")}
    for t, a in acc.items():
        assert val_log[f"weight/{t}"] == pytest.approx(a / sum(acc.values()), abs=1e-6)
    assert "train/load_balance" in json.loads((run / "stages" / "student_wordnet_router" / "log.jsonl").read_text().splitlines()[0])
    tx = load_model(run / "stages" / "tx" / "models" / "model.pt")
    assert isinstance(tx, RelaxedClipTeacher) and not {"class0", "class1", "class2", "class3"} & set(tx.nouns)

    leak = Runner(load_config(CONFIGS / "wordnet_clip_all.yaml", [*AVDIGITS_ON_SYNTHETIC, *small]), run, resume=True,
                  fast_dev_run=True, progress=False).run()["stages"]
    assert leak["visual_strong"] == stages["visual_strong"]  # reused, not retrained
    assert load_model(run / "stages" / "tx_leak" / "models" / "model.pt").nouns == ["class0", "class1", "class2", "class3"]
    assert load_model(run / "stages" / "tx_oracle" / "models" / "model.pt").label_oracle
    assert "student" in leak["student_leak"]["models"] and "student" in leak["student_oracle"]["models"]


def test_tx_on_the_tiny_open_clip_backend(ctx, tmp_path):
    """Any CLIP backend fits T_x; open_clip (random tiny weights here) resizes the 12 x 12 images itself."""
    backend = {"name": "open_clip", "params": {"model_name": "tiny_open_clip"}}
    with pytest.warns(UserWarning, match="RANDOM"):
        method = build(ctx, "wordnet_clip", backend=backend, pool={"source": "tree", "depth": 2}, filtering={"k": 3, "top_m": 4},
                       teacher={"hidden": 8}, cache_dir=str(tmp_path))
    out, terms = method(ctx.sample_batch)
    assert out["logits"].shape == (16, 4) and out["relaxed"].shape == (16, 32)
    assert 0 < len(method.model.nouns) <= 12 and set(terms) == {"ce", "class", "pretrained"}
