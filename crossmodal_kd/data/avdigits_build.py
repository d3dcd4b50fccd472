"""Build the embedded ``avdigits`` dataset: AV-MNIST-style pairs of handwritten and spoken digits.

Images are scikit-learn's bundled 8x8 handwritten digits, upsampled to 28x28 and degraded as in
AV-MNIST: the top principal components carrying a fraction of the energy are projected out and
Gaussian noise is added to every pair. Audio is the digit word spoken by espeak-ng over many
voices (accent x voice variant) with random speed and pitch, resampled, placed at a random offset
in a fixed window, mixed with white noise at a fixed SNR and turned into a log-mel spectrogram.
A pair joins a random image and a random clip of the same class from the same split. Images are
split disjointly, and so are voice variants: val and test voices are never heard in training.

Everything random flows from ``numpy.random.SeedSequence(seed)``, so a seed gives byte-identical
arrays. The output directory holds one ``.npy`` per array and ``manifest.json`` with checksums.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio
from sklearn.datasets import load_digits
from tqdm import tqdm

from crossmodal_kd.data.array_folder import verify_array_folder, write_array_folder

AVDIGITS_VERSION = 1

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPLITS = ("train", "val", "test")
ARRAY_FILES = ("image", "audio", "label", "split", "image_id", "voice_id")
ESPEAK = "espeak-ng"
SYNTH_WORKERS = min(4, os.cpu_count() or 1)

# espeak-ng accents that need no mbrola voices, and the variants shipped in espeak-ng-data/voices/!v.
_ACCENTS = ["en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
            "en-us-nyc"]
_VARIANTS = """
Alex Alicia Andrea Andy Annie AnxiousAndy Demonic Denis Diogo Gene Gene2 Henrique Hugo Jacky Lee Marco
Mario Michael Mike Nguyen RicishayMax RicishayMax2 RicishayMax3 Storm Tweaky UniRobot adam anika
anikaRobot announcer antonio aunty belinda benjamin boris caleb croak david ed edward edward2 f1 f2 f3 f4
f5 fast grandma grandpa gustave iven iven2 iven3 iven4 john kaukovalta klatt klatt2 klatt3 klatt4 klatt5
klatt6 linda m1 m2 m3 m4 m5 m6 m7 m8 marcelo max michel miguel norbert pablo paul pedro quincy rob robert
robosoft robosoft2 robosoft3 robosoft4 robosoft5 robosoft6 robosoft7 robosoft8 sandro shelby steph steph2
steph3 travis victor whisper whisperf
""".split()

# Calibrated (seeds 0-2, test split, 15 epochs, best epoch on val): LeNet-5 on images 62-64 %, a 3-block
# CNN on log-mels 67-70 %, their intermediate fusion (modality dropout 0.25) 80-87 %.
_DEFAULTS: dict[str, Any] = {
    # pairs per split
    "n_train": 6000,
    "n_val": 1000,
    "n_test": 2000,
    # images
    "image_split": [0.6, 0.15, 0.25],  # fractions of the 1,797 images per split, stratified by class
    "pca_energy_removed": 0.7,  # energy of the top principal components (fit on train) projected out
    "image_noise_std": 0.45,  # per-pair Gaussian noise, in pixel units (pixels in [0, 1])
    # voices
    "accents": _ACCENTS,
    "variants": _VARIANTS,
    "voice_split": [0.6, 0.15, 0.25],  # fractions of the variants per split (every accent in every split)
    "speed_wpm": [120, 220],  # espeak -s, uniform per clip
    "pitch": [20, 80],  # espeak -p, uniform per clip
    # audio
    "sample_rate": 8000,
    "clip_seconds": 1.0,
    "snr_db": 0.0,  # per-pair white noise, relative to the RMS of the spoken word
    "n_mels": 40,
    "n_fft": 256,
    "hop_length": 160,
}


def default_params() -> dict[str, Any]:
    """The calibrated recipe: every knob :func:`build_avdigits` accepts, JSON-serialisable."""
    return json.loads(json.dumps(_DEFAULTS))


def _resolve_params(overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(overrides) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown avdigits parameter(s) {unknown}; valid: {sorted(_DEFAULTS)}")
    params = default_params()
    params.update(json.loads(json.dumps(overrides)))
    for key in ("image_split", "voice_split"):
        fracs = params[key]
        if len(fracs) != 3 or min(fracs) <= 0 or abs(sum(fracs) - 1) > 1e-6:
            raise ValueError(f"{key} must be three positive fractions summing to 1, got {fracs}")
    if not 0 <= params["pca_energy_removed"] < 1:
        raise ValueError(f"pca_energy_removed must be in [0, 1), got {params['pca_energy_removed']}")
    return params


def _split_items(n: int, fracs: list[float], rng: np.random.Generator) -> np.ndarray:
    """Assign ``n`` items to splits 0/1/2 at random in the given proportions (at least one each)."""
    n_val, n_test = max(1, round(n * fracs[1])), max(1, round(n * fracs[2]))
    return rng.permutation(np.repeat(np.arange(3), [n - n_val - n_test, n_val, n_test]))


# ----------------------------------------------------------------------------------------- images


def image_pool(params: dict[str, Any], rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upsampled, PCA-degraded digit images ``(n, 784)`` with their labels and split per image."""
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    split = np.empty(len(labels), dtype=np.int8)
    for c in range(len(CLASS_NAMES)):  # stratified: every class split in the same proportions
        idx = np.flatnonzero(labels == c)
        split[idx] = _split_items(len(idx), params["image_split"], rng)
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    images = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False).flatten(1).double()
    train = images[torch.from_numpy(split == 0)]
    mean = train.mean(0)
    _, s, vt = torch.linalg.svd(train - mean, full_matrices=False)
    energy = torch.cumsum(s**2, 0) / (s**2).sum()
    frac = params["pca_energy_removed"]  # remove the fewest components whose energy reaches frac
    k = int(torch.searchsorted(energy, torch.tensor(frac, dtype=energy.dtype))) + 1 if frac > 0 else 0
    top = vt[:k]
    images = images - (images - mean) @ top.T @ top
    return images.float().numpy(), labels, split


