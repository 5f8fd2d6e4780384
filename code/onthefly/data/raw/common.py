"""Shared machinery from raw media to a cache: audio and frame extraction, the process
pool, the per-clip work files that make a run resumable, and the skip report.

librosa, OpenCV and PyAV are imported inside the functions that need them, so that
`code/preprocess.py --help` and everything on the training side load without them.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ...errors import UserError
from ..cache import FLOW_HALF, atomic_write_json

WORK_DIR = ".work"
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".flv", ".mov", ".m4v")


class SkipClip(Exception):
    """A clip that cannot be used; the message is the reason written to skipped.tsv."""


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


# --------------------------------------------------------------------------- audio


def _check_and_fit(y: np.ndarray, sr: int, p: dict[str, Any]) -> np.ndarray:
    y = np.asarray(y, dtype=np.float32).reshape(-1)
    if y.size == 0:
        raise SkipClip("audio is empty")
    if not np.all(np.isfinite(y)):
        raise SkipClip("audio contains NaN or infinite samples")
    seconds = y.size / sr
    if seconds < p["min_audio_seconds"]:
        raise SkipClip(f"audio too short ({seconds:.3f} s < {p['min_audio_seconds']} s)")
    if float(np.max(np.abs(y))) < p["silence_threshold"]:
        raise SkipClip(f"silent audio (peak below {p['silence_threshold']})")
    n = int(round(p["duration"] * sr))
    if y.size < n:  # the official code tiles short clips (np.tile) before cutting
        y = np.tile(y, int(math.ceil(n / y.size)))
    return np.clip(y[:n], -1.0, 1.0)


def log_spectrogram(y: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    """(1, 1 + n_fft/2, 1 + len/hop) float16 of log(|STFT| + eps), as the official CREMA-D code."""
    import librosa

    spec = librosa.stft(y, n_fft=p["n_fft"], hop_length=p["hop_length"], pad_mode=p["stft_pad_mode"])
    return np.log(np.abs(spec) + p["log_eps"]).astype(np.float16)[None]


def expected_spectrogram_shape(p: dict[str, Any]) -> tuple[int, int, int]:
    n = int(round(p["duration"] * p["sample_rate"]))
    return (1, p["n_fft"] // 2 + 1, 1 + n // p["hop_length"])


def load_audio_file(path: str, p: dict[str, Any]) -> np.ndarray:
    """A WAV (or any file libsndfile reads) resampled by librosa.load to sample_rate, mono."""
    import librosa

    if not os.path.exists(path):
        raise SkipClip("missing audio file")
    try:
        with warnings.catch_warnings():  # a bad file makes librosa warn before it fails
            warnings.simplefilter("ignore")
            y, _ = librosa.load(path, sr=p["sample_rate"], mono=True)
    except Exception as e:  # librosa/soundfile raise many types for a bad file
        raise SkipClip(f"unreadable audio ({type(e).__name__}: {_first_line(e)})") from None
    return _check_and_fit(y, p["sample_rate"], p)


def decode_container_audio(path: str, p: dict[str, Any]) -> np.ndarray:
    """The first audio track of a video container, decoded with PyAV, mixed to mono by
    averaging channels and resampled with librosa (soxr_hq, as librosa.load does)."""
    import av
    import librosa

    if not os.path.exists(path):
        raise SkipClip("missing video file")
    chunks: list[np.ndarray] = []
    rate = None
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise SkipClip("no audio track in the video")
            stream = container.streams.audio[0]
            resampler = None
            for frame in container.decode(stream):
                if resampler is None:
                    rate = frame.sample_rate
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=rate)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
            if resampler is not None:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray())
    except SkipClip:
        raise
    except Exception as e:  # av.error.* and friends
        raise SkipClip(f"unreadable audio track ({type(e).__name__}: {_first_line(e)})") from None
    if not chunks or rate is None:
        raise SkipClip("audio track has no decodable samples")
    y = np.concatenate(chunks, axis=1).mean(axis=0).astype(np.float32)
    if rate != p["sample_rate"]:
        y = librosa.resample(y, orig_sr=rate, target_sr=p["sample_rate"])
    return _check_and_fit(y, p["sample_rate"], p)


# --------------------------------------------------------------------------- frames


def to_square(img: np.ndarray, side: int) -> np.ndarray:
    """Resize so the short side is `side`, then take the centre side x side square."""
    import cv2

    h, w = img.shape[:2]
    scale = side / min(h, w)
    nw, nh = max(side, int(round(w * scale))), max(side, int(round(h * scale)))
    if (nw, nh) != (w, h):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    y0, x0 = (nh - side) // 2, (nw - side) // 2
    return img[y0 : y0 + side, x0 : x0 + side]


def to_whole_frame(img: np.ndarray, side: int, aspect: float) -> np.ndarray:
    """The whole frame resized to side x round(side * aspect) (height x width), nothing cut.

    Keeps what the official CREMA-D pipeline crops from (the full frame), at a fixed size so
    every clip's frames fit one array; a 480 x 360 frame with aspect 4/3 keeps its shape.
    """
    import cv2

    shrink = side < img.shape[0]
    return cv2.resize(img, (int(round(side * aspect)), side), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def fit_frame(img: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    """A decoded frame as stored: the whole frame with --frame_aspect, else the centre square."""
    aspect = float(p.get("frame_aspect") or 0)
    side = int(p["short_side"])
    return to_whole_frame(img, side, aspect) if aspect else to_square(img, side)


def flow_to_uint8(flow: np.ndarray, bound: float) -> np.ndarray:
    """(H, W, 2) float pixels -> uint8: round((clip(f, -B, B) + B) * 127 / B), zero motion = 127."""
    q = (np.clip(flow, -bound, bound) + bound) * (FLOW_HALF / bound)
    return np.round(q).astype(np.uint8)


def farneback(prev_gray: np.ndarray, next_gray: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.calcOpticalFlowFarneback(
        prev_gray, next_gray, None, pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0
    )


def read_frames(path: str, p: dict[str, Any], with_flow: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Frames at `fps` per second (times k/fps, the first decoded frame at or after each),
    as uint8 RGB (n, S, S, 3); with_flow also gives Farneback flow (n, S, S, 2) from each
    kept frame to the next decoded one (for the last frame: from the previous one)."""
    import cv2

    if not path or not os.path.exists(path):
        raise SkipClip("missing video file")
    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            raise SkipClip("unreadable video (OpenCV cannot open it)")
        native = cap.get(cv2.CAP_PROP_FPS)
        if not (native and math.isfinite(native) and 0 < native < 1000):
            native = 25.0
        side, fps = int(p["short_side"]), float(p["fps"])
        frames: list[np.ndarray] = []
        flows: list[np.ndarray] = []
        prev_gray = None  # the previous decoded frame (small, gray); only kept with flow
        pending = None  # gray of the last kept frame, waiting for its successor
        last_prev = None  # the frame decoded before the last kept one
        idx = 0
        while True:
            if not cap.grab():
                break
            t = idx / native
            take = t + 1e-6 >= len(frames) / fps
            if take or with_flow:
                ok, img = cap.retrieve()
                if not ok or img is None:
                    break
                small = fit_frame(img, p)
                gray = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY) if with_flow else None
                if pending is not None:
                    flows.append(flow_to_uint8(farneback(pending, gray), p["flow_bound"]))
                    pending = None
                if take:
                    frames.append(cv2.cvtColor(small, cv2.COLOR_BGR2RGB))
                    if with_flow:
                        pending = gray
                        last_prev = prev_gray
                prev_gray = gray
            idx += 1
        if not frames:
            raise SkipClip("video has no decodable frames")
        if pending is not None:  # the last kept frame had no successor
            if last_prev is not None:
                flows.append(flow_to_uint8(farneback(last_prev, pending), p["flow_bound"]))
            else:
                flows.append(np.full((side, side, 2), FLOW_HALF, np.uint8))
    finally:
        cap.release()
    keep = int(p.get("max_frames") or 0)
    sel = None
    if keep and len(frames) > keep:
        sel = [int((k + 0.5) * len(frames) / keep) for k in range(keep)]
        frames = [frames[i] for i in sel]
    rgb = np.stack(frames)
    if not with_flow:
        return rgb, None
    if sel is not None:
        flows = [flows[i] for i in sel]
    return rgb, np.stack(flows)


