"""Imported once by the process pool's fork server (never by training or --help): loads
librosa, OpenCV and PyAV and runs one tiny STFT, so that every forked worker starts with
them ready instead of paying a few seconds of imports and JIT each."""

import numpy as np

try:
    import av  # noqa: F401
    import cv2
    import librosa

    cv2.setNumThreads(1)
    librosa.stft(np.zeros(2048, np.float32), n_fft=512, hop_length=256)
    librosa.resample(np.zeros(2048, np.float32), orig_sr=16000, target_sr=8000)
except Exception:  # a worker then simply imports them itself
    pass

from . import pool, work  # noqa: E402,F401
