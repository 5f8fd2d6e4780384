"""Kinetics-Sounds: 10 s video clips (mp4 with an audio track), given either as

  class folders:  <root>/<class>/<clip>.mp4, or <root>/{train,val,test}/<class>/<clip>.mp4
  a CSV:          <root>/<name>.csv (or --csv) with columns id,label,split (a header row
                  naming them is optional; youtube_id, time_start and time_end columns of
                  the Kinetics CSVs are understood) and the videos anywhere under --videos
                  (default --root), named <id>.mp4, <id>_<start:06d>_<end:06d>.mp4 or
                  <id>_<start:06d>.mp4.

With --with_flow, Farneback optical flow between each kept frame and the next decoded one
is stored as a third modality ("flow"), extracted as UCF101's.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from ...errors import UserError
from .common import (
    CONTAINER_DEFAULTS,
    FLOW_DEFAULTS,
    VIDEO_EXTS,
    ClipJob,
    Scan,
    find_video,
    index_videos,
    normalize_split,
    unlisted_note,
    unlisted_videos,
)

NAME = "kinetics_sounds"
MODALITIES = ("audio", "visual")
OPTIONAL_MODALITIES = ("flow",)  # --with_flow
EXPECTED = (
    "Kinetics-Sounds as class folders (<root>/<class>/<clip>.mp4 or <root>/train|val|test/<class>/<clip>.mp4) "
    "or a CSV of id,label,split in <root> (or --csv) with the videos under <root> (or --videos)"
)
DEFAULTS: dict[str, Any] = {**CONTAINER_DEFAULTS, **FLOW_DEFAULTS}  # flow keys count only with --with_flow
NUM_CLASSES = 31

_ID_COLS = ("youtube_id", "id", "video_id", "ytid", "clip_id")
_LABEL_COLS = ("label", "class", "category")
_SPLIT_COLS = ("split", "subset")
_START_COLS = ("time_start", "start", "start_seconds", "start_time")
_END_COLS = ("time_end", "end", "end_seconds", "end_time")


def _col(header: list[str], names: tuple[str, ...]) -> int | None:
    for n in names:
        if n in header:
            return header.index(n)
    return None


def read_table(path: str, positional: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a CSV as dicts with keys id/label/split/start/end (those present).

    A first row naming an id and a label column is a header; otherwise the columns are
    taken in the order `positional`."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the CSV ({e})") from None
    if not rows:
        raise UserError(f"{path}: the CSV is empty")
    header = [c.strip().lower() for c in rows[0]]
    cols: dict[str, int | None]
    if _col(header, _ID_COLS) is not None and _col(header, _LABEL_COLS) is not None:
        cols = {
            "id": _col(header, _ID_COLS),
            "label": _col(header, _LABEL_COLS),
            "split": _col(header, _SPLIT_COLS),
            "start": _col(header, _START_COLS),
            "end": _col(header, _END_COLS),
        }
        rows = rows[1:]
    else:
        cols = {k: i for i, k in enumerate(positional)}
    out = []
    for r in rows:
        d = {k: r[i].strip() for k, i in cols.items() if i is not None and i < len(r)}
        if d.get("id") and d.get("label"):
            out.append(d)
    if not out:
        raise UserError(f"{path}: no rows with an id and a label (expected columns {','.join(positional)})")
    return out


def _seconds(v: str | None) -> int | None:
    try:
        return int(float(v)) if v not in (None, "") else None
    except ValueError:
        return None


def _find_csv(root: str, opts: Any) -> str | None:
    given = getattr(opts, "csv", None)
    if given:
        if not os.path.isfile(given):
            raise UserError(f"--csv {given}: no such file")
        return given
    csvs = sorted(n for n in os.listdir(root) if n.lower().endswith(".csv"))
    if len(csvs) > 1:
        raise UserError(f"--root {root}: several CSV files ({', '.join(csvs)}); choose one with --csv")
    return os.path.join(root, csvs[0]) if csvs else None


def _scan_csv(root: str, opts: Any, table: str) -> Scan:
    rows = read_table(table, ("id", "label", "split"))
    vroot = getattr(opts, "videos", None) or root
    if not os.path.isdir(vroot):
        raise UserError(f"--videos {vroot}: no such directory")
    videos = index_videos(vroot)
    classes = sorted({r["label"] for r in rows})
    jobs, skipped, seen = [], [], set()
    has_split = any(r.get("split") for r in rows)
    for r in rows:
        start, end = _seconds(r.get("start")), _seconds(r.get("end"))
        cid = r["id"] if start is None else f"{r['id']}_{start:06d}"
        if cid in seen:
            continue
        seen.add(cid)
        stems = []
        if start is not None and end is not None:
            stems.append(f"{r['id']}_{start:06d}_{end:06d}")
        if start is not None:
            stems.append(f"{r['id']}_{start:06d}")
        stems.append(r["id"])
        split = normalize_split(r.get("split", "")) if has_split else None
        if has_split and split is None:
            skipped.append((cid, f"unknown split value {r.get('split', '')!r}", os.path.basename(table)))
            continue
        path = find_video(videos, stems)
        if path is None:
            skipped.append((cid, f"missing video ({stems[0]}.mp4 not found)", os.path.basename(table)))
            continue
        jobs.append(ClipJob(clip_id=cid, label=classes.index(r["label"]), video=path, split=split))
    return Scan(class_names=classes, jobs=jobs, skipped=skipped, unlisted=unlisted_videos(videos, jobs))


def _class_dirs(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))


def _scan_folders(root: str) -> Scan:
    split_dirs = {normalize_split(d): d for d in _class_dirs(root) if normalize_split(d)}
    if split_dirs and "train" not in split_dirs:
        raise UserError(f"--root {root}: split folders found but no train/ (expected {EXPECTED})")
    sources = [(split, os.path.join(root, d)) for split, d in split_dirs.items()] if split_dirs else [(None, root)]
    entries = []
    for split, base in sources:
        for cls in _class_dirs(base):
            for name in sorted(os.listdir(os.path.join(base, cls))):
                stem, ext = os.path.splitext(name)
                if ext.lower() in VIDEO_EXTS:
                    entries.append((split, cls, stem, os.path.join(base, cls, name)))
    if not entries:
        raise UserError(f"--root {root}: no videos found (expected {EXPECTED})")
    classes = sorted({e[1] for e in entries})
    jobs, ids = [], set()
    for split, cls, stem, path in entries:
        cid = stem if stem not in ids else f"{stem}@{cls}"
        ids.add(cid)
        jobs.append(ClipJob(clip_id=cid, label=classes.index(cls), video=path, split=split))
    return Scan(class_names=classes, jobs=jobs)


def scan(root: str, opts: Any) -> Scan:
    table = _find_csv(root, opts)
    result = _scan_csv(root, opts, table) if table else _scan_folders(root)
    result.notes += unlisted_note(result.unlisted, os.path.basename(table or ""))
    if len(result.class_names) != NUM_CLASSES:
        result.notes.append(f"{len(result.class_names)} classes found; Kinetics-Sounds has {NUM_CLASSES}")
    return result