# --------------------------------------------------------------------------- one clip


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def _source_signature(job: ClipJob) -> list[Any]:
    sig = []
    for path in (job.audio, job.video):
        if path and os.path.exists(path):
            st = os.stat(path)
            sig.append([os.path.basename(path), st.st_size, st.st_mtime_ns])
        else:
            sig.append(None)
    return sig


def _work_path(work_dir: str, job: ClipJob) -> str:
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
        return job.clip_id, "skip", (f"failed: {type(e).__name__}: {_first_line(e)}", current or "")
    info = {
        "clip_id": job.clip_id,
        "sig": _source_signature(job),
        "shapes": {k: list(v.shape) for k, v in out.items()},
    }
    path = _work_path(work_dir, job)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, _info=np.array(json.dumps(info)), **out)
    os.replace(tmp, path)
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


# --------------------------------------------------------------------------- the pool


def _init_worker() -> None:
    try:
        import cv2

        cv2.setNumThreads(1)
    except Exception:
        pass


def _ping() -> int:
    return os.getpid()


def run_jobs(
    fn: Callable[..., tuple[str, str, Any]],
    jobs: list[ClipJob],
    args: tuple,
    workers: int,
    progress: Callable[[], None] | None = None,
) -> Iterator[tuple[str, str, Any]]:
    """Run fn(job, *args) for every job and yield its result as it finishes.

    workers <= 0 runs in this process. Otherwise a pool of `workers` processes
    with at most 2 x workers jobs in flight. If a worker process dies (a decoder crash on
    a broken file), the jobs that were in flight are retried one at a time in a fresh
    single-process pool; the one that kills it again is reported as skipped.
    """
    if workers <= 0:
        _init_worker()
        for job in jobs:
            yield fn(job, *args)
            if progress:
                progress()
        return
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")  # workers fork from a clean, pre-warmed server
        ctx.set_forkserver_preload([f"{__package__}.warm"])
    else:
        ctx = mp.get_context("spawn")
    todo = list(reversed(jobs))
    suspects: list[ClipJob] = []
    while todo or suspects:
        if suspects:  # isolate: one job per pool
            job = suspects.pop()
            with cf.ProcessPoolExecutor(1, mp_context=ctx, initializer=_init_worker) as ex:
                try:
                    ex.submit(_ping).result()
                except cf.process.BrokenProcessPool:
                    raise UserError("--workers: worker processes fail to start; rerun with --workers 0") from None
                try:
                    result = ex.submit(fn, job, *args).result()
                except cf.process.BrokenProcessPool:
                    result = (job.clip_id, "skip", ("decoder crashed the worker process", job.video or ""))
            yield result
            if progress:
                progress()
            continue
        ex = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker)
        inflight: dict[cf.Future, ClipJob] = {}
        broken = False
        try:
            while todo or inflight:
                while todo and len(inflight) < 2 * workers:
                    job = todo.pop()
                    inflight[ex.submit(fn, job, *args)] = job
                done, _ = cf.wait(list(inflight), return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    job = inflight.pop(fut)
                    try:
                        result = fut.result()
                    except cf.process.BrokenProcessPool:
                        broken = True
                        suspects.append(job)
                        continue
                    yield result
                    if progress:
                        progress()
                if broken:
                    suspects.extend(inflight.values())
                    inflight.clear()
                    break
        finally:
            ex.shutdown(wait=not broken, cancel_futures=True)


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


def write_params(work_dir: str, params: dict[str, Any]) -> None:
    atomic_write_json(os.path.join(work_dir, "params.json"), params)


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


def find_video(videos: dict[str, str], stems: Iterable[str]) -> str | None:
    for stem in stems:
        if stem in videos:
            return videos[stem]
    return None
