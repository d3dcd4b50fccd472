"""The noun pool: WordNet sources, class-name exclusion, cached prompt embeddings, image-aware filtering."""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch
import torch.nn.functional as F

from crossmodal_kd.clip.backends import ClipBackend
from crossmodal_kd.clip.nouns import (
    DEFAULT_TEMPLATES,
    PAPER_TEMPLATES,
    class_name_synonyms,
    filter_nouns_by_images,
    noun_embeddings,
    noun_pool,
    spherical_kmeans,
    split_class_nouns,
    tree_nouns,
    wordnet_nouns,
)
from crossmodal_kd.clip.wordnet import load_wordnet


@pytest.fixture(scope="module")
def wn(tmp_path_factory):
    return load_wordnet(nltk_data=tmp_path_factory.getbasetemp() / "nltk_data")


class HashText(ClipBackend):
    """Text embedding = a fixed random vector per string (seeded by its hash); counts encoder calls."""

    def __init__(self, dim: int = 16, key: str = "hash-text"):
        super().__init__(image_size=4)
        self.embed_dim, self.cache_key = dim, key
        self.calls = 0

    def _text_features(self, texts):
        self.calls += 1
        return torch.stack([vector(t, self.embed_dim) for t in texts])


def vector(text: str, dim: int) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- pools and exclusion


def test_wordnet_nouns_are_lemmas_with_spaces_sorted_and_unique(wn):
    nouns = wordnet_nouns(wn)
    assert len(nouns) > 100_000
    assert nouns == sorted(set(nouns))
    assert "domestic dog" in nouns and "golden retriever" in nouns
    assert not [n for n in nouns if "_" in n or n != n.lower()]


def test_class_names_and_their_synonyms_never_survive(wn):
    synonyms = class_name_synonyms(["dog", "seven", "Hot_Dog", "T-shirt"], wn)
    assert {"dog", "domestic dog", "canis familiaris", "hound"} <= set(synonyms["dog"])
    assert {"seven", "7", "vii", "heptad", "septet"} <= set(synonyms["seven"])
    assert {"hot dog", "frankfurter", "wiener"} <= set(synonyms["Hot_Dog"])  # multiword, any case / separator
    assert {"t shirt", "tee shirt"} <= set(synonyms["T-shirt"])
    pool = noun_pool(class_names=["dog", "seven"], extra_excluded=["Puppy"], wn=wn)
    banned = {form for forms in class_name_synonyms(["dog", "seven"], wn).values() for form in forms}
    assert not banned & {n.replace("-", " ") for n in pool.nouns}
    assert "puppy" not in pool.nouns and "puppy" in pool.excluded  # user-given extra name
    assert {"dog", "domestic dog", "7", "vii", "seven-spot", "dog-iron"} <= set(pool.excluded)
    assert {"canine", "pug", "eight"} <= set(pool.nouns)  # hypernyms, hyponyms, neighbours stay
    everything = wordnet_nouns(wn)
    assert sorted(pool.nouns + pool.excluded) == everything  # excluded is exactly what was removed
    kept, excluded = split_class_nouns(["Dog", "cat", "7", "eight"], ["dog", "seven"], wn=wn)
    assert (kept, excluded) == (["cat", "eight"], ["Dog", "7"])
    assert noun_pool(class_names=["dog"], exclude_class_names=False, wn=wn).nouns == everything


def test_unknown_class_names_exclude_only_themselves(wn):
    assert class_name_synonyms(["NEU", "xqzzy"], wn) == {"NEU": ["neu"], "xqzzy": ["xqzzy"]}


