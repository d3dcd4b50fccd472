"""``cremad``: CREMA-D audio-visual emotion clips in the OGM-GE / C2KD layout (six classes).

Layout under ``<root>/<subdir>`` (``subdir`` defaults to ``cremad``)::

    AudioWAV/<clip>.wav              one wav per clip (any rate, mono or stereo)
    Image-01-FPS/<clip>/*.jpg        frames extracted at 1 fps (datasets/cremad/extract_frames.sh)
    train.csv, test.csv              rows "<clip>,<EMO>", EMO in NEU HAP SAD FEA DIS ANG

Samples: ``audio`` is a log-mel ``(1, n_mels, frames)`` of the first ``clip_seconds`` (resampled to
``sample_rate``, zero-padded when shorter); ``image`` is ``num_frames`` RGB frames, the middle frame of
each of ``num_frames`` equal segments of the sorted jpgs, resized to ``image_size`` squared and stacked
on the channel axis: ``(3 * num_frames, image_size, image_size)`` (frame ``t`` is channels ``3t..3t+2``),
so every 2-D encoder reads them. Both are z-scored with statistics of the training part only (per RGB
channel for frames, one scalar for log-mels).

The official test list is kept; validation is carved from train, stratified (``val_fraction``,
``split_seed``). With ``cache: true`` (default) every clip is decoded once, in parallel, into
``<root>/<subdir>/.cache/<hash of the decoding parameters>/`` (uint8 frames, float16 log-mels and a
sha256 manifest; rebuilt when damaged or when the clip lists change), so an epoch only indexes arrays.
With ``cache: false`` each sample is decoded when the DataLoader asks for it (``data.num_workers``
processes decode in parallel); both modes give identical tensors.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import asdict, dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import soundfile as sf
import torch
import torchaudio
from PIL import Image
from torch.utils.data import Dataset

from crossmodal_kd.data.base import (
    DataError,
    DataSplits,
    NormalisedArrayDataset,
    ZScore,
    carve_validation,
    decode_rgb,
    describe_rows,
    nonfinite_rows,
    parallel_map,
    params_key,
    raise_problems,
)
from crossmodal_kd.data.decoded_cache import DecodedCache
from crossmodal_kd.io import atomic_write_json
from crossmodal_kd.registry import DATASETS

log = logging.getLogger(__name__)
CLASS_NAMES = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]  # label ids as in OGM-GE
CACHE_VERSION = 1
FRAME_SUFFIXES = (".jpg", ".jpeg")
MODALITIES = ("image", "audio")
LOG_EPS = 1e-6


@dataclass(frozen=True)
class DecodeParams:
    """Everything that decides the decoded arrays (the cache is keyed by it)."""

    sample_rate: int
    clip_seconds: float
    n_mels: int
    n_fft: int
    hop_length: int
    num_frames: int
    image_size: int

    @property
    def num_samples(self) -> int:
        return round(self.sample_rate * self.clip_seconds)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        frames = self.num_samples // self.hop_length + 1  # centred STFT frames
        return {"image": (3 * self.num_frames, self.image_size, self.image_size), "audio": (1, self.n_mels, frames)}


@dataclass(frozen=True)
class Clip:
    name: str
    label: int


# ----------------------------------------------------------------------------- decoding one clip


@lru_cache(maxsize=4)
def _mel_transform(sample_rate: int, n_fft: int, hop_length: int, n_mels: int) -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels)


def read_audio(path: Path, p: DecodeParams) -> torch.Tensor:
    """Mono waveform ``(num_samples,)`` at ``p.sample_rate``: resampled, cropped or zero-padded at the end."""
    if not path.is_file():
        raise DataError(f"{path}: audio file not found")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError) as exc:
        raise DataError(f"{path}: unreadable audio ({exc})") from None
    if data.shape[0] == 0:
        raise DataError(f"{path}: audio file has no samples")
    if len(bad := nonfinite_rows(data)):
        raise DataError(f"{path}: {describe_rows(bad, unit='sample')}: NaN/inf audio")
    wave = torch.from_numpy(data.mean(axis=1))
    if rate != p.sample_rate:
        wave = torchaudio.functional.resample(wave, rate, p.sample_rate)
    n = p.num_samples
    return wave[:n] if len(wave) >= n else torch.nn.functional.pad(wave, (0, n - len(wave)))


def log_mel(wave: torch.Tensor, p: DecodeParams) -> np.ndarray:
    """``log(mel power + 1e-6)`` as float16 ``(1, n_mels, frames)``."""
    with torch.no_grad():
        mel = _mel_transform(p.sample_rate, p.n_fft, p.hop_length, p.n_mels)(wave)
    return torch.log(mel + LOG_EPS).unsqueeze(0).numpy().astype(np.float16)


def frame_files(folder: Path) -> list[Path]:
    """The clip's frames in name order; :class:`DataError` when the folder is missing or holds none."""
    if not folder.is_dir():
        raise DataError(f"{folder}: frame folder not found")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: frame folder holds no .jpg frames")
    return files


