"""AVE (Audio-Visual Event dataset): <root>/Annotations.txt and trainSet.txt, valSet.txt,
testSet.txt (lines Category&VideoID&Quality&StartTime&EndTime; a header line is skipped),
and the 10 s videos <VideoID>.mp4 anywhere under <root> (as distributed: AVE/). The whole
clip is labelled with its event category (28 classes, sorted by name); the official
train/val/test lists are used as they are. <root> may also be the folder above AVE_Dataset/."""

from __future__ import annotations

import os
from typing import Any

from ...errors import UserError
from .common import CONTAINER_DEFAULTS, ClipJob, Scan, index_videos, unlisted_note, unlisted_videos

NAME = "ave"
MODALITIES = ("audio", "visual")
EXPECTED = (
    "AVE's layout: <root>/Annotations.txt, <root>/trainSet.txt, valSet.txt, testSet.txt "
    "(Category&VideoID&Quality&StartTime&EndTime) and <root>/AVE/<VideoID>.mp4"
)
DEFAULTS: dict[str, Any] = dict(CONTAINER_DEFAULTS)
NUM_CLASSES = 28
SET_FILES = (("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt"))


def _read_lines(path: str) -> list[tuple[str, str]]:
    """(category, video id) of every annotation line."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = [p.strip() for p in line.strip().split("&")]
            if len(parts) < 2 or not parts[1] or parts[1].lower() == "videoid":
                continue
            out.append((parts[0], parts[1]))
    return out


def scan(root: str, opts: Any) -> Scan:
    base = root
    if not os.path.isfile(os.path.join(base, "Annotations.txt")) and os.path.isdir(os.path.join(root, "AVE_Dataset")):
        base = os.path.join(root, "AVE_Dataset")
    ann = os.path.join(base, "Annotations.txt")
    if not os.path.isfile(ann):
        raise UserError(f"--root {root}: no Annotations.txt (expected {EXPECTED})")
    missing = [name for _, name in SET_FILES if not os.path.isfile(os.path.join(base, name))]
    if missing:
        raise UserError(f"--root {root}: missing {', '.join(missing)} (expected {EXPECTED})")
    classes = sorted({c for c, _ in _read_lines(ann)})
    if not classes:
        raise UserError(f"{ann}: no annotation lines (expected {EXPECTED})")
    videos = index_videos(base)
    if not videos:
        raise UserError(f"--root {root}: no video files found (expected {EXPECTED})")
    jobs, skipped, seen = [], [], set()
    for split, name in SET_FILES:
        for cat, vid in _read_lines(os.path.join(base, name)):
            if vid in seen:
                continue
            seen.add(vid)
            if cat not in classes:
                skipped.append((vid, f"category {cat!r} not in Annotations.txt", name))
                continue
            if vid not in videos:
                skipped.append((vid, f"missing video ({vid}.mp4 not found)", name))
                continue
            jobs.append(ClipJob(clip_id=vid, label=classes.index(cat), video=videos[vid], split=split))
    notes = []
    if len(classes) != NUM_CLASSES:
        notes.append(f"{len(classes)} categories in Annotations.txt; AVE has {NUM_CLASSES}")
    unlisted = unlisted_videos(videos, jobs)
    notes += unlisted_note(unlisted, "trainSet.txt, valSet.txt or testSet.txt")
    return Scan(class_names=classes, jobs=jobs, skipped=skipped, notes=notes, unlisted=unlisted)
