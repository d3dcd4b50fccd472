"""The WordNet noun pool of the relaxed CLIP teacher: nouns, their prompt embeddings, image-aware filtering.

Pipeline (Guo et al., arXiv 2503.24017): :func:`noun_pool` picks WordNet nouns and drops the class names and their WordNet
synonyms (so the teacher never reads its label); :func:`noun_embeddings` encodes each noun under the
paper's 7 prompt templates with a :class:`~crossmodal_kd.clip.backends.ClipBackend`, averages and
re-normalises, caching the result on disk; :func:`filter_nouns_by_images` keeps, per spherical k-means
centre of the training images' CLIP embeddings, the nouns that centre explains best.

The public code (github.com/chenqiguo/CrossmodalKD, ``trainer_regularizerV2.py``,
``get_CLIP_text_embeddings_WordNet``) encodes the whole WordNet noun list and filters it with k = 150
centres and the top 5 nouns per centre, for every dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from crossmodal_kd.clip.backends import ClipBackend
from crossmodal_kd.clip.wordnet import default_cache_root, load_wordnet
from crossmodal_kd.io import atomic_torch_save

log = logging.getLogger(__name__)

PAPER_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
"""The 7 templates of Guo et al. (arXiv 2503.24017); the public code's ``SIMPLE_IMAGENET_TEMPLATES``
(``trainer_regularizerV2.py``), used for the WordNet nouns (``get_prompt_WordNet``) and for the class names
of the hierarchical loss (``get_prompt_GT``) alike."""
DEFAULT_TEMPLATES = PAPER_TEMPLATES
"""The templates :func:`noun_embeddings` and the ``wordnet_clip`` method use unless told otherwise."""


@dataclass
class NounPool:
    """Pool nouns (lower case, spaces for underscores, sorted) and those removed as class names/synonyms."""

    nouns: list[str]
    excluded: list[str]


@dataclass
class NounSelection:
    """Nouns kept by :func:`filter_nouns_by_images`, with their embeddings and positions in the pool."""

    nouns: list[str]
    embeddings: torch.Tensor
    indices: torch.Tensor
    centres: torch.Tensor


# --------------------------------------------------------------------------- noun pools


def wordnet_nouns(wn=None) -> list[str]:
    """Every WordNet noun lemma (lower case, underscores as spaces), sorted and de-duplicated."""
    wn = wn or load_wordnet()
    return sorted({_as_text(name) for name in wn.all_lemma_names(pos="n")})


def tree_nouns(roots: Sequence[str], depth: int | None = None, wn=None) -> list[str]:
    """Lemma names of the root synsets (e.g. ``"entity.n.01"``) and their hyponyms (instances included)
    down to ``depth`` levels below them (``None``: all); lower case, sorted and de-duplicated."""
    from nltk.corpus.reader.wordnet import WordNetError

    wn = wn or load_wordnet()
    synsets = set()
    for name in roots:
        try:
            root = wn.synset(name)
        except (ValueError, WordNetError) as exc:
            raise ValueError(
                f"noun pool: unknown WordNet synset '{name}' in roots (write e.g. 'entity.n.01')"
            ) from exc
        synsets.add(root)
        synsets.update(root.closure(_hyponyms, depth=-1 if depth is None else depth))
    return sorted({_as_text(lemma) for s in synsets for lemma in s.lemma_names()})


def class_tree_nouns(class_names: Sequence[str], depth: int = 1, wn=None) -> list[str]:
    """The WordNet neighbourhood of the classes (the tree pool of Guo et al.): for every noun sense of every class
    name, its synonyms, hypernyms and hyponyms up to ``depth`` levels; lower case, sorted, de-duplicated."""
    wn = wn or load_wordnet()
    synsets = set()
    for name in class_names:
        for s in _noun_synsets(wn, name):
            synsets.add(s)
            synsets.update(s.closure(lambda x: x.hypernyms() + x.instance_hypernyms(), depth=depth))
            synsets.update(s.closure(_hyponyms, depth=depth))
    return sorted({_as_text(lemma) for s in synsets for lemma in s.lemma_names()})


def class_name_synonyms(class_names: Sequence[str], wn=None) -> dict[str, list[str]]:
    """For each class name: itself and every lemma of every WordNet noun sense of it, normalised
    (lower case, ``_``/``-`` as spaces). Multiword names ("golden retriever") are looked up as such."""
    wn = wn or load_wordnet()
    return {
        name: sorted(
            {_norm(name)} | {_norm(lemma) for s in _noun_synsets(wn, name) for lemma in s.lemma_names()}
        )
        for name in class_names
    }


def split_class_nouns(
    nouns: Sequence[str], class_names: Sequence[str], extra_names: Sequence[str] = (), wn=None
) -> tuple[list[str], list[str]]:
    """``(kept, excluded)``: ``excluded`` are exactly the nouns equal (normalised as in
    :func:`class_name_synonyms`) to a class name, one of its WordNet synonyms, or an extra name."""
    banned = {form for forms in class_name_synonyms(class_names, wn).values() for form in forms}
    banned |= {_norm(name) for name in extra_names}
    kept, excluded = [], []
    for noun in nouns:
        (excluded if _norm(noun) in banned else kept).append(noun)
    return kept, excluded


def noun_pool(
    source: Literal["all", "tree", "class_tree"] = "all",
    *,
    roots: Sequence[str] = ("entity.n.01",),
    depth: int | None = None,
    class_names: Sequence[str] = (),
    exclude_class_names: bool = True,
    extra_excluded: Sequence[str] = (),
    max_nouns: int | None = None,
    seed: int = 0,
    wn=None,
) -> NounPool:
    """The noun pool of the relaxed teacher.

    ``source``: ``"all"`` WordNet nouns; ``"tree"`` the hyponym closure of ``roots`` to ``depth``;
    ``"class_tree"`` synonyms, hypernyms and hyponyms of the classes to ``depth`` (default 1).
    With ``exclude_class_names`` (default) the class names, their WordNet synonyms and
    ``extra_excluded`` are removed (listed in ``excluded``). ``max_nouns`` then caps the pool by a
    ``seed``-deterministic random subsample (kept sorted).
    """
    wn = wn or load_wordnet()
    if source == "all":
        nouns = wordnet_nouns(wn)
    elif source == "tree":
        nouns = tree_nouns(roots, depth, wn)
    elif source == "class_tree":
        if not class_names:
            raise ValueError("noun pool: source 'class_tree' needs class_names")
        nouns = class_tree_nouns(class_names, 1 if depth is None else depth, wn)
    else:
        raise ValueError(f"noun pool: unknown source '{source}'; valid: all, tree, class_tree")
    excluded: list[str] = []
    if exclude_class_names:
        nouns, excluded = split_class_nouns(nouns, class_names, extra_excluded, wn)
    if max_nouns is not None and len(nouns) > max_nouns:
        nouns = sorted(random.Random(seed).sample(nouns, max_nouns))
    return NounPool(nouns=nouns, excluded=excluded)


def _hyponyms(s):
    return s.hyponyms() + s.instance_hyponyms()


def _noun_synsets(wn, name: str) -> list:
    key = "_".join(name.strip().lower().replace("_", " ").split())
    return wn.synsets(key, pos="n") or wn.synsets(key.replace("-", "_"), pos="n")


def _as_text(lemma: str) -> str:
    return lemma.replace("_", " ").lower()


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").replace("-", " ").split())


# --------------------------------------------------------------------------- embeddings


def noun_embeddings(
    backend: ClipBackend,
    nouns: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """(len(nouns), embed_dim) unit-norm embeddings: each noun in every template (default the paper's 7),
    averaged, re-normalised. Each template's embedding is unit norm before the average (the backend's
    ``encode_text``), as in CLIP's prompt ensembling; the public code averages CLIP's raw text features.

    Computed once, ``batch_size`` nouns (x templates prompts) per encoder call, and cached in
    ``cache_dir`` (default ``<cache root>/noun_embeddings``) under a key of ``backend.cache_key``, the
    templates and the noun list; the next call with the same three reads the file. Returned on the
    backend's device, float32.
    """
    nouns, templates = list(nouns), list(templates)
    if not templates:
        raise ValueError("noun embeddings: give at least one template")
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"noun embeddings: template {t!r} must contain '{{}}' exactly once")
    key = _cache_key(backend.cache_key, templates, nouns)
    path = Path(cache_dir) if cache_dir else default_cache_root() / "noun_embeddings"
    path = path / f"nouns-{key}.pt"
    cached = _load_cached(path, backend.cache_key, templates, nouns)
    if cached is not None:
        return cached.to(backend.device)
    chunks = []
    for start in tqdm(
        range(0, len(nouns), batch_size), desc="noun embeddings", unit="batch", disable=not progress
    ):
        batch = nouns[start : start + batch_size]
        prompts = [t.format(noun) for t in templates for noun in batch]
        emb = backend.encode_text(prompts, batch_size=len(prompts)).view(len(templates), len(batch), -1)
        chunks.append(F.normalize(emb.mean(0), dim=-1).cpu())
    embeddings = torch.cat(chunks) if chunks else torch.empty(0, backend.embed_dim)
    atomic_torch_save(
        {"backend": backend.cache_key, "templates": templates, "nouns": nouns, "embeddings": embeddings}, path
    )
    log.info("noun embeddings: %d nouns x %d templates cached in %s", len(nouns), len(templates), path)
    return embeddings.to(backend.device)


def _cache_key(backend_key: str, templates: list[str], nouns: list[str]) -> str:
    nouns_hash = hashlib.sha256("\n".join(nouns).encode()).hexdigest()
    blob = json.dumps({"backend": backend_key, "templates": templates, "nouns": nouns_hash})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_cached(path: Path, backend_key: str, templates: list[str], nouns: list[str]) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["backend"] == backend_key and saved["templates"] == templates and saved["nouns"] == nouns:
            return saved["embeddings"]
        log.warning("noun embeddings: %s holds other nouns/templates/backend; recomputing", path)
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, pickle.UnpicklingError) as exc:
        # a truncated or foreign file is regenerated, never trusted
        log.warning("noun embeddings: cannot read %s (%s); recomputing", path, exc)
    return None


# --------------------------------------------------------------------------- image-aware filtering


def spherical_kmeans(
    x: torch.Tensor, k: int, *, iters: int = 100, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine k-means of the rows of ``x`` (N, D): ``(centres (k, D) unit norm, assignment (N,))``.

    k-means++ initialisation drawn with ``seed``; Lloyd steps (assign to the most similar centre, centre
    = re-normalised mean) until the assignment stops changing or ``iters`` steps. An emptied cluster
    is re-seeded with the point least similar to its own centre. Deterministic for a given seed.
    """
    x = F.normalize(x.float(), dim=-1)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"spherical k-means: k={k} must be between 1 and the number of points ({n})")
    gen = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    dist = (1 - x @ x[chosen[0]]).clamp_min(0)  # = squared euclidean / 2 on the sphere
    for _ in range(1, k):
        weights = dist.cpu().double()
        if weights.sum() <= 0:  # every point coincides with a centre already
            weights = torch.ones(n, dtype=torch.float64)
        chosen.append(int(torch.multinomial(weights, 1, generator=gen)))
        dist = torch.minimum(dist, (1 - x @ x[chosen[-1]]).clamp_min(0))
    centres = x[chosen].clone()
    assign = torch.full((n,), -1, dtype=torch.long, device=x.device)
    for _ in range(iters):
        sims = x @ centres.T
        new = sims.argmax(1)
        if torch.equal(new, assign):
            break
        assign = new
        centres = F.normalize(torch.zeros_like(centres).index_add_(0, assign, x), dim=-1)
        empty = torch.nonzero(torch.bincount(assign, minlength=k) == 0).flatten()
        if len(empty):
            own = sims.gather(1, assign[:, None]).squeeze(1)
            centres[empty] = x[own.argsort(stable=True)[: len(empty)]]
    return centres, assign