def test_tree_pools_and_the_deterministic_cap(wn):
    assert tree_nouns(["entity.n.01"], 1, wn) == [
        "abstract entity",
        "abstraction",
        "entity",
        "physical entity",
        "thing",
    ]
    assert len(tree_nouns(["entity.n.01"], 2, wn)) > 5
    pool = noun_pool("tree", roots=["entity.n.01"], depth=1, class_names=["thing"], wn=wn)
    assert "thing" in pool.excluded and "thing" not in pool.nouns and "entity" in pool.nouns
    neighbourhood = noun_pool("class_tree", class_names=["seven"], wn=wn)
    assert {"digit", "figure"} <= set(neighbourhood.nouns)  # hypernyms of seven.n.01 at depth 1
    assert "seven" in neighbourhood.excluded
    a = noun_pool(max_nouns=50, seed=0, wn=wn).nouns
    assert len(a) == 50 and a == sorted(a) and a == noun_pool(max_nouns=50, seed=0, wn=wn).nouns
    assert a != noun_pool(max_nouns=50, seed=1, wn=wn).nouns
    with pytest.raises(ValueError, match="unknown WordNet synset 'entity.x.99'"):
        tree_nouns(["entity.x.99"], 1, wn)
    with pytest.raises(ValueError, match="unknown source 'everything'; valid: all, tree, class_tree"):
        noun_pool("everything", wn=wn)
    with pytest.raises(ValueError, match="'class_tree' needs class_names"):
        noun_pool("class_tree", wn=wn)


# --------------------------------------------------------------------------- embeddings and their cache


def test_noun_embeddings_average_templates_and_are_cached(tmp_path):
    backend = HashText()
    nouns = ["dog", "maple tree", "origami crane", "seven", "hot dog"]
    emb = noun_embeddings(backend, nouns, cache_dir=tmp_path, batch_size=2, progress=False)
    assert emb.shape == (5, 16) and backend.calls == 3  # ceil(5 / 2) encoder calls
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5))
    per_template = torch.stack(
        [F.normalize(torch.stack([vector(t.format(n), 16) for n in nouns]), dim=1) for t in DEFAULT_TEMPLATES]
    )
    torch.testing.assert_close(emb, F.normalize(per_template.mean(0), dim=1))
    assert len(list(tmp_path.glob("nouns-*.pt"))) == 1

    again = noun_embeddings(backend, nouns, PAPER_TEMPLATES, cache_dir=tmp_path, progress=False)
    assert backend.calls == 3  # the default templates are the paper's: read from the cache, nothing encoded
    assert torch.equal(again, emb)
    noun_embeddings(backend, nouns, ["a photo of a {}."], cache_dir=tmp_path, progress=False)
    noun_embeddings(backend, nouns[:4], cache_dir=tmp_path, progress=False)
    noun_embeddings(HashText(key="other-weights"), nouns, cache_dir=tmp_path, progress=False)
    assert backend.calls == 5 and len(list(tmp_path.glob("nouns-*.pt"))) == 4  # each key its own file


def test_a_corrupt_cache_file_is_recomputed(tmp_path, caplog):
    backend = HashText()
    emb = noun_embeddings(backend, ["dog", "cat"], cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.glob("nouns-*.pt")
    path.write_bytes(path.read_bytes()[:50])
    with caplog.at_level(logging.WARNING, logger="crossmodal_kd.clip.nouns"):
        again = noun_embeddings(backend, ["dog", "cat"], cache_dir=tmp_path, progress=False)
    assert "cannot read" in caplog.text and backend.calls == 2
    torch.testing.assert_close(again, emb)
    with pytest.raises(ValueError, match=r"template 'a photo' must contain '\{\}' exactly once"):
        noun_embeddings(backend, ["dog"], ["a photo"], cache_dir=tmp_path)


def test_noun_embeddings_with_tiny_open_clip(wn, tmp_path):
    from crossmodal_kd.clip.backends import build_clip_backend

    with pytest.warns(UserWarning, match="RANDOM"):
        backend = build_clip_backend("open_clip", {"model_name": "tiny_open_clip"})
    pool = noun_pool("tree", roots=["entity.n.01"], depth=1, wn=wn)
    emb = noun_embeddings(backend, pool.nouns, PAPER_TEMPLATES, cache_dir=tmp_path, progress=False)
    assert emb.shape == (5, 32)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5))


# --------------------------------------------------------------------------- spherical k-means and filtering