def decode_frame(path: Path, size: int) -> torch.Tensor:
    """One RGB frame resized (bilinear, antialiased) to uint8 ``(3, size, size)``."""
    img = decode_rgb(path).resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())


def read_frames(folder: Path, p: DecodeParams) -> np.ndarray:
    """``num_frames`` frames (middles of equal segments of the sorted files) as uint8 ``(3T, S, S)``."""
    files = frame_files(folder)
    picks = [min(int((t + 0.5) * len(files) / p.num_frames), len(files) - 1) for t in range(p.num_frames)]
    return torch.cat([decode_frame(files[i], p.image_size) for i in picks]).numpy()


def wav_path(base: Path, name: str) -> Path:
    return base / "AudioWAV" / f"{name}.wav"


def frame_dir(base: Path, name: str) -> Path:
    return base / "Image-01-FPS" / name


def decode_clip(base: Path, name: str, p: DecodeParams) -> tuple[np.ndarray, np.ndarray]:
    """``(frames uint8 (3T, S, S), log-mel float16 (1, n_mels, F))`` of one clip; errors name the file."""
    return read_frames(frame_dir(base, name), p), log_mel(read_audio(wav_path(base, name), p), p)


# ----------------------------------------------------------------------------- normalisation


def train_statistics(samples: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, dict[str, list[float]]]:
    """Mean and std per RGB channel of the frames and of all log-mel values, accumulated in float64 clip
    by clip (the same numbers whether the clips come from the cache or from the files)."""
    img = np.zeros((2, 3))
    aud = np.zeros(2)
    n_img = n_aud = 0
    for frames, mel in samples:
        f = frames.reshape(-1, 3, frames.shape[-2] * frames.shape[-1]).astype(np.float64)
        img += [f.sum(axis=(0, 2)), (f * f).sum(axis=(0, 2))]
        n_img += f.shape[0] * f.shape[2]
        m = mel.astype(np.float64)
        aud += [m.sum(), (m * m).sum()]
        n_aud += m.size
    if not n_img:
        raise DataError("cremad: no training clips to compute normalisation statistics from")

    def mean_std(sums: np.ndarray, n: int) -> dict[str, list[float]]:
        mean = sums[0] / n
        std = np.sqrt(np.maximum(sums[1] / n - mean**2, 0.0)) + 1e-6
        return {"mean": np.atleast_1d(mean).tolist(), "std": np.atleast_1d(std).tolist()}

    return {"image": mean_std(img, n_img), "audio": mean_std(aud, n_aud)}


