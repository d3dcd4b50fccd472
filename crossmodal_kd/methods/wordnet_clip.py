"""``wordnet_clip``: train T_x, the WordNet-relaxed CLIP teacher (Guo et al., arXiv 2503.24017).

Building the stage:

1. the CLIP ``backend`` (``CLIP_BACKENDS``; ``text_aligned`` offline, whose ``image_model`` may be a
   ``{stage: <align stage>}`` reference);
2. the noun ``pool``: WordNet nouns (:func:`~crossmodal_kd.clip.nouns.noun_pool`: ``source`` all / tree /
   class_tree, ``max_nouns``, ...; default every WordNet noun, as the paper) with the class names and their
   WordNet synonyms removed (``exclude_class_names``, default on), or, for the leakage ablation only,
   ``source: class_names``: the exact class names (requires ``exclude_class_names: false``);
3. their prompt embeddings (``templates``, default the paper's 7), cached on disk (``cache_dir``, default
   the cache root's ``noun_embeddings/``): a second run with the same backend, templates and pool reads the
   file;
4. image-aware ``filtering`` (:func:`~crossmodal_kd.clip.nouns.filter_nouns_by_images`: ``k``, ``top_m``,
   ``mode``, ``ranking``, ``iters``, ``seed``; default the paper's k = 150, top 5, softmax ranking): spherical
   k-means on the backend's embeddings of the *training* split (``null``: keep the whole pool);
5. T_x, a ``relaxed_clip`` network (:mod:`crossmodal_kd.clip.relaxed`) over the kept nouns, its noun
   matrix initialised from their embeddings.

Training: the hierarchical loss ``CE + w_class mean_i (1 - cos(n_class, n_relaxed)) + w_pre mean_j (1 -
cos(N_j, N0_j))`` (:func:`~crossmodal_kd.losses.hierarchical_terms`), with ``n_class`` the class-name prompt
embedding (``class_templates``, default ``templates``) of each sample's label, in the loss only, never an
input of T_x, and ``N``, ``N0`` the learned and the initial noun matrix (``pretrained_term``). The noun rows
are renormalised after every optimizer step. Saved model: ``model`` (T_x), a teacher of the zoo.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

import torch
from accelerate import PartialState

from crossmodal_kd.clip.backends import build_clip_backend
from crossmodal_kd.clip.nouns import (
    DEFAULT_TEMPLATES,
    NounPool,
    filter_nouns_by_images,
    noun_embeddings,
    noun_pool,
)
from crossmodal_kd.clip.wordnet import wordnet_problem
from crossmodal_kd.config import ConfigError
from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.models.io import attach_spec
from crossmodal_kd.losses import hierarchical_terms
from crossmodal_kd.methods.base import Method
from crossmodal_kd.params import NonNegativeFloat, Params as BaseParams, PositiveFloat, PositiveInt, record
from crossmodal_kd.registry import METHODS, NETWORKS, check_kwargs

log = logging.getLogger(__name__)

FILTER_KEYS = {"k", "top_m", "mode", "ranking", "iters", "seed"}
Filtering = record(
    "Filtering", k=PositiveInt, top_m=PositiveInt, mode=Literal["assign", "nearest"],
    ranking=Literal["softmax", "cosine"], iters=PositiveInt, seed=int,
)
"""The keyword arguments of :func:`filter_nouns_by_images` a config may set, typed."""
# a fast-dev-run's caps: WordNet nouns sampled for the pool, k-means clusters and Lloyd steps
FAST_DEV_NOUNS = 64
FAST_DEV_CLUSTERS = 8
FAST_DEV_KMEANS_ITERS = 5


def class_name_pool(class_names: Sequence[str], exclude_class_names: bool = True) -> NounPool:
    """The leakage ablation's pool: the exact class names, nothing else. ``exclude_class_names`` defaults to
    true as for every pool, so the ablation must say ``false`` explicitly."""
    if exclude_class_names:
        raise ConfigError(
            "pool.source 'class_names' feeds the exact class names to T_x (the label-leakage ablation); "
            "set pool.exclude_class_names: false to confirm"
        )
    return NounPool(nouns=list(class_names), excluded=[])


POOL_SOURCES = {"class_names": class_name_pool}
"""Pool sources besides WordNet's ``all``, ``tree`` and ``class_tree`` (:func:`noun_pool`)."""