def filter_nouns_by_images(
    image_embeddings: torch.Tensor,
    nouns: Sequence[str],
    noun_embeddings: torch.Tensor,
    *,
    k: int = 150,
    top_m: int = 5,
    mode: Literal["assign", "nearest"] = "assign",
    ranking: Literal["softmax", "cosine"] = "softmax",
    iters: int = 100,
    seed: int = 0,
) -> NounSelection:
    """Image-aware noun filtering: spherical k-means on the image embeddings (N, D), then per centre
    the ``top_m`` best-ranked nouns; at most ``k * top_m`` nouns. Defaults: the paper's k = 150, top 5.

    ``mode="assign"`` (the paper, Guo et al.): every noun belongs to its most similar centre, and each
    centre keeps its ``top_m`` best (a centre that owns no noun keeps none). ``mode="nearest"``: each
    centre takes its ``top_m`` best nouns of the whole pool; the union is kept.

    ``ranking``, how a centre ranks its nouns, with ``s_ij = cos(noun_i, centre_j)``:

    - ``"softmax"`` (public code, ``get_CLIP_text_embeddings_WordNet``): ``p_ij = softmax_j(s_ij)``, the
      probability of centre j among all centres for noun i (temperature 1). It favours nouns that fit their
      centre *and no other*: a generic noun close to every centre ranks low.
    - ``"cosine"``: ``s_ij`` itself, the nouns closest to the centre whatever their similarity to the others.

    The owner of a noun is the same under both (the softmax is monotone in ``s_ij``). Output order: by
    centre, then by rank (best first), first occurrence only.
    """
    if mode not in ("assign", "nearest"):
        raise ValueError(f"noun filtering: unknown mode '{mode}'; valid: assign, nearest")
    if ranking not in ("softmax", "cosine"):
        raise ValueError(f"noun filtering: unknown ranking '{ranking}'; valid: softmax, cosine")
    nouns = list(nouns)
    if noun_embeddings.shape[0] != len(nouns):
        raise ValueError(f"noun filtering: {len(nouns)} nouns but {noun_embeddings.shape[0]} noun embeddings")
    if noun_embeddings.shape[1] != image_embeddings.shape[1]:
        raise ValueError(
            f"noun filtering: image embeddings are {image_embeddings.shape[1]}-d, noun embeddings "
            f"{noun_embeddings.shape[1]}-d: encode both with the same backend"
        )
    centres, _ = spherical_kmeans(image_embeddings, k, iters=iters, seed=seed)
    nouns_n = F.normalize(noun_embeddings.float().to(centres.device), dim=-1)
    sims = nouns_n @ centres.T  # (M, k)
    scores = sims.softmax(dim=1) if ranking == "softmax" else sims
    if mode == "assign":
        owner = sims.argmax(1)
        scores = torch.where(owner[:, None] == torch.arange(k, device=sims.device), scores, float("-inf"))
    top = scores.topk(min(top_m, len(nouns)), dim=0)  # (top_m, k), best first
    ordered: dict[int, None] = {}  # an insertion-ordered set
    for j in range(k):
        for value, i in zip(top.values[:, j].tolist(), top.indices[:, j].tolist()):
            if value != float("-inf"):
                ordered.setdefault(i)
    keep = list(ordered)
    indices = torch.tensor(keep, dtype=torch.long)
    return NounSelection(
        nouns=[nouns[i] for i in keep],
        embeddings=noun_embeddings[indices.to(noun_embeddings.device)],
        indices=indices,
        centres=centres,
    )