class Normaliser(ZScore):
    """CREMA-D's z-score: per-channel frame statistics repeated over the ``num_frames`` frames, one audio value."""

    def __init__(self, stats: dict[str, dict[str, list[float]]], num_frames: int) -> None:
        def shaped(values: list[float], reps: int) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32).repeat(reps).view(-1, 1, 1)

        super().__init__({
            "image": (shaped(stats["image"]["mean"], num_frames), shaped(stats["image"]["std"], num_frames)),
            "audio": (shaped(stats["audio"]["mean"], 1), shaped(stats["audio"]["std"], 1)),
        })


class LazyClips(Dataset):
    """Decodes each clip from its files when asked (``cache: false``); same tensors as the cache gives."""

    def __init__(self, base: Path, clips: Sequence[Clip], params: DecodeParams, normalise: Normaliser) -> None:
        self.base, self.clips, self.params, self.normalise = base, list(clips), params, normalise

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict[str, Any]:
        frames, mel = decode_clip(self.base, self.clips[i].name, self.params)
        return {
            "image": self.normalise("image", torch.from_numpy(frames)),
            "audio": self.normalise("audio", torch.from_numpy(mel)),
            "label": torch.tensor(self.clips[i].label),
            "index": i,
        }


# ----------------------------------------------------------------------------- the family


