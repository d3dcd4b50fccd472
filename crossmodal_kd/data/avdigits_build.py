"""Build the embedded ``avdigits`` dataset: AV-MNIST-style pairs of handwritten and spoken digits.

Images are scikit-learn's bundled 8x8 handwritten digits, upsampled to 28x28. Every pair warps its
source digit with its own random affine transform and elastic field (Simard et al., ICDAR 2003), so
the training split holds thousands of distinct images, not the ~1,000 sources; it is then degraded as
in AV-MNIST (Vielzeuf et al., ECCV-W 2018): the top principal components carrying a fraction of the
energy of the training images are projected out and Gaussian noise is added. Audio is the digit word
spoken by espeak-ng over many voices (accent x voice variant) with random speed and pitch, resampled,
placed at a random offset in a fixed window, mixed with white noise at a fixed SNR and turned into a
log-mel spectrogram. A pair joins a random image and a random clip of the same class from the same
split. Images are split disjointly, and so are voice variants: val and test voices are never heard in
training.

``shared`` > 0 makes the two modalities share more than the label: each pair draws a secondary digit
``d2 != label`` and a weight ``lam ~ U(0, shared / 2)``; the image is blended toward a (warped) image
of ``d2`` and the waveform toward a clip of ``d2``, both from the pair's split and with the same
``lam``, before the degradation and the noise. The label stays the primary digit.

Everything random flows from ``numpy.random.SeedSequence(seed)``, one child stream per purpose, so a
seed gives byte-identical arrays, the image side does not depend on the voices, and the primary
pairs do not depend on ``shared``. The output directory holds one ``.npy`` per array and
``manifest.json`` with checksums and the z-score statistics the loader applies.
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

AVDIGITS_VERSION = 2

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPLITS = ("train", "val", "test")
ARRAY_FILES = ("image", "audio", "label", "split", "image_id", "voice_id")  # what a cache must hold
SIDE = 28  # image side, pixels
PIXEL_MAX = 255.0  # stored images are grey levels: 0 = background, 255 = full ink (bright ink, as MNIST)
LOG_FLOOR = 1e-6  # log-mel = ln(mel power + LOG_FLOOR)
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

# Calibrated on the validation split only (datasets/avdigits/README.md has the runs).
_DEFAULTS: dict[str, Any] = {
    # pairs per split
    "n_train": 6000,
    "n_val": 1000,
    "n_test": 2000,
    # images
    "image_split": [0.6, 0.15, 0.25],  # fractions of the 1,797 images per split, stratified by class
    "deform_rotation": 12.0,  # per-pair random affine: rotation up to +-this many degrees,
    "deform_shear": 12.0,  # shear up to +-this many degrees,
    "deform_scale": [0.9, 1.1],  # scale in this range,
    "deform_translate": 2.0,  # translation up to +-this many pixels per axis
    "elastic_px": 1.0,  # per-pair elastic field: RMS displacement in pixels,
    "elastic_sigma": 3.0,  # Gaussian smoothing of the field, pixels
    "pca_energy_removed": 0.4,  # energy of the top principal components (fit on train) projected out
    "image_noise_std": 0.45,  # per-pair Gaussian noise, in pixel units (clean pixels in [0, 1])
    # both modalities
    "shared": 0.0,  # in [0, 1]: blend weight toward a secondary digit ~ U(0, shared / 2); 0 = label only
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

# child streams of SeedSequence(seed), one per purpose (appending keeps the earlier streams unchanged)
_STREAMS = ("image_split", "voices", "image_pairs", "image_noise", "audio", "labels", "deform", "clip_pairs",
            "secondary")


def default_params() -> dict[str, Any]:
    """The calibrated recipe: every knob :func:`build_avdigits` accepts, JSON-serialisable."""
    return json.loads(json.dumps(_DEFAULTS))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def resolve_params(overrides: dict[str, Any]) -> dict[str, Any]:
    """The defaults updated with ``overrides``, checked; an integer given for a float knob becomes a float
    (so ``shared=0`` and ``shared=0.0`` name the same cache). ``ValueError`` names the bad knob."""
    unknown = sorted(set(overrides) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"avdigits: unknown recipe key(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(sorted(_DEFAULTS))}")
    params = default_params()
    for key, value in json.loads(json.dumps(overrides)).items():
        params[key] = float(value) if isinstance(_DEFAULTS[key], float) and _is_number(value) else value
    for key in ("image_split", "voice_split"):
        fracs = params[key]
        if len(fracs) != 3 or min(fracs) <= 0 or abs(sum(fracs) - 1) > 1e-6:
            raise ValueError(f"avdigits: {key} must be three positive fractions summing to 1, got {fracs}")
    if not 0 <= params["pca_energy_removed"] < 1:
        raise ValueError(f"avdigits: pca_energy_removed must be in [0, 1), got {params['pca_energy_removed']}")
    if not (_is_number(params["shared"]) and 0 <= params["shared"] <= 1):
        raise ValueError(f"avdigits: shared must be a number in [0, 1], got {params['shared']!r}")
    for key in ("deform_rotation", "deform_shear", "deform_translate", "elastic_px"):
        if not (_is_number(params[key]) and params[key] >= 0):
            raise ValueError(f"avdigits: {key} must be a number >= 0, got {params[key]!r}")
    if not (_is_number(params["elastic_sigma"]) and params["elastic_sigma"] > 0):
        raise ValueError(f"avdigits: elastic_sigma must be a number > 0, got {params['elastic_sigma']!r}")
    lo_hi = params["deform_scale"]
    if not (isinstance(lo_hi, list) and len(lo_hi) == 2 and all(map(_is_number, lo_hi))
            and 0 < lo_hi[0] <= lo_hi[1]):
        raise ValueError(f"avdigits: deform_scale must be [low, high] with 0 < low <= high, got {lo_hi!r}")
    return params


def _split_items(n: int, fracs: list[float], rng: np.random.Generator) -> np.ndarray:
    """Assign ``n`` items to splits 0/1/2 at random in the given proportions (at least one each)."""
    n_val, n_test = max(1, round(n * fracs[1])), max(1, round(n * fracs[2]))
    return rng.permutation(np.repeat(np.arange(3), [n - n_val - n_test, n_val, n_test]))


# ----------------------------------------------------------------------------------------- images


def source_digits(params: dict[str, Any], rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clean digit images ``(n, 784)`` in [0, 1], upsampled to 28x28, with their labels and splits."""
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    split = np.empty(len(labels), dtype=np.int8)
    for c in range(len(CLASS_NAMES)):  # stratified: every class split in the same proportions
        idx = np.flatnonzero(labels == c)
        split[idx] = _split_items(len(idx), params["image_split"], rng)
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    images = F.interpolate(small, size=(SIDE, SIDE), mode="bilinear", align_corners=False).flatten(1)
    return images.numpy(), labels, split


