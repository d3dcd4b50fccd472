"""``textdigits``: the offline image-text example, built by the project (nothing is downloaded).

Images are avdigits' image side (scikit-learn's handwritten digits, PCA-degraded, per-pair noise).
Each pair gets a short caption generated from templates: the digit is named in one of several
surface forms (word, numeral, roman numeral, synonyms) amid filler words; a fraction of the captions
name no digit, some name a distractor digit beside the true one (in random order, so the text cannot
tell which), some name only a wrong digit (annotation errors), and words get typos. Text alone is
imperfect by design, like the images.

The cache ``<root>/textdigits/v<version>-<hash of seed and recipe>`` holds ``image.npy``,
``caption.npy`` (strings), ``label.npy``, ``split.npy`` and ``manifest.json`` with sha256 checksums.
Captions are tokenised when loaded, with the ``tokenizer`` parameter (the ``model`` of the
``hf_text`` encoder that reads them), so one cache serves every text model. See
datasets/textdigits/README.md.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossmodal_kd.data.avdigits_build import CLASS_NAMES, draw_partners, image_pool
from crossmodal_kd.data.base import ArrayDataset, DataError, DataSplits, load_npy, params_key, raise_problems
from crossmodal_kd.data.array_folder import (
    array_folder_checksum,
    content_problems,
    verify_array_folder,
    write_array_folder,
)
from crossmodal_kd.hub import load_tokenizer, tokenize
from crossmodal_kd.registry import DATASETS

log = logging.getLogger(__name__)

TEXTDIGITS_VERSION = 1
SPLITS = {"train": 0, "val": 1, "test": 2}
ARRAY_FILES = ("image", "caption", "label", "split")

_DEFAULTS: dict[str, Any] = {
    "n_train": 3000,
    "n_val": 500,
    "n_test": 1000,
    # images, as in avdigits
    "image_split": [0.6, 0.15, 0.25],
    "pca_energy_removed": 0.7,
    "image_noise_std": 0.45,
    # captions
    "uninformative": 0.3,  # fraction naming no digit
    "mislabelled": 0.05,  # fraction naming only a wrong digit
    "distractor": 0.3,  # fraction of the informative rest that also name a wrong digit
    "typo_rate": 0.1,  # per word of three letters or more: one random character edit
}

# Surface forms of each digit (index = class): word, numeral, roman numeral, synonyms.
FORMS = [
    ["zero", "0", "nought", "nil", "naught"],
    ["one", "1", "single", "ace", "uno"],
    ["two", "2", "ii", "pair", "couple"],
    ["three", "3", "iii", "trio", "triple"],
    ["four", "4", "iv", "quad", "quartet"],
    ["five", "5", "v", "quintet", "fiver"],
    ["six", "6", "vi", "sextet", "half dozen"],
    ["seven", "7", "vii", "septet", "lucky seven"],
    ["eight", "8", "viii", "octet", "eightfold"],
    ["nine", "9", "ix", "nonet", "ninefold"],
]
FILLERS = {
    "adj": ["blurry", "faint", "messy", "neat", "small", "large", "slanted", "smudged", "grainy", "bold"],
    "noun": ["digit", "number", "numeral", "figure", "character", "symbol", "scribble", "sketch"],
    "surface": ["paper", "a form", "the page", "a card", "an envelope", "a whiteboard"],
    "ink": ["pencil", "ink", "marker", "pen", "chalk"],
}
INFORMATIVE = [
    "{d}",
    "handwritten {d}",
    "a {adj} {noun} of the digit {d}",
    "someone wrote {d} on {surface}",
    "the number {d}, {adj}",
    "a {noun} showing {d} in {ink}",
    "looks like {d} to me",
    "{adj} {d} written in {ink}",
]
AMBIGUOUS = ["{d} or maybe {o}", "either {d} or {o}", "somewhere between {d} and {o}", "{d}? {o}? hard to say"]
UNINFORMATIVE = [
    "a {adj} {noun}",
    "some {ink} on {surface}",
    "hard to read",
    "a scanned {noun} in {ink}",
    "no idea what this {noun} is",
    "{adj} handwriting on {surface}",
]
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def default_params() -> dict[str, Any]:
    """The recipe: every knob :func:`build_textdigits` accepts, JSON-serialisable."""
    return json.loads(json.dumps(_DEFAULTS))


@DATASETS.register("textdigits")
class TextDigits:
    """Paired digit images and noisy captions (token ids); built on first use, cached, checksummed.

    ``tokenizer`` (a directory, ``minilm`` or a hub name, as the ``hf_text`` encoder's ``model``) and
    ``max_length`` only affect tokenisation at load time, not the cache.
    """

    modalities = ("image", "text")

    def __init__(
        self,
        root: str | Path,
        seed: int = 0,
        tokenizer: str = "minilm",
        max_length: int = 24,
        allow_download: bool = False,
        **recipe: Any,
    ) -> None:
        unknown = sorted(set(recipe) - set(_DEFAULTS))
        if unknown:
            raise ValueError(f"textdigits: unknown parameter(s) {', '.join(unknown)}; valid: "
                             f"seed, tokenizer, max_length, allow_download, {', '.join(sorted(_DEFAULTS))}")
        self.seed, self.tokenizer, self.max_length, self.allow_download = seed, tokenizer, max_length, allow_download
        self.recipe = {**default_params(), **json.loads(json.dumps(recipe))}
        key = params_key({"seed": seed, **self.recipe})
        self.path = Path(root) / "textdigits" / f"v{TEXTDIGITS_VERSION}-{key}"

    def build(self, force: bool = False) -> Path:
        if not force and (self.path / "manifest.json").is_file() and not self._checksum_problems():
            return self.path
        if self.path.exists():
            log.warning("textdigits cache at %s is incomplete or corrupt; rebuilding", self.path)
            shutil.rmtree(self.path)
        return build_textdigits(self.path, seed=self.seed, **self.recipe)

    def input_spec(self) -> tuple[dict[str, tuple[int, ...]], int]:
        """``(input_shapes, num_classes)``: 28 x 28 images, ``max_length`` token ids; builds nothing."""
        return {"image": (1, 28, 28), "text": (self.max_length,)}, len(CLASS_NAMES)

    def fingerprint(self) -> dict[str, str]:
        """Recipe (cache folder name) and content checksum of the built cache, for run fingerprints."""
        return {"cache": self.path.name, "checksum": array_folder_checksum(self.path)}

    def check(self) -> list[str]:
        """Checksums of every file, then the contents: labels within the 10 digits, no NaN/inf, no empty split."""
        return self._checksum_problems() or self._content_problems(
            {name: load_npy(self.path / f"{name}.npy", mmap=True) for name in ARRAY_FILES})

    def load(self) -> DataSplits:
        self.build()
        arrays = {name: load_npy(self.path / f"{name}.npy") for name in ARRAY_FILES}
        raise_problems(self._content_problems(arrays), "textdigits")
        tokenizer = load_tokenizer(self.tokenizer, self.allow_download)
        text = tokenize(tokenizer, arrays["caption"].tolist(), self.max_length)
        inputs = {"image": torch.from_numpy(arrays["image"]), "text": text}
        parts = {}
        for name, code in SPLITS.items():
            idx = torch.from_numpy(np.flatnonzero(arrays["split"] == code))
            parts[name] = ArrayDataset({m: x[idx] for m, x in inputs.items()}, torch.from_numpy(arrays["label"])[idx])
        return DataSplits(
            **parts,
            num_classes=len(CLASS_NAMES),
            class_names=list(CLASS_NAMES),
            input_shapes={m: tuple(x.shape[1:]) for m, x in inputs.items()},
        )

    def _checksum_problems(self) -> list[str]:
        try:
            verify_textdigits(self.path)
        except DataError as exc:
            return [str(exc)]
        return []

    def _content_problems(self, arrays: dict[str, np.ndarray]) -> list[str]:
        return content_problems(self.path, {"image": arrays["image"]}, arrays["label"], arrays["split"], len(CLASS_NAMES))


# ----------------------------------------------------------------------------------------- captions


def _typo(word: str, rng: np.random.Generator) -> str:
    """One random edit: swap two neighbours, drop, double or replace a character."""
    i = int(rng.integers(len(word) - 1))
    kind = int(rng.integers(4))
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:
        return word[:i] + word[i + 1:]
    if kind == 2:
        return word[:i] + word[i] + word[i:]
    return word[:i] + _LETTERS[int(rng.integers(len(_LETTERS)))] + word[i + 1:]


def make_caption(label: int, rng: np.random.Generator, recipe: dict[str, Any]) -> str:
    """One noisy caption for a sample of class ``label``."""
    def form(c: int) -> str:
        return FORMS[c][int(rng.integers(len(FORMS[c])))]

    def other() -> int:
        return int((label + rng.integers(1, len(FORMS))) % len(FORMS))

    fill = {k: v[int(rng.integers(len(v)))] for k, v in FILLERS.items()}
    u = rng.random()
    if u < recipe["uninformative"]:
        template = UNINFORMATIVE[int(rng.integers(len(UNINFORMATIVE)))]
    elif u < recipe["uninformative"] + recipe["mislabelled"]:
        template, fill["d"] = INFORMATIVE[int(rng.integers(len(INFORMATIVE)))], form(other())
    elif rng.random() < recipe["distractor"]:
        template = AMBIGUOUS[int(rng.integers(len(AMBIGUOUS)))]
        pair = [form(label), form(other())]
        fill["d"], fill["o"] = pair if rng.random() < 0.5 else pair[::-1]
    else:
        template, fill["d"] = INFORMATIVE[int(rng.integers(len(INFORMATIVE)))], form(label)
    words = template.format(**fill).split(" ")
    typos = rng.random(len(words)) < recipe["typo_rate"]
    return " ".join(_typo(w, rng) if t and len(w) >= 3 and w.isalpha() else w for w, t in zip(words, typos))


# ------------------------------------------------------------------------------------ build / verify


def _arrays(recipe: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    rng_img_split, rng_pairs, rng_img_noise, rng_captions, rng_shuffle = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)
    )
    images, image_labels, image_split = image_pool(recipe, rng_img_split)
    sizes = [recipe["n_train"], recipe["n_val"], recipe["n_test"]]
    split = np.repeat(np.arange(3, dtype=np.int8), sizes)
    label = np.concatenate([rng_shuffle.permutation(np.arange(n) % len(CLASS_NAMES)) for n in sizes])
    image_id = np.empty(len(label), dtype=np.int64)
    for s in range(3):
        rows = split == s
        image_id[rows] = draw_partners(image_labels, image_split == s, label[rows], rng_pairs)
    image = images[image_id] + rng_img_noise.standard_normal((len(label), 784), dtype=np.float32) * np.float32(
        recipe["image_noise_std"])
    train = split == 0
    image = (image - image[train].mean()) / image[train].std()
    captions = [make_caption(int(c), rng_captions, recipe) for c in label]
    return {
        "image": image.reshape(-1, 1, 28, 28).astype(np.float32),
        "caption": np.array(captions, dtype=str),
        "label": label.astype(np.int64),
        "split": split,
    }


def build_textdigits(out_dir: str | Path, *, seed: int = 0, **recipe: Any) -> Path:
    """Build the dataset into ``out_dir`` (replacing it, atomically) and return it; deterministic in ``seed``."""
    recipe = {**default_params(), **recipe}
    for key in ("uninformative", "mislabelled", "distractor", "typo_rate"):
        if not 0 <= recipe[key] <= 1:
            raise ValueError(f"textdigits: {key} must be in [0, 1], got {recipe[key]}")
    if recipe["uninformative"] + recipe["mislabelled"] > 1:
        raise ValueError("textdigits: uninformative + mislabelled must not exceed 1")
    manifest = {"name": "textdigits", "version": TEXTDIGITS_VERSION, "seed": seed, "params": recipe,
                "class_names": CLASS_NAMES}
    return write_array_folder(out_dir, _arrays(recipe, seed), manifest)


def verify_textdigits(out_dir: str | Path) -> None:
    """Check every array file against ``manifest.json``; :class:`CorruptDatasetError` names the first bad file."""
    verify_array_folder(out_dir, "textdigits", ARRAY_FILES)
