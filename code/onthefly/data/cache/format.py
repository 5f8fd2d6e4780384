"""Names, constants and content fingerprints shared by the cache's writer and reader."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

CACHE_FORMAT = "onthefly-av-cache"
# 2: meta.json carries a checksum of itself, index.json the class names, every array a full
# sha1 and a denser fingerprint.
CACHE_VERSION = 2
META_FILE = "meta.json"
INDEX_FILE = "index.json"
SKIPPED_FILE = "skipped.tsv"
ARRAY_NAMES = ("audio", "visual", "flow")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")
FRAME_CROPS = ("fixed", "official")
FRAME_PICKS = ("spread", "official")

# Flow is stored as u8 = round((clip(f, -B, B) + B) * FLOW_HALF / B): zero motion is FLOW_HALF,
# and a horizontal flip maps u8 -> 2 * FLOW_HALF - u8 exactly.
FLOW_HALF = 127

# Files up to FULL_HASH_BYTES are hashed whole when a cache is opened (about 0.1 s for 64 MiB);
# larger ones by FP_BLOCKS blocks spread over the file (16 MiB read), and whole by --verify.
FULL_HASH_BYTES = 64 << 20
FP_BLOCKS = 256
FP_BLOCK = 1 << 16
_CHUNK = 16 << 20


def file_fingerprint(path: str) -> str:
    """sha1 of the file size and its content: all of it up to FULL_HASH_BYTES, else FP_BLOCKS
    blocks spread evenly (cheap at every open; catches a swap, a truncation, most damage)."""
    size = os.path.getsize(path)
    h = hashlib.sha1(str(size).encode())
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            h.update(f.read())
        else:
            step = (size - FP_BLOCK) // (FP_BLOCKS - 1)
            for k in range(FP_BLOCKS):
                f.seek(k * step)
                h.update(f.read(FP_BLOCK))
    return h.hexdigest()


def file_sha1(path: str) -> str:
    """sha1 of the whole file, read in chunks (the full check of --verify)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def meta_checksum(meta: dict[str, Any]) -> str:
    """sha1 of meta.json's content without its own "checksum" field: an edited class list,
    parameter or array record no longer matches."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()


def remake_hint(meta: dict[str, Any] | None = None) -> str:
    ds = (meta or {}).get("dataset", "<name>")
    return f"make it again with: python code/preprocess.py --dataset {ds} --root <raw data> --out <dir>"


def stored_frame_size(params: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of the cached frames: centre squares, or whole frames with frame_aspect."""
    side = int(params["short_side"])
    aspect = float(params.get("frame_aspect") or 0)
    return (side, int(round(side * aspect))) if aspect else (side, side)
