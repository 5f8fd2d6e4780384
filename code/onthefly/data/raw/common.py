"""What the layout modules share: the clip job and scan records, finding videos under a
root, split names, and the extraction defaults of the 10 s container datasets."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ...errors import UserError

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".flv", ".mov", ".m4v")


@dataclass
class ClipJob:
    """One clip to process. Paths are absolute; `split` is None where the dataset has no list."""

    clip_id: str
    label: int
    video: str | None = None  # frames (and the audio track where audio_source is "video")
    audio: str | None = None  # a separate audio file (CREMA-D's WAVs)
    split: str | None = None
    group: str | None = None  # actor / UCF101 group: kept together when a split is carved

    def work_key(self) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.clip_id)
        if safe != self.clip_id or safe.startswith("."):
            safe = f"{safe.lstrip('.')}_{hashlib.sha1(self.clip_id.encode()).hexdigest()[:8]}"
        return safe


@dataclass
class Scan:
    """What a layout module finds under --root."""

    class_names: list[str]
    jobs: list[ClipJob]
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (clip_id, reason, source)
    notes: list[str] = field(default_factory=list)
    # Where the dataset ships split lists: clips found but in no list (ignored, as the official
    # code ignores them) and listed clips not found at all. Both are counted in the summary and
    # in meta.json ("split" record), never silently dropped.
    unlisted: list[str] = field(default_factory=list)
    listed_absent: list[str] = field(default_factory=list)

    def split_record(self) -> dict[str, Any]:
        """The split's provenance, as written to meta.json."""
        source = "lists" if any(j.split for j in self.jobs) else "seeded"  # seeded: carved here
        return {"source": source, "unlisted": len(self.unlisted), "listed_absent": len(self.listed_absent)}


# --------------------------------------------------------------------------- helpers for layouts


def index_videos(root: str, exts: Iterable[str] = VIDEO_EXTS) -> dict[str, str]:
    """Map file stem -> path of every video under root (the first found wins)."""
    exts = tuple(e.lower() for e in exts)
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() in exts and stem not in found:
                found[stem] = os.path.join(dirpath, name)
    return found


def require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise UserError(f"--root: expected {what} at {path}")


def rel(path: str | None, root: str) -> str:
    if not path:
        return ""
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return path


# Kinetics-Sounds, AVE and VGGSound: 10 s clips whose audio is decoded from the video.
# 16 kHz, the first 10 s (tiled when shorter), STFT n_fft 512 with hop 853 gives
# 257 x 188, the CREMA-D input size (one 32 ms window every 53 ms).
CONTAINER_DEFAULTS: dict[str, Any] = {
    "audio_source": "video",
    "sample_rate": 16000,
    "duration": 10.0,
    "n_fft": 512,
    "hop_length": 853,
    "stft_pad_mode": "constant",
    "log_eps": 1e-7,
    "min_audio_seconds": 0.1,
    "silence_threshold": 1e-4,
    "fps": 1.0,
    "short_side": 256,
    "max_frames": 10,
    "crop_size": 224,
}

# Farneback optical flow in pixels of the stored frames, clipped to [-20, 20], stored as uint8 0..254:
# UCF101's second stream, and Kinetics-Sounds' third on request (--with_flow).
FLOW_DEFAULTS: dict[str, Any] = {
    "flow_bound": 20.0,
    "flow_method": "farneback(pyr_scale=0.5,levels=3,winsize=15,iterations=3,poly_n=5,poly_sigma=1.2)",
}


def layout_modalities(layout: Any, opts: Any) -> tuple[str, ...]:
    """The streams a preprocessing run extracts: the layout's own, plus its OPTIONAL_MODALITIES
    (Kinetics-Sounds' flow) when asked for with --with_flow."""
    asked = getattr(opts, "with_flow", False) and "flow" in getattr(layout, "OPTIONAL_MODALITIES", ())
    return tuple(layout.MODALITIES) + (("flow",) if asked else ())


_SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validate": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def normalize_split(value: str) -> str | None:
    return _SPLIT_NAMES.get(value.strip().lower())


def unlisted_videos(videos: dict[str, str], jobs: Iterable[ClipJob]) -> list[str]:
    """Stems of the videos found that no listed clip uses (ignored, and counted)."""
    used = {j.video for j in jobs}
    return sorted(stem for stem, path in videos.items() if path not in used)


def unlisted_note(unlisted: list[str], lists: str) -> list[str]:
    """The note on videos that no list names (none when there are none)."""
    if not unlisted:
        return []
    shown = ", ".join(unlisted[:3]) + (", ..." if len(unlisted) > 3 else "")
    return [f"{len(unlisted)} video(s) are named in no row of {lists} and are not used ({shown})"]


def find_video(videos: dict[str, str], stems: Iterable[str]) -> str | None:
    for stem in stems:
        if stem in videos:
            return videos[stem]
    return None