def pca_basis(train: np.ndarray, frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, top)`` of ``train`` images ``(n, 784)``: the fewest principal components whose energy reaches
    ``frac`` (none when 0), float64."""
    x = torch.from_numpy(train).double()
    mean = x.mean(0)
    _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
    energy = torch.cumsum(s**2, 0) / (s**2).sum()
    k = int(torch.searchsorted(energy, torch.tensor(frac, dtype=energy.dtype))) + 1 if frac > 0 else 0
    return mean, vt[:k]


def project_out(images: np.ndarray, mean: torch.Tensor, top: torch.Tensor) -> np.ndarray:
    """``images`` ``(n, 784)`` without their components along ``top`` (around ``mean``), float32."""
    x = torch.from_numpy(images).double()
    return (x - (x - mean) @ top.T @ top).float().numpy()


def image_pool(params: dict[str, Any], rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upsampled, PCA-degraded (unwarped) digit images ``(n, 784)`` with their labels and split per image."""
    images, labels, split = source_digits(params, rng)
    return project_out(images, *pca_basis(images[split == 0], params["pca_energy_removed"])), labels, split


@functools.lru_cache
def _smoother(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian smoothing matrix ``K`` (28x28) and the per-pixel std of ``K @ w @ K.T``, ``w`` white noise."""
    pos = np.arange(SIDE)
    kernel = np.exp(-((pos[:, None] - pos[None]) ** 2) / (2 * sigma**2))
    row = np.sqrt((kernel**2).sum(1))
    return kernel.astype(np.float32), np.outer(row, row).astype(np.float32)


def deform(images: np.ndarray, params: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Each image ``(n, 784)`` resampled (bilinear) through its own random affine map plus an elastic field:
    white noise smoothed by a Gaussian of ``elastic_sigma`` pixels, scaled to ``elastic_px`` RMS pixels
    everywhere (Simard et al., ICDAR 2003)."""
    n = len(images)
    rot = np.deg2rad(params["deform_rotation"]) * rng.uniform(-1, 1, n)
    tan = np.tan(np.deg2rad(params["deform_shear"]) * rng.uniform(-1, 1, n))
    scale = rng.uniform(*params["deform_scale"], n)
    shift = params["deform_translate"] * rng.uniform(-1, 1, (n, 2)) * 2 / SIDE  # grid units: [-1, 1] = image
    kernel, std = _smoother(params["elastic_sigma"])
    field = kernel @ rng.standard_normal((n, 2, SIDE, SIDE), dtype=np.float32) @ kernel.T / std
    cos, sin = np.cos(rot), np.sin(rot)
    # where each output pixel samples the source: rotation @ shear / scale, then the shift
    theta = np.stack([np.stack([cos, cos * tan - sin, shift[:, 0]], 1),
                      np.stack([sin, sin * tan + cos, shift[:, 1]], 1)], 1)
    theta[:, :, :2] /= scale[:, None, None]
    with torch.no_grad():
        grid = F.affine_grid(torch.from_numpy(theta).float(), [n, 1, SIDE, SIDE], align_corners=False)
        grid += torch.from_numpy(field).permute(0, 2, 3, 1) * np.float32(params["elastic_px"] * 2 / SIDE)
        out = F.grid_sample(torch.from_numpy(images).view(n, 1, SIDE, SIDE), grid, mode="bilinear",
                            padding_mode="zeros", align_corners=False)
    return out.flatten(1).numpy()


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


def _place(clips: list[np.ndarray], ids: np.ndarray, shifts: np.ndarray, length: int) -> np.ndarray:
    """The chosen clips ``(n, length)``, each at a random offset in the window (or cropped at random)."""
    waves = np.zeros((len(ids), length), dtype=np.float32)
    for row, i in enumerate(ids):
        wave = clips[i]
        offset = int(shifts[row] * (abs(length - len(wave)) + 1))
        if len(wave) <= length:
            waves[row, offset:offset + len(wave)] = wave
        else:
            waves[row] = wave[offset:offset + length]
    return waves


def _log_mel(clips: list[np.ndarray], clip_ids: np.ndarray, params: dict[str, Any], rng: np.random.Generator,
             mix: tuple[np.ndarray, np.ndarray, np.random.Generator] | None = None, batch: int = 1000
             ) -> np.ndarray:
    """Log-mel spectrograms ``(n, n_mels, T)`` of the chosen clips plus fresh white noise. ``mix`` =
    ``(secondary clip ids, weights lam, their stream)``: the waveform is ``(1 - lam) * primary + lam *
    secondary`` (each at its own offset) before the noise, so the noise level does not depend on ``lam``."""
    length = round(params["sample_rate"] * params["clip_seconds"])
    noise_std = 10 ** (-params["snr_db"] / 20)
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=params["sample_rate"], n_fft=params["n_fft"], hop_length=params["hop_length"],
        n_mels=params["n_mels"], f_min=50.0, power=2.0)
    out = []
    for start in range(0, len(clip_ids), batch):
        rows = slice(start, start + batch)
        ids = clip_ids[rows]
        noise = rng.standard_normal((len(ids), length), dtype=np.float32) * np.float32(noise_std)
        waves = _place(clips, ids, rng.random(len(ids)), length)
        if mix is not None:
            secondary, lam, mix_rng = mix
            lam = lam[rows, None]
            waves = (1 - lam) * waves + lam * _place(clips, secondary[rows], mix_rng.random(len(ids)), length)
        with torch.no_grad():
            out.append(torch.log(mel(torch.from_numpy(waves + noise)) + LOG_FLOOR).numpy())
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


