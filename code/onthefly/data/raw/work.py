"""Per-clip work files: what one worker extracts from one clip, kept in `<out>/.work/` so an
interrupted preprocessing run resumes where it stopped."""
from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import numpy as np

from ...fileio import atomic_write, atomic_write_json, read_json_object
from .common import ClipJob
from .media import SkipClip, decode_container_audio, first_line, load_audio_file, log_spectrogram, read_frames

WORK_DIR = ".work"
PARAMS_FILE = "params.json"


def source_signature(job: ClipJob) -> list[Any]:
    sig = []
    for path in (job.audio, job.video):
        if path and os.path.exists(path):
            st = os.stat(path)
            sig.append([os.path.basename(path), st.st_size, st.st_mtime_ns])
        else:
            sig.append(None)
    return sig


def work_path(work_dir: str, job: ClipJob) -> str:
    return os.path.join(work_dir, job.work_key() + ".npz")


def process_clip(job: ClipJob, p: dict[str, Any], modalities: tuple[str, ...], work_dir: str) -> tuple[str, str, Any]:
    """Worker: extract one clip into `<work_dir>/<key>.npz`.

    Returns (clip_id, "ok", shapes) or (clip_id, "skip", (reason, file at fault))."""
    current = job.video
    try:
        out: dict[str, np.ndarray] = {}
        if "audio" in modalities:
            if p["audio_source"] == "file":
                current = job.audio
                y = load_audio_file(job.audio, p)
            else:
                y = decode_container_audio(job.video, p)
            out["audio"] = log_spectrogram(y, p)
        current = job.video
        rgb, flow = read_frames(job.video, p, with_flow="flow" in modalities)
        out["visual"] = np.ascontiguousarray(rgb.transpose(0, 3, 1, 2))  # stored channel-planar
        if flow is not None:
            out["flow"] = np.ascontiguousarray(flow.transpose(0, 3, 1, 2))
    except SkipClip as e:
        return job.clip_id, "skip", (str(e), current or "")
    except Exception as e:  # an unexpected failure on one file must not stop the run
        return job.clip_id, "skip", (f"failed: {type(e).__name__}: {first_line(e)}", current or "")
    info = {
        "clip_id": job.clip_id,
        "sig": source_signature(job),
        "shapes": {k: list(v.shape) for k, v in out.items()},
    }
    atomic_write(work_path(work_dir, job), lambda f: np.savez(f, _info=np.array(json.dumps(info)), **out))
    return job.clip_id, "ok", info["shapes"]


def read_work_info(path: str) -> dict[str, Any] | None:
    """The small `_info` record of a work file, or None when it is missing or damaged."""
    try:
        with zipfile.ZipFile(path) as zf:
            with zf.open("_info.npy") as f:
                arr = np.lib.format.read_array(f, allow_pickle=False)
            names = set(zf.namelist())
        info = json.loads(str(arr))
        if not all(f"{k}.npy" in names for k in info["shapes"]):
            return None
        return info
    except Exception:
        return None


def load_work(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if not k.startswith("_")}


def read_params(work_dir: str) -> dict[str, Any] | None:
    """The parameters the unfinished work in `work_dir` was made with (None: none or unreadable)."""
    return read_json_object(os.path.join(work_dir, PARAMS_FILE))


def write_params(work_dir: str, params: dict[str, Any]) -> None:
    atomic_write_json(os.path.join(work_dir, PARAMS_FILE), params)
