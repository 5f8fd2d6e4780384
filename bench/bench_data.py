"""Data-path benchmark: the training loader on the cache vs the official-style path.

Both run side by side in one process on the same CREMA-D-sized media, written to a
temporary folder: WAVs of 2.5 s at 16 kHz and 480x360 JPEG frames.

  official-style, per sample: librosa.load(sr=22050), tile to 3 s, clip, STFT (n_fft 512,
      hop 353), log; PIL open of a JPEG, RandomResizedCrop(224), flip, ToTensor, Normalize.
  cache, per sample:          a float16 spectrogram and uint8 frames read from memory maps,
      one random 224 crop + flip shared by the clip's frames (normalisation happens later
      on the GPU, on uint8 batches).

Single process, one thread (a DataLoader worker's setting), batches collated by a
DataLoader with num_workers=0. The cache is read from the page cache (warm), as a
training run sees it after its first epoch.

    python bench/bench_data.py --out runs/bench_data.json

(with onthefly installed by the README's set-up; elsewhere prefix PYTHONPATH=code)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_media(folder: Path, n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    import cv2
    import soundfile as sf

    rng = np.random.default_rng(seed)
    wavs, jpgs = [], []
    sr = 16000
    t = np.arange(int(2.5 * sr)) / sr
    yy, xx = np.mgrid[0:360, 0:480]
    for i in range(n):
        y = 0.3 * np.sin(2 * np.pi * (150 + 10 * i) * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
        y = (y + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
        wavs.append(str(folder / f"{i:04d}.wav"))
        sf.write(wavs[-1], y, sr)
        # a face-sized blob on a textured background: a JPEG that compresses like a video frame
        img = np.stack([(xx + 3 * i) % 256, (yy * 2) % 256, ((xx + yy) // 2) % 256], -1).astype(np.float32)
        img += 25 * rng.standard_normal((360, 480, 1))
        cy, cx = 180 + rng.integers(-20, 20), 240 + rng.integers(-20, 20)
        img[(yy - cy) ** 2 / 110**2 + (xx - cx) ** 2 / 85**2 < 1] = (90, 140, 200)
        jpgs.append(str(folder / f"{i:04d}.jpg"))
        cv2.imwrite(jpgs[-1], np.clip(img, 0, 255).astype(np.uint8))
    return wavs, jpgs


class OfficialStyle:
    """The per-sample work of the official CREMA-D loader (one frame)."""

    def __init__(self, wavs: list[str], jpgs: list[str], num_frames: int = 1):
        from torchvision import transforms

        self.wavs, self.jpgs, self.num_frames = wavs, jpgs, num_frames
        self.transform = transforms.Compose(
            [
                transforms.RandomResizedCrop(224),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )

    def __len__(self) -> int:
        return len(self.wavs)

    def audio(self, i: int):
        import librosa

        samples, _ = librosa.load(self.wavs[i], sr=22050)
        resamples = np.tile(samples, 3)[: 22050 * 3]
        resamples[resamples > 1.0] = 1.0
        resamples[resamples < -1.0] = -1.0
        spectrogram = librosa.stft(resamples, n_fft=512, hop_length=353)
        return np.log(np.abs(spectrogram) + 1e-7)

    def frames(self, i: int):
        import torch
        from PIL import Image

        images = torch.zeros((3, self.num_frames, 224, 224))
        for t in range(self.num_frames):
            img = Image.open(self.jpgs[(i + t) % len(self.jpgs)]).convert("RGB")
            images[:, t] = self.transform(img)
        return images

    def __getitem__(self, i: int):
        return self.audio(i), self.frames(i), i % 6


def build_cache(out: Path, wavs: list[str], jpgs: list[str], frames_per_clip: int) -> None:
    """A cremad cache of these media, made with the preprocessing's own functions."""
    import cv2

    from onthefly.data.cache.writer import CacheWriter
    from onthefly.data.raw.cremad import DEFAULTS
    from onthefly.data.raw.media import load_audio_file, log_spectrogram, to_square

    p = dict(DEFAULTS)
    n = len(wavs)
    side = p["short_side"]
    arrays = {
        "audio": ("spectrogram", (1, 257, 188), "float16", n),
        "visual": ("frames", (3, side, side), "uint8", n * frames_per_clip),
    }
    w = CacheWriter(str(out), arrays)
    squares = [cv2.cvtColor(to_square(cv2.imread(j), side), cv2.COLOR_BGR2RGB).transpose(2, 0, 1) for j in jpgs]
    for i, wav in enumerate(wavs):
        w.maps["audio"][i] = log_spectrogram(load_audio_file(wav, p), p)
        for t in range(frames_per_clip):
            w.maps["visual"][i * frames_per_clip + t] = squares[(i + t) % n]
    index = {
        "clip_ids": [f"clip{i}" for i in range(n)],
        "labels": [i % 6 for i in range(n)],
        "splits": ["train"] * n,
        "groups": [None] * n,
        "sources": wavs,
        "offsets": {"visual": list(range(0, n * frames_per_clip + 1, frames_per_clip))},
    }
    meta = {
        "dataset": "cremad",
        "class_names": ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"],
        "params": p,
        "split_counts": {"train": n, "val": 0, "test": 0},
        "stats": {},
    }
    w.commit(meta, index, [])


