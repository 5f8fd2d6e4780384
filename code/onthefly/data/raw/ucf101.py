"""UCF101 as distributed: <root>/UCF-101/<Class>/v_<Class>_gXX_cYY.avi and
<root>/ucfTrainTestlist/ (classInd.txt, trainlist0N.txt, testlist0N.txt). Modalities:
RGB frames ("visual") and Farneback optical flow ("flow", u/v). --split N picks the
official split; val is carved from its train list, whole gXX groups per class."""

from __future__ import annotations

import os
import re
from typing import Any

from ...errors import UserError
from .common import ClipJob, Scan, require_dir

NAME = "ucf101"
MODALITIES = ("visual", "flow")
EXPECTED = (
    "UCF101's layout: <root>/UCF-101/<Class>/v_<Class>_gXX_cYY.avi and <root>/ucfTrainTestlist/ "
    "with classInd.txt, trainlist0N.txt and testlist0N.txt"
)
DEFAULTS: dict[str, Any] = {
    "fps": 1.0,
    "short_side": 256,
    "max_frames": 0,
    # flow in pixels of the stored frames, clipped to [-20, 20], stored as uint8 0..254
    "flow_bound": 20.0,
    "flow_method": "farneback(pyr_scale=0.5,levels=3,winsize=15,iterations=3,poly_n=5,poly_sigma=1.2)",
    "crop_size": 224,
}
SPLIT_OPTIONS = ("split",)
_GROUP_RE = re.compile(r"_g(\d+)_c(\d+)$")


def uses_groups(opts: Any) -> bool:
    return True


def _list_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return [ln.split()[0].replace("\\", "/") for ln in f if ln.strip()]


def scan(root: str, opts: Any) -> Scan:
    videos_dir = os.path.join(root, "UCF-101")
    lists_dir = os.path.join(root, "ucfTrainTestlist")
    require_dir(videos_dir, EXPECTED)
    require_dir(lists_dir, EXPECTED)
    split = int(getattr(opts, "split", None) or 1)
    if split not in (1, 2, 3):
        raise UserError(f"--split {split}: UCF101 has official splits 1, 2 and 3")
    names = {"classInd.txt": None, f"trainlist0{split}.txt": None, f"testlist0{split}.txt": None}
    for n in names:
        path = os.path.join(lists_dir, n)
        if not os.path.isfile(path):
            raise UserError(f"--root {root}: missing ucfTrainTestlist/{n} (expected {EXPECTED})")
        names[n] = path
    classes_by_idx = {}
    with open(names["classInd.txt"], encoding="utf-8") as f:
        for ln in f:
            parts = ln.split()
            if len(parts) >= 2 and parts[0].isdigit():
                classes_by_idx[int(parts[0])] = parts[1]
    if not classes_by_idx:
        raise UserError(f"{names['classInd.txt']}: no '<index> <Class>' lines")
    classes = [classes_by_idx[k] for k in sorted(classes_by_idx)]
    class_of = {c.lower(): i for i, c in enumerate(classes)}
    on_disk = {}
    for dirpath, _dirs, files in os.walk(videos_dir):
        for fn in files:
            if fn.lower().endswith(".avi"):
                full = os.path.join(dirpath, fn)
                on_disk[os.path.relpath(full, videos_dir).replace(os.sep, "/").lower()] = full
    if not on_disk:
        raise UserError(f"--root {root}: no .avi files under UCF-101/ (expected {EXPECTED})")
    jobs, skipped, seen, listed = [], [], set(), set()
    for sp, key in (("train", f"trainlist0{split}.txt"), ("test", f"testlist0{split}.txt")):
        for entry in _list_lines(names[key]):
            listed.add(entry.lower())
            cls_dir, _, fname = entry.rpartition("/")
            stem = os.path.splitext(fname)[0]
            if stem in seen:
                continue
            seen.add(stem)
            label = class_of.get(cls_dir.lower())
            if label is None:
                skipped.append((stem, f"class folder {cls_dir!r} not in classInd.txt", key))
                continue
            path = on_disk.get(entry.lower())
            if path is None:
                skipped.append((stem, f"missing video UCF-101/{entry}", key))
                continue
            m = _GROUP_RE.search(stem)
            group = f"{classes[label]}/g{m.group(1)}" if m else f"{classes[label]}/{stem}"
            jobs.append(ClipJob(clip_id=stem, label=label, video=path, split=sp, group=group))
    notes = []
    unlisted = sorted(os.path.splitext(os.path.basename(k))[0] for k in set(on_disk) - listed)
    if unlisted:
        notes.append(f"{len(unlisted)} videos under UCF-101/ are in neither list of split {split} and are not used")
    return Scan(class_names=classes, jobs=jobs, skipped=skipped, notes=notes, unlisted=unlisted)
