"""The WordNet-relaxed CLIP teacher against the paper (Guo et al., arXiv 2503.24017) and its public code
(github.com/chenqiguo/CrossmodalKD, ``trainer_regularizerV2.py``): prompt templates, the ranking of the
image-aware filtering, each term of the hierarchical loss, and what the shipped configs run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from crossmodal_kd.bench import load_bench, student_epochs
from crossmodal_kd.clip.backends import ClipBackend
from crossmodal_kd.clip.nouns import PAPER_TEMPLATES, filter_nouns_by_images, noun_embeddings
from crossmodal_kd.config import load_config
from crossmodal_kd.losses import hierarchical_terms
from crossmodal_kd.methods.wordnet_clip import WordNetClip

CONFIGS = REPO / "configs" / "avdigits"


class RecordingText(ClipBackend):
    """Records every prompt it encodes; the embedding is irrelevant here."""

    def __init__(self):
        super().__init__(image_size=4)
        self.embed_dim, self.cache_key = 4, "recording-text"
        self.prompts: list[str] = []

    def _text_features(self, texts):
        self.prompts += texts
        return torch.ones(len(texts), self.embed_dim)


def test_pool_and_class_names_are_encoded_in_the_papers_7_templates(tmp_path):
    paper = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
             "a {} in a video game.", "art of the {}.", "a photo of the small {}."]
    assert list(PAPER_TEMPLATES) == paper
    backend = RecordingText()
    noun_embeddings(backend, ["barred owl", "side road"], cache_dir=tmp_path, progress=False)
    assert sorted(backend.prompts) == sorted(t.format(n) for t in paper for n in ["barred owl", "side road"])
    assert "itap of a barred owl." in backend.prompts
    fields = WordNetClip.Params.model_fields
    assert list(fields["templates"].default) == paper  # the pool
    assert fields["class_templates"].default is None  # the class names of the hierarchical loss: the same


# --------------------------------------------------------------------------- ranking inside a cluster

C0, C1 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
IMAGES = torch.stack([C0] * 3 + [C1] * 3)  # two image clusters: k-means' centres are exactly C0 and C1
NOUNS = ["a", "b", "c", "d", "e"]
NOUN_EMB = F.normalize(torch.tensor([[1.0, 0.9, 0.0], [0.6, 0.0, 0.8], [0.8, -0.6, 0.0], [0.0, 1.0, 0.0], [0.5, 1.0, 0.0]]), dim=1)
# s = cos(noun, C0), cos(noun, C1); p = softmax over the two centres = sigmoid(s_own - s_other)
#   a: 0.743, 0.669 -> C0, p = sigmoid(0.074) = 0.519      d: 0, 1     -> C1, p = sigmoid(1)     = 0.731
#   b: 0.600, 0     -> C0, p = sigmoid(0.600) = 0.646      e: 0.447, 0.894 -> C1, p = sigmoid(0.447) = 0.610
#   c: 0.800, -0.6  -> C0, p = sigmoid(1.400) = 0.802
BY_COSINE = {"C0": ["c", "a", "b"], "C1": ["d", "e"]}
BY_SOFTMAX = {"C0": ["c", "b", "a"], "C1": ["d", "e"]}


def _expected(selection, groups: dict[str, list[str]], top_m: int) -> list[str]:
    order = ["C0", "C1"] if torch.allclose(selection.centres[0], C0) else ["C1", "C0"]  # output is by centre
    return [n for centre in order for n in groups[centre][:top_m]]


@pytest.mark.parametrize("ranking, groups", [("cosine", BY_COSINE), ("softmax", BY_SOFTMAX)])
@pytest.mark.parametrize("top_m", [3, 2])
def test_nouns_of_a_cluster_ranked_by_cosine_or_softmax_over_centres(ranking, groups, top_m):
    s = NOUN_EMB @ torch.stack([C0, C1]).T
    p = s.softmax(dim=1)
    assert p[2, 0].item() == pytest.approx(1 / (1 + math.exp(-1.4)), abs=1e-6)  # the table above
    assert p[0, 0].item() == pytest.approx(1 / (1 + math.exp(-(1 - 0.9) / math.sqrt(1.81))), abs=1e-6)
    sel = filter_nouns_by_images(IMAGES, NOUNS, NOUN_EMB, k=2, top_m=top_m, ranking=ranking)
    torch.testing.assert_close(sel.centres.abs().sum(1), torch.ones(2))
    assert sel.nouns == _expected(sel, groups, top_m)
    assert torch.equal(sel.embeddings, NOUN_EMB[sel.indices])


def test_softmax_ranking_is_the_default():
    assert filter_nouns_by_images(IMAGES, NOUNS, NOUN_EMB, k=2, top_m=2).nouns == \
        filter_nouns_by_images(IMAGES, NOUNS, NOUN_EMB, k=2, top_m=2, ranking="softmax").nouns


# --------------------------------------------------------------------------- the hierarchical loss


def test_each_hierarchical_term_equals_its_formula_on_tiny_tensors():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    class_text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])  # (C, D), any norm
    relaxed = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 4.0]])  # (B, D)
    nouns = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)  # learned (M, D)
    pretrained = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 4.0]])  # initial (M, D)
    terms = hierarchical_terms(logits, labels, relaxed, class_text, nouns, pretrained)  # defaults 0.2, 0.005
    # CE: -log softmax at the label, batch mean
    ce = (-math.log(math.exp(2) / (math.exp(2) + 2)) + math.log(3)) / 2
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)
    # class: cos([1,0,0], [1,1,0]) = 1/sqrt(2); cos([0,0,2], [0,3,4]) = 8 / (2 * 5) = 0.8; batch mean
    assert terms["class"].item() == pytest.approx(0.2 * ((1 - 1 / math.sqrt(2)) + (1 - 0.8)) / 2, rel=1e-6)
    # pretrained (public code): row-wise cos(learned, initial) = 1 and 3/5; mean over the M rows
    assert terms["pretrained"].item() == pytest.approx(0.005 * ((1 - 1) + (1 - 0.6)) / 2, rel=1e-6)
    terms["pretrained"].backward()
    assert nouns.grad is not None and nouns.grad[0].abs().sum() == 0 and nouns.grad[1].abs().sum() > 0
    weighted = hierarchical_terms(logits, labels, relaxed, class_text, nouns, pretrained, w_class=1.0, w_pre=2.0)
    assert weighted["class"].item() == pytest.approx(terms["class"].item() / 0.2, rel=1e-6)
    assert weighted["pretrained"].item() == pytest.approx(2.0 * 0.2, rel=1e-6)


# --------------------------------------------------------------------------- the shipped configs


def test_tx_runs_the_papers_templates_and_filtering_on_a_seeded_noun_sample():
    tx = load_config(CONFIGS / "wordnet_clip.yaml").stage("tx").method.params
    assert tx["pool"]["source"] == "all" and tx["pool"]["max_nouns"] == 20000 and tx["pool"]["exclude_class_names"]
    assert "templates" not in tx and "class_templates" not in tx  # the defaults: the paper's 7
    assert tx["filtering"] == {"k": 150, "top_m": 5, "mode": "assign", "ranking": "softmax"}
    assert tx.get("pretrained_term", "nouns") == "nouns"
    leak = load_config(CONFIGS / "wordnet_clip_leak.yaml")
    for stage in ("tx_leak", "tx_oracle"):  # the exact class names, in the paper's 7 templates too
        assert "templates" not in leak.stage(stage).method.params


def test_wordnet_router_is_mst_distills_routed_router():
    wordnet = load_config(CONFIGS / "wordnet_clip.yaml").stage("student_wordnet_router").method.params
    mst = load_config(CONFIGS / "mst_distill.yaml").stage("routed").method.params
    assert wordnet["router"] == mst["router"] == {
        "name": "gate", "params": {"k": 1, "mode": "hard", "objective": "true_class", "input": "logits"}
    }
    assert wordnet["w_lb"] == mst["w_lb"]


def test_leak_ablation_is_a_five_seed_row_paired_with_the_no_kd_student():
    bench = load_bench(REPO / "configs" / "bench" / "wordnet_clip.yaml")
    assert bench.seeds == [0, 1, 2, 3, 4] and bench.reference == ["student only (no KD)"]
    (experiment,) = bench.experiments
    assert experiment.seeds is None  # the benchmark's five
    rows = {r.label: r for r in experiment.rows}
    reference, leak = rows["student only (no KD)"], rows["KD: visual + T_x on exact class names (leak)"]
    cfg = load_config(REPO / experiment.config)
    assert leak.stage == "student_leak"
    assert cfg.stage("tx_leak").method.params["pool"] == {"source": "class_names", "exclude_class_names": False}
    assert student_epochs(cfg, leak.stage) == student_epochs(cfg, reference.stage)  # same budget: paired statistics
