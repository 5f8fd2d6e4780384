"""Opening a cache: meta.json, index.json and the memory-mapped arrays, each checked against
what meta.json records before anything trains on them (and in full by `verify_cache`)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ...errors import UserError
from .format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    INDEX_FILE,
    META_FILE,
    file_fingerprint,
    file_sha1,
    meta_checksum,
    remake_hint,
    stored_frame_size,
)


def read_meta(path: str, option: str = "--data") -> dict[str, Any]:
    """meta.json of the cache at `path`, with its format and checksum checked (no array opened).
    `option` is the command-line option that gave the path (named in errors)."""
    if not path:
        raise UserError(f"{option}: no cache directory given; make one with python code/preprocess.py")
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isdir(path):
        raise UserError(f"{option} {path}: no such directory; make a cache with python code/preprocess.py")
    if not os.path.exists(meta_path):
        raise UserError(
            f"{option} {path}: no {META_FILE}, so not a finished cache "
            "(preprocessing was interrupted or this is another directory); rerun code/preprocess.py"
        )
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{meta_path}: unreadable ({e}); {remake_hint()}") from None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise UserError(f"{meta_path}: not a cache written by code/preprocess.py")
    if meta.get("version") != CACHE_VERSION:
        raise UserError(
            f"{meta_path}: cache format version {meta.get('version')}, this code reads {CACHE_VERSION}; "
            + remake_hint(meta)
        )
    if meta.get("checksum") != meta_checksum(meta):
        raise UserError(
            f"{meta_path}: edited or damaged (its content does not match its checksum); {remake_hint(meta)}"
        )
    return meta


def _parse_expected(expected: Any) -> dict[str, Any]:
    if expected is None:
        return {}
    if isinstance(expected, dict):
        return dict(expected)
    out: dict[str, Any] = {}
    for part in str(expected).split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise UserError(f"--preprocess: expected key=value pairs, got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _same_value(a: Any, b: Any) -> bool:
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a).lower() == str(b).lower()


def check_requested(meta: dict[str, Any], dataset: str, expected: Any, path: str) -> None:
    """Refuse a cache made for another dataset or with other parameters than requested."""
    if meta.get("dataset") != dataset:
        raise UserError(
            f"--data {path} holds a {meta.get('dataset')!r} cache, not {dataset!r}; "
            f"pass --dataset {meta.get('dataset')} or point --data at a {dataset} cache"
        )
    params = meta.get("params", {})
    diffs = []
    for key, want in _parse_expected(expected).items():
        if key not in params:
            raise UserError(
                f"--preprocess: unknown preprocessing parameter {key!r}; known: {', '.join(sorted(params))}"
            )
        if not _same_value(params[key], want):
            diffs.append(f"{key}={params[key]} (requested {want})")
    if diffs:
        raise UserError(
            f"--data {path}: cache made with different parameters: {'; '.join(diffs)}; "
            "preprocess again with the requested values"
        )


def _open_array(path: str, rec: dict[str, Any], meta: dict[str, Any], verify: bool) -> np.ndarray:
    fpath = os.path.join(path, rec["file"])
    hint = remake_hint(meta)
    if not os.path.exists(fpath):
        raise UserError(f"{fpath}: missing cache file; {hint}")
    size = os.path.getsize(fpath)
    if size != rec["bytes"]:
        raise UserError(f"{fpath}: {size} bytes, meta.json says {rec['bytes']} (truncated or replaced); {hint}")
    try:
        arr = np.load(fpath, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{fpath}: unreadable cache file ({e}); {hint}") from None
    if list(arr.shape) != list(rec["shape"]) or arr.dtype.name != rec["dtype"]:
        raise UserError(
            f"{fpath}: array {arr.dtype.name}{list(arr.shape)} does not match meta.json "
            f"{rec['dtype']}{rec['shape']}; {hint}"
        )
    if verify and file_fingerprint(fpath) != rec["fingerprint"]:
        raise UserError(f"{fpath}: content does not match meta.json (file from another run?); {hint}")
    return arr


def _check_index(index: dict[str, Any], meta: dict[str, Any], idx_path: str, hint: str) -> None:
    """The index's lists agree in length, and its labels with meta.json's class names."""
    n = len(index["clip_ids"])
    if len(index["labels"]) != n or len(index["splits"]) != n:
        raise UserError(f"{idx_path}: lists of different lengths; {hint}")
    names = list(meta["class_names"])
    if index.get("class_names") != names:
        raise UserError(f"{idx_path}: its class names differ from meta.json's; {hint}")
    if any(not isinstance(y, int) or not 0 <= y < len(names) for y in index["labels"]):
        raise UserError(f"{idx_path}: a label outside the {len(names)} classes of meta.json; {hint}")


class CacheReader:
    """An opened, checked cache: meta, index and the memory-mapped arrays."""

    def __init__(self, path: str, verify: bool = True, option: str = "--data"):
        self.path = path
        self.meta = read_meta(path, option)
        idx_path = os.path.join(path, INDEX_FILE)
        hint = remake_hint(self.meta)
        if not os.path.exists(idx_path):
            raise UserError(f"{idx_path}: missing cache file; {hint}")
        if verify and file_fingerprint(idx_path) != self.meta.get("index_fingerprint"):
            raise UserError(f"{idx_path}: does not match meta.json (from another run?); {hint}")
        try:
            with open(idx_path, encoding="utf-8") as f:
                self.index = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{idx_path}: unreadable ({e}); {hint}") from None
        if self.index.get("cache_id") != self.meta.get("cache_id"):
            raise UserError(f"{idx_path}: belongs to another cache than meta.json; {hint}")
        _check_index(self.index, self.meta, idx_path, hint)
        self.records = {rec["name"]: rec for rec in self.meta["arrays"]}
        self.arrays = {name: _open_array(path, rec, self.meta, verify) for name, rec in self.records.items()}
        n = len(self.index["clip_ids"])
        for name, rec in self.records.items():
            rows = self.arrays[name].shape[0]
            if rec["kind"] == "spectrogram" and rows != n:
                raise UserError(f"{rec['file']}: {rows} clips, index.json has {n}; {hint}")
            if rec["kind"] == "frames":
                size = stored_frame_size(self.meta["params"])
                if tuple(self.arrays[name].shape[2:]) != size:
                    raise UserError(
                        f"{rec['file']}: frames are not (C, {size[0]}, {size[1]}) as meta.json says; {hint}"
                    )
                off = self.index["offsets"][name]
                if len(off) != n + 1 or off[-1] != rows:
                    raise UserError(f"{rec['file']}: {rows} frames, index.json offsets disagree; {hint}")

    def close(self) -> None:
        self.arrays = {}


def _first_nonfinite_row(arr: np.ndarray, rows_per_chunk: int = 256) -> int | None:
    for start in range(0, arr.shape[0], rows_per_chunk):
        bad = ~np.isfinite(arr[start : start + rows_per_chunk]).reshape(-1, int(np.prod(arr.shape[1:]))).all(axis=1)
        if bad.any():
            return start + int(np.flatnonzero(bad)[0])
    return None


def verify_cache(path: str) -> dict[str, Any]:
    """The full check (`preprocess.py --verify`): everything CacheReader checks, the whole
    content of every array against its sha1, and no NaN or infinity in a float array."""
    reader = CacheReader(path, verify=True, option="--verify")
    hint = remake_hint(reader.meta)
    for name, rec in reader.records.items():
        fpath = os.path.join(path, rec["file"])
        if file_sha1(fpath) != rec["sha1"]:
            raise UserError(f"{fpath}: content differs from what preprocessing wrote (damaged); {hint}")
        arr = reader.arrays[name]
        if arr.dtype.kind == "f":
            row = _first_nonfinite_row(arr)
            if row is not None:
                raise UserError(f"{fpath}: NaN or infinite values in row {row}; {hint}")
    reader.close()
    return {
        "clips": len(reader.index["clip_ids"]),
        "arrays": sorted(reader.records),
        "cache_id": reader.meta["cache_id"],
    }