# ------------------------------------------------------------------------------------------ audio


def _check_espeak(accents: list[str], variants: list[str]) -> None:
    """Fail early if espeak-ng is missing or lacks a voice (it silently ignores unknown variants)."""
    if shutil.which(ESPEAK) is None:
        raise RuntimeError(f"{ESPEAK} not found: install it (apt-get install espeak-ng) to build avdigits")

    def listing(kind: str) -> str:
        return subprocess.run([ESPEAK, f"--voices={kind}"], check=True, capture_output=True, text=True).stdout

    voices = listing("")  # a voice answers to its language column and to its "(other language)" aliases
    known_accents = set(re.findall(r"^\s*\d+\s+(\S+)", voices, re.M) + re.findall(r"\((\S+) \d+\)", voices))
    known_variants = set(re.findall(r"!v/(.+?)(?:\s{2,}|\s*$)", listing("variant"), re.M))
    for kind, asked, known in (("accents", accents, known_accents), ("variants", variants, known_variants)):
        missing = sorted(set(asked) - known)
        if missing:
            raise ValueError(f"espeak-ng lacks {kind} {missing}; available: {sorted(known)}")


def _synthesise(word: str, voice: str, speed: int, pitch: int, path: Path) -> tuple[np.ndarray, int]:
    subprocess.run([ESPEAK, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), word],
                   check=True, capture_output=True)
    wave, rate = sf.read(path, dtype="float32")
    path.unlink()
    return wave, rate


@functools.lru_cache
def _resampler(orig_rate: int, new_rate: int) -> torchaudio.transforms.Resample:
    return torchaudio.transforms.Resample(orig_rate, new_rate)


def _trim(wave: np.ndarray, rel_threshold: float = 0.02) -> np.ndarray:
    """Cut leading and trailing silence (samples below ``rel_threshold`` of the peak)."""
    loud = np.flatnonzero(np.abs(wave) > rel_threshold * np.abs(wave).max())
    return wave[loud[0]: loud[-1] + 1]


