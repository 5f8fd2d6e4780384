"""VGGSound: the official vggsound.csv (rows youtube_id,start_seconds,label,split, no
header; split is train or test) and the downloaded 10 s clips anywhere under --videos
(default --root), named <id>_<start:06d>.mp4 (also accepted: <id>_<start>.mp4,
<id>_<start:06d>_<start+10:06d>.mp4, <id>.mp4). Rows whose video is absent are listed
in skipped.tsv (many YouTube videos are gone)."""

from __future__ import annotations

import os
from typing import Any

from ...errors import UserError
from .common import (
    CONTAINER_DEFAULTS,
    ClipJob,
    Scan,
    find_video,
    index_videos,
    normalize_split,
    unlisted_note,
    unlisted_videos,
)
from .kinetics_sounds import read_table

NAME = "vggsound"
MODALITIES = ("audio", "visual")
EXPECTED = (
    "VGGSound: <root>/vggsound.csv (youtube_id,start_seconds,label,split) or --csv, and videos "
    "<id>_<start:06d>.mp4 under <root> or --videos"
)
DEFAULTS: dict[str, Any] = {**CONTAINER_DEFAULTS, "max_frames": 3}
NUM_CLASSES = 309


def _find_csv(root: str, opts: Any) -> str:
    given = getattr(opts, "csv", None)
    if given:
        if not os.path.isfile(given):
            raise UserError(f"--csv {given}: no such file")
        return given
    default = os.path.join(root, "vggsound.csv")
    if os.path.isfile(default):
        return default
    csvs = sorted(n for n in os.listdir(root) if n.lower().endswith(".csv"))
    if len(csvs) == 1:
        return os.path.join(root, csvs[0])
    raise UserError(f"--root {root}: no vggsound.csv (expected {EXPECTED})")


def scan(root: str, opts: Any) -> Scan:
    table = _find_csv(root, opts)
    rows = read_table(table, ("id", "start", "label", "split"))
    vroot = getattr(opts, "videos", None) or root
    if not os.path.isdir(vroot):
        raise UserError(f"--videos {vroot}: no such directory")
    videos = index_videos(vroot)
    if not videos:
        raise UserError(f"{vroot}: no video files found (expected {EXPECTED})")
    classes = sorted({r["label"] for r in rows})
    jobs, skipped, seen = [], [], set()
    for r in rows:
        try:
            start = int(float(r.get("start", "")))
        except ValueError:
            skipped.append((r["id"], f"bad start_seconds {r.get('start')!r}", os.path.basename(table)))
            continue
        cid = f"{r['id']}_{start:06d}"
        if cid in seen:
            continue
        seen.add(cid)
        split = normalize_split(r.get("split", ""))
        if split is None:
            skipped.append((cid, f"unknown split value {r.get('split', '')!r}", os.path.basename(table)))
            continue
        stems = (cid, f"{r['id']}_{start}", f"{cid}_{start + 10:06d}", r["id"])
        path = find_video(videos, stems)
        if path is None:
            skipped.append((cid, f"missing video ({cid}.mp4 not found)", os.path.basename(table)))
            continue
        jobs.append(ClipJob(clip_id=cid, label=classes.index(r["label"]), video=path, split=split))
    notes = []
    if len(classes) != NUM_CLASSES:
        notes.append(f"{len(classes)} classes in {os.path.basename(table)}; VGGSound has {NUM_CLASSES}")
    unlisted = unlisted_videos(videos, jobs)
    notes += unlisted_note(unlisted, os.path.basename(table))
    return Scan(class_names=classes, jobs=jobs, skipped=skipped, notes=notes, unlisted=unlisted)
