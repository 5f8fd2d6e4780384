"""Writing a cache: preallocated memory-mapped arrays, then an atomic commit of the metadata."""

from __future__ import annotations

import csv
import io
import os
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np

from ...fileio import atomic_write_json, atomic_write_text, read_json_object
from .format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    INDEX_FILE,
    META_FILE,
    SKIPPED_FILE,
    file_fingerprint,
    file_sha1,
    meta_checksum,
)


def read_own_meta(out_dir: str) -> dict[str, Any] | None:
    """meta.json in `out_dir` when this program wrote it (any version, unchecked), else None."""
    meta = read_json_object(os.path.join(out_dir, META_FILE))
    return meta if meta is not None and meta.get("format") == CACHE_FORMAT else None


def owned_arrays(out_dir: str) -> set[str]:
    """Array files that the finished cache in `out_dir` (if any) lists in its meta.json: the
    only arrays a new cache there may replace or remove."""
    records = (read_own_meta(out_dir) or {}).get("arrays")
    if not isinstance(records, list):
        return set()
    return {rec["file"] for rec in records if isinstance(rec, dict) and isinstance(rec.get("file"), str)}


class CacheWriter:
    """Writes a cache with preallocated memory-mapped arrays, then commits it atomically.

    `arrays` maps a modality name to (kind, per-row shape, dtype, rows):
      spectrogram: rows == number of clips, per-row shape (1, F, T);
      frames:      rows == total frames of all clips, per-row shape (C, S, S).
    Arrays go to `<name>.npy.tmp` first; `commit` removes the old meta.json, moves the
    arrays in place and writes index.json then meta.json, so a crash at any moment leaves
    either the old complete cache, or a directory without meta.json (refused at open).
    """

    def __init__(self, out_dir: str, arrays: dict[str, tuple[str, tuple[int, ...], str, int]]):
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.arrays = arrays
        self.maps: dict[str, np.ndarray] = {}
        for name, (_kind, row_shape, dtype, rows) in arrays.items():
            tmp = os.path.join(out_dir, f"{name}.npy.tmp")
            self.maps[name] = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(rows, *row_shape))

    def commit(self, meta: dict[str, Any], index: dict[str, Any], skipped: Iterable[tuple[str, str, str]]) -> None:
        meta_path = os.path.join(self.out_dir, META_FILE)
        previous = owned_arrays(self.out_dir)
        if os.path.exists(meta_path):
            os.remove(meta_path)
        cache_id = uuid.uuid4().hex
        files = []
        for name, (kind, _row_shape, dtype, _rows) in self.arrays.items():
            arr = self.maps[name]
            arr.flush()
            shape = list(arr.shape)
            del arr
            self.maps.pop(name)
            tmp = os.path.join(self.out_dir, f"{name}.npy.tmp")
            final = os.path.join(self.out_dir, f"{name}.npy")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            files.append(
                {
                    "name": name,
                    "kind": kind,
                    "file": f"{name}.npy",
                    "shape": shape,
                    "dtype": np.dtype(dtype).name,
                    "bytes": os.path.getsize(final),
                    "fingerprint": file_fingerprint(final),
                    "sha1": file_sha1(final),
                }
            )
        # Arrays of the previous cache here that this one does not have would confuse a reader;
        # files this program did not write are never touched.
        for stale in previous - {f["file"] for f in files}:
            if os.path.exists(os.path.join(self.out_dir, stale)):
                os.remove(os.path.join(self.out_dir, stale))
        write_skipped(self.out_dir, skipped)
        meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "cache_id": cache_id, **meta, "arrays": files}
        write_index_and_meta(self.out_dir, meta, index)

    def abort(self) -> None:
        for name in list(self.maps):
            del self.maps[name]
            tmp = os.path.join(self.out_dir, f"{name}.npy.tmp")
            if os.path.exists(tmp):
                os.remove(tmp)


def write_index_and_meta(out_dir: str, meta: dict[str, Any], index: dict[str, Any]) -> None:
    """index.json (tied to meta by cache_id and the class names), then meta.json with the
    index's fingerprint and its own checksum: meta.json last, so it marks a finished cache."""
    index = {**index, "cache_id": meta["cache_id"], "class_names": list(meta["class_names"])}
    atomic_write_json(os.path.join(out_dir, INDEX_FILE), index)
    meta = {**meta, "index_fingerprint": file_fingerprint(os.path.join(out_dir, INDEX_FILE))}
    atomic_write_json(os.path.join(out_dir, META_FILE), {**meta, "checksum": meta_checksum(meta)})


def write_skipped(out_dir: str, skipped: Iterable[tuple[str, str, str]]) -> None:
    """skipped.tsv: tab-separated, quoted where a field holds a tab, quote or line break."""
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(("clip_id", "reason", "source"))
    writer.writerows((str(c), str(r), str(s)) for c, r, s in skipped)
    atomic_write_text(os.path.join(out_dir, SKIPPED_FILE), buf.getvalue())


def rewrite_index(out_dir: str, meta: dict[str, Any], index: dict[str, Any]) -> None:
    """Replace index.json and meta.json of a complete cache (new splits, same arrays)."""
    os.remove(os.path.join(out_dir, META_FILE))
    write_index_and_meta(out_dir, meta, index)
