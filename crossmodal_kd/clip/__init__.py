"""The WordNet-relaxed CLIP teacher's foundation (Guo et al., arXiv 2503.24017): offline WordNet, CLIP backends, the noun pool.

- :mod:`~crossmodal_kd.clip.wordnet`: ``load_wordnet()``, nltk's reader, prepared offline from the
  Debian WordNet database when nltk has no data.
- :mod:`~crossmodal_kd.clip.backends`: ``ClipBackend`` (one interface for image and text encoders),
  the ``CLIP_BACKENDS`` registry, its ``open_clip`` backend and ``text_aligned``, the offline stand-in
  (a locked pretrained text encoder and an image network aligned to it by an ``align_to_text`` stage).
- :mod:`~crossmodal_kd.clip.nouns`: noun pools without the class names, cached prompt embeddings,
  spherical k-means image-aware filtering.
- :mod:`~crossmodal_kd.clip.relaxed`: the WordNet-relaxed CLIP teacher (``NETWORKS``: ``relaxed_clip``).
- :mod:`~crossmodal_kd.clip.router`: TMKD's text-guided view router (``ROUTERS``: ``text_guided``).

Heavy imports (open_clip, nltk) happen on first use, so importing this package is cheap.
"""

from crossmodal_kd.clip.backends import CLIP_BACKENDS, ClipBackend, OpenClipBackend, TextAlignedBackend, build_clip_backend
from crossmodal_kd.clip.nouns import (
    DEFAULT_TEMPLATES,
    PAPER_TEMPLATES,
    NounPool,
    NounSelection,
    class_name_synonyms,
    class_tree_nouns,
    filter_nouns_by_images,
    noun_embeddings,
    noun_pool,
    spherical_kmeans,
    split_class_nouns,
    tree_nouns,
    wordnet_nouns,
)
from crossmodal_kd.clip.relaxed import RelaxedClipTeacher
from crossmodal_kd.clip.router import TEXT_GUIDED_PROMPTS, TextGuidedRouter
from crossmodal_kd.clip.wordnet import WordNetUnavailableError, load_wordnet, prepare_wordnet

__all__ = [
    "CLIP_BACKENDS",
    "DEFAULT_TEMPLATES",
    "PAPER_TEMPLATES",
    "TEXT_GUIDED_PROMPTS",
    "ClipBackend",
    "NounPool",
    "NounSelection",
    "OpenClipBackend",
    "RelaxedClipTeacher",
    "TextAlignedBackend",
    "TextGuidedRouter",
    "WordNetUnavailableError",
    "build_clip_backend",
    "class_name_synonyms",
    "class_tree_nouns",
    "filter_nouns_by_images",
    "load_wordnet",
    "noun_embeddings",
    "noun_pool",
    "prepare_wordnet",
    "spherical_kmeans",
    "split_class_nouns",
    "tree_nouns",
    "wordnet_nouns",
]