def _voice_pool(params: dict[str, Any], rng: np.random.Generator, progress: bool
                ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Synthesise every (voice, digit) clip: trimmed unit-RMS waveforms at ``sample_rate``.

    Returns the clips, their labels, voice ids and splits, and the voice names ("accent+variant").
    """
    accents, variants = params["accents"], params["variants"]
    _check_espeak(accents, variants)
    variant_split = _split_items(len(variants), params["voice_split"], rng)
    voices = [f"{a}+{v}" for a in accents for v in variants]
    voice_split = np.tile(variant_split, len(accents))
    jobs = [(vid, c) for vid in range(len(voices)) for c in range(len(CLASS_NAMES))]
    speeds = rng.integers(params["speed_wpm"][0], params["speed_wpm"][1], len(jobs), endpoint=True)
    pitches = rng.integers(params["pitch"][0], params["pitch"][1], len(jobs), endpoint=True)

    with tempfile.TemporaryDirectory(prefix="avdigits_wav_") as tmp:
        def clip(j: int) -> np.ndarray:
            vid, c = jobs[j]
            wave, rate = _synthesise(CLASS_NAMES[c], voices[vid], int(speeds[j]), int(pitches[j]),
                                     Path(tmp) / f"{j}.wav")
            with torch.no_grad():
                wave = _trim(_resampler(rate, params["sample_rate"])(torch.from_numpy(wave)).numpy())
            return wave / np.sqrt(np.mean(wave**2))

        with ThreadPoolExecutor(SYNTH_WORKERS) as pool:
            clips = list(tqdm(pool.map(clip, range(len(jobs))), total=len(jobs), disable=None if progress else True,
                              desc="avdigits: espeak-ng", unit="clip"))
    vids = np.array([vid for vid, _ in jobs], dtype=np.int32)
    labels = np.array([c for _, c in jobs], dtype=np.int64)
    return clips, labels, vids, voice_split[vids], voices


def _log_mel(clips: list[np.ndarray], clip_ids: np.ndarray, params: dict[str, Any],
             rng: np.random.Generator, batch: int = 1000) -> np.ndarray:
    """Log-mel spectrograms ``(n, n_mels, T)`` of the chosen clips, each placed at a random offset
    in a fixed window (cropped at random if longer) and mixed with fresh white noise."""
    length = round(params["sample_rate"] * params["clip_seconds"])
    noise_std = 10 ** (-params["snr_db"] / 20)
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=params["sample_rate"], n_fft=params["n_fft"], hop_length=params["hop_length"],
        n_mels=params["n_mels"], f_min=50.0, power=2.0)
    out = []
    for start in range(0, len(clip_ids), batch):
        ids = clip_ids[start:start + batch]
        waves = rng.standard_normal((len(ids), length), dtype=np.float32) * noise_std
        shifts = rng.random(len(ids))
        for row, i in enumerate(ids):
            wave = clips[i]
            slack = abs(length - len(wave))
            offset = int(shifts[row] * (slack + 1))
            if len(wave) <= length:
                waves[row, offset:offset + len(wave)] += wave
            else:
                waves[row] += wave[offset:offset + length]
        with torch.no_grad():
            out.append(torch.log(mel(torch.from_numpy(waves)) + 1e-6).numpy())
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------ pairs


def draw_partners(pool_labels: np.ndarray, pool_mask: np.ndarray, labels: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """For each label, the index of a random pool item of that class (restricted to ``pool_mask``)."""
    chosen = np.empty(len(labels), dtype=np.int64)
    for c in range(len(CLASS_NAMES)):
        candidates = np.flatnonzero(pool_mask & (pool_labels == c))
        where = labels == c
        chosen[where] = candidates[rng.integers(0, len(candidates), where.sum())]
    return chosen


def _arrays(params: dict[str, Any], seed: int, progress: bool) -> tuple[dict[str, np.ndarray], list[str]]:
    """All dataset arrays (train, then val, then test) and the voice names."""
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)]
    rng_img_split, rng_voices, rng_pairs, rng_img_noise, rng_audio, rng_shuffle = streams

    images, image_labels, image_split = image_pool(params, rng_img_split)
    clips, clip_labels, clip_voice, clip_split, voices = _voice_pool(params, rng_voices, progress)

    sizes = [params["n_train"], params["n_val"], params["n_test"]]
    split = np.repeat(np.arange(3, dtype=np.int8), sizes)
    label = np.concatenate([rng_shuffle.permutation(np.arange(n) % len(CLASS_NAMES)) for n in sizes])
    image_id = np.empty(len(label), dtype=np.int64)
    clip_id = np.empty(len(label), dtype=np.int64)
    for s in range(3):
        rows = split == s
        image_id[rows] = draw_partners(image_labels, image_split == s, label[rows], rng_pairs)
        clip_id[rows] = draw_partners(clip_labels, clip_split == s, label[rows], rng_pairs)

    noise = rng_img_noise.standard_normal((len(label), 784), dtype=np.float32)
    image = images[image_id] + noise * np.float32(params["image_noise_std"])
    train = split == 0
    image = (image - image[train].mean()) / image[train].std()

    audio = _log_mel(clips, clip_id, params, rng_audio)
    mean = audio[train].mean(axis=(0, 2), keepdims=True)
    std = audio[train].std(axis=(0, 2), keepdims=True)
    audio = (audio - mean) / std

    arrays = {
        "image": image.reshape(-1, 1, 28, 28).astype(np.float32),
        "audio": audio[:, None].astype(np.float16),
        "label": label.astype(np.int64),
        "split": split,
        "image_id": image_id.astype(np.int32),
        "voice_id": clip_voice[clip_id].astype(np.int32),
    }
    return arrays, voices


# --------------------------------------------------------------------------------- build / verify


def build_avdigits(out_dir: str | Path, *, seed: int = 0, progress: bool = True, **params: Any) -> Path:
    """Build the dataset into ``out_dir``, replacing what is there, and return ``out_dir``.

    The build happens in a temporary sibling directory that is moved into place only when
    complete, so an interrupted build never leaves a half-written dataset. ``params`` override
    :func:`default_params`; unknown keys raise ``ValueError``.
    """
    params = _resolve_params(params)
    arrays, voices = _arrays(params, seed, progress)
    counts = {s: int((arrays["split"] == i).sum()) for i, s in enumerate(SPLITS)}
    manifest = {"name": "avdigits", "version": AVDIGITS_VERSION, "seed": seed, "params": params,
                "counts": counts, "class_names": CLASS_NAMES, "voices": voices}
    return write_array_folder(out_dir, arrays, manifest)


def verify_avdigits(out_dir: str | Path) -> None:
    """Check every file against ``manifest.json``; :class:`CorruptDatasetError` names the first bad one."""
    verify_array_folder(out_dir, "avdigits", ARRAY_FILES)