def blobs(directions: list[int], n: int = 20, dim: int = 6, noise: float = 0.05, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    points, labels = [], []
    for label, axis in enumerate(directions):
        centre = torch.zeros(dim)
        centre[axis] = 1.0
        points.append(centre + noise * torch.randn(n, dim, generator=gen))
        labels += [label] * n
    return torch.cat(points), torch.tensor(labels)


def test_spherical_kmeans_finds_separated_clusters_deterministically():
    x, labels = blobs([0, 1, 2])
    centres, assign = spherical_kmeans(x, 3, seed=0)
    torch.testing.assert_close(centres.norm(dim=1), torch.ones(3))
    for c in range(3):  # each true cluster is one k-means cluster, whatever its number
        assert assign[labels == c].unique().numel() == 1
    assert assign.unique().numel() == 3
    again_c, again_a = spherical_kmeans(x, 3, seed=0)
    assert torch.equal(again_a, assign) and torch.equal(again_c, centres)
    with pytest.raises(ValueError, match=r"k=61 must be between 1 and the number of points \(60\)"):
        spherical_kmeans(x, 61)


def test_spherical_kmeans_survives_duplicate_points():
    x = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]])
    centres, assign = spherical_kmeans(x, 3, seed=0)
    assert torch.isfinite(centres).all() and assign.shape == (6,)


def unit(*pairs: tuple[int, float], dim: int = 6) -> torch.Tensor:
    v = torch.zeros(dim)
    for axis, value in pairs:
        v[axis] = value
    return F.normalize(v, dim=0)


NOUNS = ["alpha", "alpha2", "alpha3", "beta", "far"]
NOUN_EMB = torch.stack(
    [unit((0, 1)), unit((0, 1), (1, 0.4)), unit((0, 1), (2, 0.2)), unit((1, 1)), unit((0, 0.3), (5, 1))]
)


def test_filter_keeps_the_nouns_nearest_each_image_cluster():
    images, _ = blobs([0, 1])  # two image clusters, around axis 0 ("alpha") and axis 1 ("beta")
    sel = filter_nouns_by_images(images, NOUNS, NOUN_EMB, k=2, top_m=1)
    assert sorted(sel.nouns) == ["alpha", "beta"]
    assert torch.equal(sel.embeddings, NOUN_EMB[sel.indices])
    assert [NOUNS[i] for i in sel.indices] == sel.nouns
    # paper mode: alpha2 (and far) belong to the alpha centre, so the beta centre keeps only beta
    sel = filter_nouns_by_images(images, NOUNS, NOUN_EMB, k=2, top_m=2, mode="assign")
    assert sorted(sel.nouns) == ["alpha", "alpha3", "beta"]
    assert sel.nouns.index("alpha") < sel.nouns.index("alpha3")  # by similarity within a centre
    # nearest mode: every centre takes its own top 2 from the whole pool. By cosine the beta centre's second
    # is alpha2 (cos 0.37 to it); by the softmax over centres it is far (0.29 to alpha's centre, 0 to beta's:
    # p = 0.43 against alpha2's 0.36, whose cos 0.93 to alpha's centre makes it alpha's noun)
    sel = filter_nouns_by_images(images, NOUNS, NOUN_EMB, k=2, top_m=2, mode="nearest", ranking="cosine")
    assert sorted(sel.nouns) == ["alpha", "alpha2", "alpha3", "beta"]
    sel = filter_nouns_by_images(images, NOUNS, NOUN_EMB, k=2, top_m=2, mode="nearest")
    assert sorted(sel.nouns) == ["alpha", "alpha3", "beta", "far"]
    assert sel.nouns == filter_nouns_by_images(images, NOUNS, NOUN_EMB, k=2, top_m=2, mode="nearest").nouns


def test_filter_errors_name_the_mismatch():
    images, _ = blobs([0, 1])
    with pytest.raises(ValueError, match="5 nouns but 4 noun embeddings"):
        filter_nouns_by_images(images, NOUNS, NOUN_EMB[:4], k=2)
    with pytest.raises(ValueError, match="image embeddings are 6-d, noun embeddings 3-d"):
        filter_nouns_by_images(images, NOUNS, NOUN_EMB[:, :3], k=2)
    with pytest.raises(ValueError, match="unknown mode 'best'; valid: assign, nearest"):
        filter_nouns_by_images(images, NOUNS, NOUN_EMB, k=2, mode="best")
    with pytest.raises(ValueError, match="unknown ranking 'dot'; valid: softmax, cosine"):
        filter_nouns_by_images(images, NOUNS, NOUN_EMB, k=2, ranking="dot")