def _partners(pool_labels: np.ndarray, pool_split: np.ndarray, labels: np.ndarray, split: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
    """For each pair, a random pool item of its ``labels`` class from the pair's own split."""
    chosen = np.empty(len(labels), dtype=np.int64)
    for s in range(len(SPLITS)):
        rows = split == s
        chosen[rows] = draw_partners(pool_labels, pool_split == s, labels[rows], rng)
    return chosen


def normalisation(image: np.ndarray, audio: np.ndarray, train: np.ndarray) -> dict[str, Any]:
    """The z-score statistics of the stored (raw) arrays, from the training pairs: one mean/std for the image
    pixels, one per mel bin for the audio; ``shape`` is how they broadcast against one sample."""
    img = image[train].astype(np.float64)
    aud = audio[train].astype(np.float64)
    return {
        "image": {"kind": "zscore", "mean": [float(img.mean())], "std": [float(img.std())],
                  "shape": [1, 1, 1],
                  "raw": {"unit": "grey level", "pixel_range": [0, int(PIXEL_MAX)],
                          "ink": "bright: 0 = background, 255 = full ink (white on black, as MNIST PNGs)",
                          "note": "stored images are degraded (PCA removal, noise): they exceed the range"}},
        "audio": {"kind": "zscore", "mean": aud.mean(axis=(0, 1, 3)).tolist(),
                  "std": aud.std(axis=(0, 1, 3)).tolist(), "shape": [1, audio.shape[2], 1],
                  "raw": {"unit": f"ln(mel power + {LOG_FLOOR:g}) of the 8 kHz waveform (speech at unit RMS)",
                          "note": "one mean/std per mel bin"}},
    }


def _arrays(params: dict[str, Any], seed: int, progress: bool) -> tuple[dict[str, np.ndarray], list[str]]:
    """All dataset arrays (train, then val, then test), un-normalised, and the voice names."""
    seeds = np.random.SeedSequence(seed).spawn(len(_STREAMS))
    rng = {name: np.random.default_rng(s) for name, s in zip(_STREAMS, seeds)}

    sources, source_labels, source_split = source_digits(params, rng["image_split"])
    clips, clip_labels, clip_voice, clip_split, voices = _voice_pool(params, rng["voices"], progress)

    sizes = [params["n_train"], params["n_val"], params["n_test"]]
    split = np.repeat(np.arange(3, dtype=np.int8), sizes)
    label = np.concatenate([rng["labels"].permutation(np.arange(n) % len(CLASS_NAMES)) for n in sizes])
    image_id = _partners(source_labels, source_split, label, split, rng["image_pairs"])
    clip_id = _partners(clip_labels, clip_split, label, split, rng["clip_pairs"])
    train = split == 0

    image = deform(sources[image_id], params, rng["deform"])
    basis = pca_basis(image[train], params["pca_energy_removed"])  # of the primary images: shared-independent
    secondary = np.full(len(label), -1, dtype=np.int64)
    blend = np.zeros(len(label), dtype=np.float32)
    mix = None
    if params["shared"] > 0:
        r = rng["secondary"]
        secondary = (label + r.integers(1, len(CLASS_NAMES), len(label))) % len(CLASS_NAMES)
        blend = (r.random(len(label)) * params["shared"] / 2).astype(np.float32)
        other = deform(sources[_partners(source_labels, source_split, secondary, split, r)], params, r)
        image = (1 - blend[:, None]) * image + blend[:, None] * other
        mix = (_partners(clip_labels, clip_split, secondary, split, r), blend, r)
    image = project_out(image, *basis)
    noise = rng["image_noise"].standard_normal(image.shape, dtype=np.float32)
    image += noise * np.float32(params["image_noise_std"])

    arrays = {
        "image": (image * np.float32(PIXEL_MAX)).reshape(-1, 1, SIDE, SIDE),
        "audio": _log_mel(clips, clip_id, params, rng["audio"], mix)[:, None].astype(np.float16),
        "label": label.astype(np.int64),
        "split": split,
        "image_id": image_id.astype(np.int32),
        "voice_id": clip_voice[clip_id].astype(np.int32),
        "secondary": secondary,
        "blend": blend,
    }
    return arrays, voices


# --------------------------------------------------------------------------------- build / verify


def build_avdigits(out_dir: str | Path, *, seed: int = 0, progress: bool = True, **params: Any) -> Path:
    """Build the dataset into ``out_dir``, replacing what is there, and return ``out_dir``.

    The build happens in a temporary sibling directory that is moved into place only when
    complete, so an interrupted build never leaves a half-written dataset. ``params`` override
    :func:`default_params`; unknown keys and values out of range raise ``ValueError``.
    """
    params = resolve_params(params)
    arrays, voices = _arrays(params, seed, progress)
    counts = {s: int((arrays["split"] == i).sum()) for i, s in enumerate(SPLITS)}
    manifest = {"name": "avdigits", "version": AVDIGITS_VERSION, "seed": seed, "params": params,
                "counts": counts, "class_names": CLASS_NAMES, "voices": voices,
                "normalisation": normalisation(arrays["image"], arrays["audio"], arrays["split"] == 0)}
    return write_array_folder(out_dir, arrays, manifest)


def verify_avdigits(out_dir: str | Path) -> dict[str, Any]:
    """The manifest, once every file matches it; :class:`CorruptDatasetError` names the first bad one."""
    return verify_array_folder(out_dir, "avdigits", ARRAY_FILES)