@DATASETS.register("cremad")
class CremaD:
    """CREMA-D (six emotions): ``image`` frames and ``audio`` log-mels, official test list, cached decoding."""

    modalities = MODALITIES

    def __init__(
        self,
        root: str | Path,
        subdir: str = "cremad",
        sample_rate: int = 16000,
        clip_seconds: float = 3.0,
        n_mels: int = 64,
        n_fft: int = 512,
        hop_length: int = 160,
        num_frames: int = 1,
        image_size: int = 112,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        cache: bool = True,
        decode_workers: int | None = None,
        progress: bool = True,
    ) -> None:
        if not 0 < val_fraction < 1:
            raise ValueError(f"cremad: val_fraction must be in (0, 1), got {val_fraction}")
        for key, value in (("sample_rate", sample_rate), ("n_mels", n_mels), ("n_fft", n_fft), ("hop_length", hop_length),
                           ("num_frames", num_frames), ("image_size", image_size), ("clip_seconds", clip_seconds)):
            if value <= 0:
                raise ValueError(f"cremad: {key} must be positive, got {value}")
        self.base = Path(root) / subdir
        self.params = DecodeParams(sample_rate, float(clip_seconds), n_mels, n_fft, hop_length, num_frames, image_size)
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.cache = cache
        self.workers = decode_workers or min(8, os.cpu_count() or 1)
        self.progress = progress
        self.cache_dir = self.base / ".cache" / params_key({"version": CACHE_VERSION, **asdict(self.params)})
        self.decoded = DecodedCache(self.cache_dir, "cremad", MODALITIES)

    def input_spec(self) -> tuple[dict[str, tuple[int, ...]], int]:
        """``(input_shapes, num_classes)`` from the decoding parameters, without reading any file."""
        return self.params.shapes(), len(CLASS_NAMES)

    def fingerprint(self) -> dict[str, str]:
        """The decoding cache's identity (decoding parameters, clip lists), the same with ``cache: false``."""
        return self.decoded.fingerprint(self._source(self._rows(self._lists())))

    # ---- checking
    def check(self) -> list[str]:
        """Every problem of the copy (csv rows, missing or undecodable wavs and frames), each naming its path."""
        lists, problems = self._read_lists()
        clips = [c for split in lists.values() for c in split]
        for found in parallel_map(self._clip_problems, clips, "cremad: checking", self.workers, self.progress):
            problems.extend(found)
        return problems

    def _clip_problems(self, clip: Clip) -> list[str]:
        problems = []
        try:
            read_audio(wav_path(self.base, clip.name), self.params)
        except DataError as exc:
            problems.append(str(exc))
        try:
            for f in frame_files(frame_dir(self.base, clip.name)):
                try:
                    decode_rgb(f)
                except DataError as exc:
                    problems.append(str(exc))
        except DataError as exc:
            problems.append(str(exc))
        return problems

    def _lists(self) -> dict[str, list[Clip]]:
        """The train and test clip lists; :class:`DataError` with the first problem of the csvs."""
        lists, problems = self._read_lists()
        raise_problems(problems, "cremad")
        return lists

    @staticmethod
    def _rows(lists: dict[str, list[Clip]]) -> list[Clip]:
        """Every listed clip, train then test: the rows of the cache."""
        return lists["train"] + lists["test"]

    def _read_lists(self) -> tuple[dict[str, list[Clip]], list[str]]:
        """``({"train": clips, "test": clips}, problems)``; a clip listed twice keeps its first row."""
        lists: dict[str, list[Clip]] = {}
        problems: list[str] = []
        first_seen: dict[str, str] = {}
        for split in ("train", "test"):
            path = self.base / f"{split}.csv"
            lists[split] = []
            if not path.is_file():
                problems.append(f"{path}: file not found")
                continue
            with open(path, newline="", encoding="utf-8-sig") as f:
                for line, row in enumerate(csv.reader(f), start=1):
                    where = f"{path}:{line}"
                    if not row or not "".join(row).strip():
                        continue
                    fields = [x.strip() for x in row]
                    if len(fields) != 2 or not fields[0] or "/" in fields[0] or fields[0] in (".", ".."):
                        problems.append(f"{where}: malformed row {','.join(row)!r} (expected <clip>,<EMO>)")
                        continue
                    name, emo = fields
                    if emo not in CLASS_NAMES:
                        problems.append(f"{where}: unknown label {emo!r} for clip {name!r}; valid: {', '.join(CLASS_NAMES)}")
                        continue
                    if name in first_seen:
                        problems.append(f"{where}: clip {name!r} listed twice (first at {first_seen[name]})")
                        continue
                    first_seen[name] = where
                    lists[split].append(Clip(name, CLASS_NAMES.index(emo)))
            if not lists[split] and not any(p.startswith(str(path)) for p in problems):
                problems.append(f"{path}: no clips listed")
        return lists, problems

    # ---- loading
    def load(self) -> DataSplits:
        lists = self._lists()
        train_y = np.array([c.label for c in lists["train"]])
        keep, val = carve_validation(train_y, self.val_fraction, self.split_seed, self.base / "train.csv", "clips")
        parts = {"train": [lists["train"][i] for i in keep], "val": [lists["train"][i] for i in val], "test": lists["test"]}
        datasets = (self._cached_datasets if self.cache else self._lazy_datasets)(self._rows(lists), parts)
        return DataSplits(
            **datasets, num_classes=len(CLASS_NAMES), class_names=list(CLASS_NAMES), input_shapes=self.params.shapes()
        )

    def _cached_datasets(self, clips: list[Clip], parts: dict[str, list[Clip]]) -> dict[str, Dataset]:
        arrays = self.decoded.load(self._source(clips), partial(self._decode, clips))
        row = {c.name: i for i, c in enumerate(clips)}
        train_rows = [row[c.name] for c in parts["train"]]
        normalise = Normaliser(
            train_statistics((arrays["image"][i], arrays["audio"][i]) for i in train_rows), self.params.num_frames
        )
        out = {}
        for split, members in parts.items():
            idx = np.array([row[c.name] for c in members], dtype=np.int64)
            out[split] = NormalisedArrayDataset(
                {m: torch.from_numpy(np.ascontiguousarray(a[idx])) for m, a in arrays.items()},
                torch.tensor([c.label for c in members], dtype=torch.long),
                normalise,
            )
        return out

    def _lazy_datasets(self, clips: list[Clip], parts: dict[str, list[Clip]]) -> dict[str, Dataset]:
        for clip in clips:  # cheap: fail now, naming the path, rather than mid-epoch
            if not wav_path(self.base, clip.name).is_file():
                raise DataError(f"{wav_path(self.base, clip.name)}: audio file not found")
            frame_files(frame_dir(self.base, clip.name))
        normalise = Normaliser(self._lazy_statistics(parts["train"]), self.params.num_frames)
        return {split: LazyClips(self.base, members, self.params, normalise) for split, members in parts.items()}

    def _lazy_statistics(self, train: list[Clip]) -> dict[str, dict[str, list[float]]]:
        """Train statistics without a cache: one decoding pass, remembered in a small json next to the cache."""
        path = self.cache_dir / f"stats-{params_key({'clips': [c.name for c in train]})}.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                log.warning("%s: unreadable statistics; recomputing", path)
        decode = lambda c: decode_clip(self.base, c.name, self.params)  # noqa: E731
        stats = train_statistics(parallel_map(decode, train, "cremad: train statistics", self.workers, self.progress))
        atomic_write_json(path, stats)
        return stats

    # ---- the decoding cache
    def build(self, progress: bool | None = None, force: bool = False) -> Path:
        """Decode every listed clip into the cache (unless a valid one exists); returns its folder."""
        if progress is not None:
            self.progress = progress
        clips = self._rows(self._lists())
        return self.decoded.build(self._source(clips), partial(self._decode, clips), force=force)

    def _source(self, clips: list[Clip]) -> dict[str, Any]:
        """What the cache is decoded from: the decoding parameters and the clip names, in row order."""
        return {"version": CACHE_VERSION, "params": asdict(self.params), "clips": [c.name for c in clips]}

    def _decode(self, clips: list[Clip]) -> dict[str, np.ndarray]:
        shapes = self.params.shapes()
        arrays = {
            "image": np.empty((len(clips), *shapes["image"]), dtype=np.uint8),
            "audio": np.empty((len(clips), *shapes["audio"]), dtype=np.float16),
        }
        decode = lambda clip: decode_clip(self.base, clip.name, self.params)  # noqa: E731
        decoded = parallel_map(decode, clips, "cremad: decoding", self.workers, self.progress)
        for i, (frames, mel) in enumerate(decoded):
            arrays["image"][i], arrays["audio"][i] = frames, mel
        return arrays


