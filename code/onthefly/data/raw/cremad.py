"""CREMA-D as distributed: AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav (16 kHz mono)
and VideoFlash/<same id>.flv. The label is the emotion code in the file name."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import UserError
from .common import CONTAINER_DEFAULTS, ClipJob, Scan, require_dir

NAME = "cremad"
MODALITIES = ("audio", "visual")
# The official CREMA-D loader's class order.
CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
EXPECTED = (
    "CREMA-D's layout: <root>/AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav and <root>/VideoFlash/<same id>.flv"
)
# Audio exactly as the official code: librosa.load(sr=22050), tile to 3 s, clip to [-1, 1],
# STFT n_fft 512 hop 353, log(|S| + 1e-7) -> 257 x 188. Frames: 1 per second, all kept,
# the whole 480 x 360 frame stored 256 high and 341 wide (4:3), so the loader can take the
# official RandomResizedCrop of the full frame (or, with --frame_crop fixed, 224 crops).
DEFAULTS: dict[str, Any] = {
    **CONTAINER_DEFAULTS,
    "audio_source": "file",
    "sample_rate": 22050,
    "duration": 3.0,
    "n_fft": 512,
    "hop_length": 353,
    "max_frames": 0,
    "frame_aspect": 4 / 3,
}
SPLIT_OPTIONS = ("speaker_independent", "random_split")
# The official split lists, vendored with their MIT notice (see the README beside them).
OFFICIAL_LISTS = Path(__file__).resolve().parents[4] / "data" / "splits" / "cremad"
VIDEO_EXTS = (".flv", ".mp4", ".avi", ".mkv")
_NAME_RE = re.compile(r"^(\d+)_([A-Za-z]+)_([A-Za-z]{3})_([A-Za-z]+)$")


def uses_groups(opts: Any) -> bool:
    return bool(getattr(opts, "speaker_independent", False))


def read_official_lists(folder: Path = OFFICIAL_LISTS) -> dict[str, str]:
    """clip id -> "train" or "test" from the official train.csv and test.csv ({} when absent)."""
    out: dict[str, str] = {}
    for split in ("train", "test"):
        path = folder / f"{split}.csv"
        if not path.is_file():
            return {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out[line.split(",")[0].strip()] = split
    return out


def _examples(ids: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(sorted(ids)[:n])
    return shown + (", ..." if len(ids) > n else "")


def _apply_official_split(found: Scan, opts: Any) -> None:
    """The official lists decide the split: a clip in no list is ignored (as the official loader
    ignores it) and counted, a listed clip that is absent is counted. A seeded split only on
    --random_split / --speaker_independent, never as a fallback."""
    if uses_groups(opts) or getattr(opts, "random_split", False):
        found.notes.append("seeded split (--speaker_independent or --random_split): the official lists are not used")
        return
    lists = read_official_lists()
    if not lists:
        raise UserError(
            f"the official CREMA-D split lists are missing ({OFFICIAL_LISTS}/train.csv, test.csv); "
            "restore them, or pass --random_split for a seeded split"
        )
    found.unlisted = sorted(
        {j.clip_id for j in found.jobs if j.clip_id not in lists}
        | {s[0] for s in found.skipped if s[0] not in lists and _NAME_RE.match(s[0])}
    )
    unlisted = set(found.unlisted)
    found.jobs = [j for j in found.jobs if j.clip_id not in unlisted]
    found.skipped = [s for s in found.skipped if s[0] not in unlisted]
    present = {j.clip_id for j in found.jobs} | {s[0] for s in found.skipped}
    found.listed_absent = sorted(c for c in lists if c not in present)
    for job in found.jobs:
        job.split = lists[job.clip_id]
    splits = [j.split for j in found.jobs]
    found.notes.append(
        f"official split: test list as test ({splits.count('test')} clips), val carved from the "
        f"train list ({splits.count('train')} clips)"
    )
    if found.unlisted:
        found.notes.append(
            f"{len(found.unlisted)} clip(s) in neither official list are ignored "
            f"({_examples(found.unlisted)}); --random_split uses every clip"
        )
    if found.listed_absent:
        found.notes.append(
            f"{len(found.listed_absent)} clip(s) of the official lists are not under --root "
            f"({_examples(found.listed_absent)})"
        )


def scan(root: str, opts: Any) -> Scan:
    audio_dir = os.path.join(root, "AudioWAV")
    video_dir = os.path.join(root, "VideoFlash")
    if not os.path.isdir(audio_dir) and os.path.basename(root.rstrip("/")) in ("AudioWAV", "VideoFlash"):
        raise UserError(
            f"--root {root}: give the CREMA-D folder that holds AudioWAV/ and VideoFlash/ (expected {EXPECTED})"
        )
    require_dir(audio_dir, EXPECTED)
    require_dir(video_dir, EXPECTED)
    videos = {}
    for name in os.listdir(video_dir):
        stem, ext = os.path.splitext(name)
        if ext.lower() in VIDEO_EXTS and (stem not in videos or ext.lower() == ".flv"):
            videos[stem] = os.path.join(video_dir, name)
    jobs: list[ClipJob] = []
    skipped: list[tuple[str, str, str]] = []
    audio_ids = set()
    for name in sorted(os.listdir(audio_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() != ".wav":
            continue
        audio_ids.add(stem)
        m = _NAME_RE.match(stem)
        if not m or m.group(3).upper() not in CLASSES:
            skipped.append(
                (stem, "file name is not <actor>_<sentence>_<emotion>_<level> with a known emotion", f"AudioWAV/{name}")
            )
            continue
        if stem not in videos:
            skipped.append((stem, "missing video VideoFlash/" + stem + ".flv", f"AudioWAV/{name}"))
            continue
        jobs.append(
            ClipJob(
                clip_id=stem,
                label=CLASSES.index(m.group(3).upper()),
                audio=os.path.join(audio_dir, name),
                video=videos[stem],
                group=m.group(1),
            )
        )
    for stem in sorted(set(videos) - audio_ids):  # the reverse case: a video without its WAV
        if _NAME_RE.match(stem):
            skipped.append((stem, f"missing audio AudioWAV/{stem}.wav", os.path.relpath(videos[stem], root)))
    if not jobs and not any(s[1].startswith("missing ") for s in skipped):
        raise UserError(f"--root {root}: no CREMA-D clips found in AudioWAV/ (expected {EXPECTED})")
    found = Scan(class_names=list(CLASSES), jobs=jobs, skipped=skipped)
    _apply_official_split(found, opts)
    return found