@METHODS.register("wordnet_clip")
class WordNetClip(Method):
    """Train T_x on the image modality (see the module docstring for the steps and parameters).

    ``backend``: ``{name, params}``. ``pool``: :func:`noun_pool` keywords (``source``, ``roots``, ``depth``,
    ``exclude_class_names``, ``extra_excluded``, ``max_nouns``, ``seed``) or ``source: class_names``.
    ``filtering``: ``{k, top_m, mode, ranking, iters, seed}`` or ``null``. ``teacher``: T_x's ``{hidden,
    dropout}`` (and ``label_oracle: true`` for the naive label-leak ablation only, see
    :mod:`crossmodal_kd.clip.relaxed`). ``class_names``: override the dataset's.

    ``pretrained_term``, what the ``w_pre`` term keeps near its pretrained value:

    - ``"nouns"`` (public code, ``trainer_regularizerV2.py``: ``(1 - F.cosine_similarity(nouns_embedding,
      nouns_embedding_pretrained)).mean()``): every row of the learned noun matrix, mean over the M nouns.
    - ``"relaxed"``: each sample's relaxed embedding over the learned matrix vs over the initial one, mean
      over the batch. It constrains what T_x reads rather than parameters: nouns are weighted by how often
      images retrieve them (a noun no image retrieves is free), the pull on a retrieved row does not shrink
      as 1/M with the number of nouns, and a change of *which* noun an image retrieves (each row having
      moved a little) is penalised, which the row-wise term cannot see.
    """

    class Params(BaseParams):
        backend: dict[str, Any]
        pool: dict[str, Any] | None = None
        filtering: Filtering | None = None
        templates: Sequence[str] = DEFAULT_TEMPLATES
        class_templates: Sequence[str] | None = None
        teacher: dict[str, Any] | None = None
        modality: str = "image"
        temperature: PositiveFloat = 0.005
        w_class: NonNegativeFloat = 0.2
        w_pre: NonNegativeFloat = 0.005
        pretrained_term: Literal["nouns", "relaxed"] = "nouns"
        class_names: Sequence[str] | None = None
        cache_dir: str | None = None
        batch_size: PositiveInt = 512

    @staticmethod
    def preflight(params: dict[str, Any], where: str) -> None:
        """Checked before any stage trains: a WordNet pool needs the WordNet database (the leakage pool does not)."""
        if (params.get("pool") or {}).get("source") in POOL_SOURCES:
            return
        if problem := wordnet_problem():
            raise ConfigError(f"{where}.pool: {problem}")

    def __init__(self, ctx: BuildContext, params: WordNetClip.Params) -> None:
        super().__init__(ctx)
        started = time.perf_counter()
        backend, filtering, templates, modality = params.backend, params.filtering, params.templates, params.modality
        names = ctx.class_names_or(params.class_names)
        if modality not in ctx.input_shapes:
            raise ConfigError(f"{ctx.where}.modality: '{modality}' not in the data; have {', '.join(ctx.input_shapes)}")
        self.w_class, self.w_pre, self.pretrained_term = float(params.w_class), float(params.w_pre), params.pretrained_term
        state = PartialState()
        backend_spec = ctx.backend_spec(backend)
        clip = build_clip_backend(backend_spec["name"], backend_spec.get("params")).to(state.device).eval()

        # 2-3. the pool and its (cached) prompt embeddings; rank 0 encodes, the others read its cache
        pool_ = self._pool(ctx, names, dict(params.pool or {}))
        with state.main_process_first():
            t0 = time.perf_counter()
            pool_emb = noun_embeddings(clip, pool_.nouns, templates, cache_dir=params.cache_dir, progress=False)
            class_text = noun_embeddings(clip, names, params.class_templates or templates, cache_dir=params.cache_dir, progress=False)
            self.encode_seconds = time.perf_counter() - t0

        # 4. image-aware filtering on the training split's image embeddings
        if filtering is None:
            kept, kept_emb = list(pool_.nouns), pool_emb
        else:
            unknown = set(filtering) - FILTER_KEYS
            if unknown:
                raise ConfigError(f"{ctx.where}.filtering: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(FILTER_KEYS))}")
            images = torch.cat(
                [clip.encode_image(b[modality]) for b in ctx.train_batches(params.batch_size)]
            )
            k = ctx.bound(int(filtering.get("k", 150)), FAST_DEV_CLUSTERS)
            if not 1 <= k <= len(images):
                raise ConfigError(f"{ctx.where}.filtering.k: {k} clusters for {len(images)} training images")
            filtering = {**filtering, "k": k}
            if ctx.fast_dev_run:
                filtering["iters"] = ctx.bound(filtering.get("iters"), FAST_DEV_KMEANS_ITERS)
            selection = filter_nouns_by_images(images, pool_.nouns, pool_emb, **filtering)
            kept, kept_emb = selection.nouns, selection.embeddings
        self.noun_counts = {"nouns/pool": len(pool_.nouns), "nouns/excluded": len(pool_.excluded), "nouns/kept": len(kept)}
        log.info(
            "%s: noun pool %d (class names and synonyms excluded: %d%s), kept %d after filtering; "
            "text encoding %.1f s, build %.1f s",
            ctx.where, len(pool_.nouns), len(pool_.excluded),
            f": {', '.join(pool_.excluded[:20])}{' ...' if len(pool_.excluded) > 20 else ''}" if pool_.excluded else "",
            len(kept), self.encode_seconds, time.perf_counter() - started,
        )
        del clip  # T_x builds its own (frozen, outside its module tree); this one only encoded texts

        # 5. T_x
        net_params = {
            "backend": backend_spec, "nouns": kept, "modality": modality, "temperature": float(params.temperature), **(params.teacher or {})
        }
        if net_params.get("label_oracle") and kept != names:
            raise ConfigError(f"{ctx.where}.teacher.label_oracle: needs pool source class_names and filtering: null")
        context = {"input_shapes": ctx.input_shapes, "num_classes": ctx.num_classes}
        net = NETWORKS.build("relaxed_clip", net_params, where=f"{ctx.where}.teacher", **context)
        self.model = attach_spec(net, "networks", "relaxed_clip", net_params, context)
        self.model.set_nouns(kept_emb.cpu())
        self.register_buffer("class_text", class_text.cpu(), persistent=False)  # loss only, never an input

    @staticmethod
    def _pool(ctx: BuildContext, names: list[str], params: dict[str, Any]) -> NounPool:
        builder = POOL_SOURCES.get(params.get("source", "all"), noun_pool)
        if builder is not noun_pool:
            params.pop("source")
        check_kwargs(builder, params, where=f"{ctx.where}.pool", reserved={"class_names", "wn"})
        if builder is noun_pool and ctx.fast_dev_run:  # a small random sample of the pool (noun encoding)
            params["max_nouns"] = ctx.bound(params.get("max_nouns"), FAST_DEV_NOUNS)
        try:
            return builder(class_names=names, **params)
        except (ConfigError, ValueError) as exc:
            raise ConfigError(f"{ctx.where}.pool: {exc}") from None

    def forward(self, batch):
        out = self.model(batch)
        if self.pretrained_term == "nouns":
            current, pretrained = self.model.noun_embeddings, self.model.pretrained_nouns
        else:
            current, pretrained = out["relaxed"], out["relaxed_pretrained"]
        terms = hierarchical_terms(
            out["logits"], batch["label"], out["relaxed"], self.class_text, current, pretrained, self.w_class, self.w_pre
        )
        return out, terms

    def after_step(self) -> None:
        self.model.renormalize_nouns()

    def epoch_info(self) -> dict[str, float]:
        return dict(self.noun_counts)

    def models(self):
        return {"model": self.model}