def synthesise_tree(
    base: str | Path,
    train_per_class: int = 3,
    test_per_class: int = 1,
    *,
    sample_rate: int = 22050,
    seconds: float = 1.0,
    frames_per_clip: int = 3,
    frame_size: tuple[int, int] = (36, 48),
    seed: int = 0,
) -> Path:
    """Write a tiny CREMA-D-layout tree under ``base`` (for tests and the loader benchmark): per class, a
    tone of its own pitch in noise (stereo wavs of varying length) and frames of its own colour in noise."""
    base = Path(base)
    rng = np.random.default_rng(seed)
    (base / "AudioWAV").mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        rows = []
        for label, emo in enumerate(CLASS_NAMES):
            for k in range(per_class):
                name = f"{1001 + k}_{split.upper()}_{emo}_XX"
                n = int(sample_rate * seconds * rng.uniform(0.6, 1.3))
                t = np.arange(n) / sample_rate
                tone = 0.3 * np.sin(2 * np.pi * 220 * (label + 1) * t) + 0.05 * rng.standard_normal(n)
                sf.write(wav_path(base, name), np.stack([tone, tone], axis=1).astype(np.float32), sample_rate)
                folder = frame_dir(base, name)
                folder.mkdir(parents=True, exist_ok=True)
                colour = np.array([(label * 40) % 256, (255 - label * 40) % 256, (label * 97) % 256])
                for j in range(frames_per_clip):
                    frame = colour + rng.integers(-30, 30, (*frame_size, 3)) + 10 * j
                    Image.fromarray(frame.clip(0, 255).astype(np.uint8)).save(folder / f"{j + 1:05d}.jpg", quality=90)
                rows.append(f"{name},{emo}\n")
        (base / f"{split}.csv").write_text("".join(rows))
    return base
