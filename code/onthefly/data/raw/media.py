"""Media decoding, one clip at a time: audio to a log-magnitude spectrogram, video to
square RGB frames at a fixed rate, optical flow between frames.

librosa, OpenCV and PyAV are imported inside the functions that need them, so that
`code/preprocess.py --help` and everything on the training side load without them.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np

from ..cache.format import FLOW_HALF


class SkipClip(Exception):
    """A clip that cannot be used; the message is the reason written to skipped.tsv."""


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def require_file(path: str | None, what: str) -> None:
    """A clip's file must be a regular file: a named pipe or a device would block the decoder."""
    if not path or not os.path.exists(path):
        raise SkipClip(f"missing {what} file")
    if not os.path.isfile(path):
        raise SkipClip(f"{what} file is not a regular file (a named pipe, device or folder)")


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

    require_file(path, "audio")
    try:
        with warnings.catch_warnings():  # a bad file makes librosa warn before it fails
            warnings.simplefilter("ignore")
            y, _ = librosa.load(path, sr=p["sample_rate"], mono=True)
    except Exception as e:  # librosa/soundfile raise many types for a bad file
        detail = first_line(e) or "no installed decoder recognises the file"  # NoBackendError says nothing
        raise SkipClip(f"unreadable audio file ({type(e).__name__}: {detail})") from None
    return _check_and_fit(y, p["sample_rate"], p)


def decode_container_audio(path: str, p: dict[str, Any]) -> np.ndarray:
    """The first audio track of a video container, decoded with PyAV, mixed to mono by
    averaging channels and resampled with librosa (soxr_hq, as librosa.load does)."""
    import av
    import librosa

    require_file(path, "video")
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
        raise SkipClip(f"unreadable audio track ({type(e).__name__}: {first_line(e)})") from None
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
    return cv2.resize(
        img, (int(round(side * aspect)), side), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    )


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

    require_file(path, "video")
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
