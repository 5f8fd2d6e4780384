"""Per-clip work files: what one worker extracts from one clip, kept in `<out>/.work/` so an
interrupted preprocessing run resumes where it stopped."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
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


def _attempt(step: Callable[[], Any], faults: list[tuple[str, str]], path: str | None) -> Any:
    """step(), or None with (reason, file at fault) added to `faults`."""
    try:
        return step()
    except SkipClip as e:
        faults.append((str(e), path or ""))
    except Exception as e:  # an unexpected failure on one file must not stop the run
        faults.append((f"failed: {type(e).__name__}: {first_line(e)}", path or ""))
    return None


def process_clip(job: ClipJob, p: dict[str, Any], modalities: tuple[str, ...], work_dir: str) -> tuple[str, str, Any]:
    """Worker: extract one clip into `<work_dir>/<key>.npz`.

    Returns (clip_id, "ok", shapes) or (clip_id, "skip", (reason, file at fault)). Every file of
    the clip is tried, so a clip whose WAV and video are both broken names both."""
    faults: list[tuple[str, str]] = []
    out: dict[str, np.ndarray] = {}
    if "audio" in modalities:
        from_file = p["audio_source"] == "file"
        audio_path = job.audio if from_file else job.video
        y = _attempt(
            lambda: load_audio_file(job.audio, p) if from_file else decode_container_audio(job.video, p),
            faults,
            audio_path,
        )
        if y is not None:
            out["audio"] = log_spectrogram(y, p)
    frames = _attempt(lambda: read_frames(job.video, p, with_flow="flow" in modalities), faults, job.video)
    if faults:
        first = faults[0][1]
        reason = "; ".join(r if f == first else f"{r}: {os.path.basename(f)}" for r, f in faults)
        return job.clip_id, "skip", (reason, first)
    rgb, flow = frames
    out["visual"] = np.ascontiguousarray(rgb.transpose(0, 3, 1, 2))  # stored channel-planar
    if flow is not None:
        out["flow"] = np.ascontiguousarray(flow.transpose(0, 3, 1, 2))
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