def timed_loader(dataset, samples: int, batch_size: int) -> float:
    """Seconds per sample through a DataLoader (num_workers=0, shuffled, default collate)."""
    import torch

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True)
    done, start = 0, time.perf_counter()
    while done < samples:
        for _batch in loader:
            done += batch_size
            if done >= samples:
                break
    return (time.perf_counter() - start) / done


def timed_calls(fn, n: int, count: int) -> float:
    start = time.perf_counter()
    for k in range(count):
        fn(k % n)
    return (time.perf_counter() - start) / count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--clips", type=int, default=64, help="distinct synthetic clips")
    ap.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds (median reported)")
    ap.add_argument("--official_samples", type=int, default=128, help="per round")
    ap.add_argument("--cache_samples", type=int, default=2048, help="per round")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--num_frames", type=int, default=1, help="frames per sample (CREMA-D: 1)")
    ap.add_argument("--frames_per_clip", type=int, default=3, help="frames stored per clip in the cache")
    args = ap.parse_args(argv)

    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    from argparse import Namespace

    from onthefly.data.cache.registration import cache_build

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "media").mkdir()
        wavs, jpgs = make_media(tmp_path / "media", args.clips)
        build_cache(tmp_path / "cache", wavs, jpgs, args.frames_per_clip)

        official = OfficialStyle(wavs, jpgs, args.num_frames)
        cached = cache_build("cremad", Namespace(data=str(tmp_path / "cache"), num_frames=args.num_frames), "train", 1)
        for i in range(4):  # warm-up: lazy imports, first FFT plans, page cache
            official[i]
            cached[i]
        timed_loader(cached, 4 * args.batch_size, args.batch_size)

        n = len(wavs)
        # Rounds alternate the two paths so that a change of machine load hits both alike;
        # the median round is reported.
        rounds: dict[str, list[float]] = {"audio": [], "frames": [], "official": [], "item": [], "cache": []}
        for _ in range(args.rounds):
            rounds["audio"].append(timed_calls(official.audio, n, 64))
            rounds["frames"].append(timed_calls(official.frames, n, 64))
            rounds["official"].append(timed_loader(official, args.official_samples, args.batch_size))
            rounds["item"].append(timed_calls(cached.__getitem__, n, args.cache_samples))
            rounds["cache"].append(timed_loader(cached, args.cache_samples, args.batch_size))
        med = {k: float(np.median(v)) for k, v in rounds.items()}
        audio_ms, frame_ms, off_s, item_s, cache_s = (
            1e3 * med["audio"],
            1e3 * med["frames"],
            med["official"],
            med["item"],
            med["cache"],
        )

    result = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
        },
        "setup": {
            "clips": args.clips,
            "num_frames": args.num_frames,
            "batch_size": args.batch_size,
            "audio": "2.5 s 16 kHz WAV -> 1x257x188",
            "frames": "480x360 JPEG -> 224x224",
            "threads": 1,
            "dataloader_workers": 0,
        },
        "official_style": {
            "samples_per_s": 1.0 / off_s,
            "ms_per_sample": 1e3 * off_s,
            "audio_ms": audio_ms,
            "frames_ms": frame_ms,
        },
        "cache": {"samples_per_s": 1.0 / cache_s, "ms_per_sample": 1e3 * cache_s, "getitem_ms": 1e3 * item_s},
        "rounds_s_per_sample": rounds,
    }
    speedup = off_s / cache_s
    result["speedup_per_core"] = speedup
    result["projected_16_cores_samples_per_s"] = 16.0 / cache_s
    rows = [
        (
            "official-style (librosa + PIL/torchvision)",
            result["official_style"]["samples_per_s"],
            result["official_style"]["ms_per_sample"],
        ),
        ("cache loader (memory-mapped arrays)", result["cache"]["samples_per_s"], result["cache"]["ms_per_sample"]),
    ]
    print(
        f"CREMA-D-shaped samples (audio 1x257x188 + {args.num_frames} frame(s) 224x224), one core, "
        f"batch {args.batch_size}, collated"
    )
    print(f"{'path':<45} {'samples/s':>10} {'ms/sample':>10}")
    for name, sps, ms in rows:
        print(f"{name:<45} {sps:>10.0f} {ms:>10.3f}")
    print(
        f"official-style parts: audio {audio_ms:.2f} ms, frames {frame_ms:.2f} ms per sample; "
        f"cache __getitem__ alone {1e3 * item_s:.3f} ms"
    )
    print(
        f"speed-up per core: {speedup:.1f}x; 16 cores at this rate: {16.0 / cache_s:,.0f} samples/s "
        "(before inter-process transfer)"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
