"""From a layout's scan to a finished cache: resume, parallel extraction, splits, assembly."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from typing import Any

import numpy as np

from ...errors import UserError
from .. import cache as C
from .common import (
    WORK_DIR,
    ClipJob,
    Scan,
    _source_signature,
    _work_path,
    expected_spectrogram_shape,
    load_work,
    process_clip,
    read_work_info,
    rel,
    run_jobs,
    write_params,
)
from .splits import assign_splits

AUDIO_KEYS = (
    "audio_source",
    "sample_rate",
    "duration",
    "n_fft",
    "hop_length",
    "stft_pad_mode",
    "log_eps",
    "min_audio_seconds",
    "silence_threshold",
)
FRAME_KEYS = ("fps", "short_side", "max_frames")
FLOW_KEYS = ("flow_bound", "flow_method")
SPLIT_KEYS = ("seed", "val_fraction", "test_fraction")


def processing_params(layout: Any, opts: Any) -> dict[str, Any]:
    """Every parameter that changes what is extracted from a clip (the resume key)."""
    keys: list[str] = []
    if "audio" in layout.MODALITIES:
        keys += AUDIO_KEYS
    keys += FRAME_KEYS
    if "frame_aspect" in layout.DEFAULTS:  # whole frames (CREMA-D): only there, so other caches stay valid
        keys.append("frame_aspect")
    if "flow" in layout.MODALITIES:
        keys += FLOW_KEYS
    p = {}
    for k in keys:
        v = getattr(opts, k, None)
        p[k] = layout.DEFAULTS[k] if v is None else v
    return p


def index_params(layout: Any, opts: Any) -> dict[str, Any]:
    """Parameters that only change the index (splits, default crop): no re-extraction."""
    p = {k: getattr(opts, k) for k in SPLIT_KEYS}
    p["crop_size"] = opts.crop_size if opts.crop_size is not None else layout.DEFAULTS["crop_size"]
    for k in getattr(layout, "SPLIT_OPTIONS", ()):
        p[k] = getattr(opts, k)
    return p


def _check_params(p: dict[str, Any], ip: dict[str, Any]) -> None:
    def bad(msg: str) -> None:
        raise UserError(msg)

    if "sample_rate" in p:
        if p["sample_rate"] <= 0:
            bad("--sample_rate must be positive")
        if p["duration"] <= 0:
            bad("--duration must be positive")
        if p["n_fft"] < 2 or p["hop_length"] < 1:
            bad("--n_fft must be >= 2 and --hop_length >= 1")
        if p["n_fft"] > p["duration"] * p["sample_rate"]:
            bad("--n_fft is longer than the clip (--duration x --sample_rate)")
    if p["fps"] <= 0:
        bad("--fps must be positive")
    if p["short_side"] < 8:
        bad("--short_side must be at least 8")
    if p.get("frame_aspect", 0) < 0:
        bad("--frame_aspect must be >= 0 (0: centre squares)")
    if p["max_frames"] < 0:
        bad("--max_frames must be >= 0 (0 keeps every frame)")
    if not 1 <= ip["crop_size"] <= p["short_side"]:
        bad(f"--crop_size {ip['crop_size']} must be between 1 and --short_side {p['short_side']}")
    for k in ("val_fraction", "test_fraction"):
        if not 0 < ip[k] < 1:
            bad(f"--{k} must be between 0 and 1 (exclusive)")
    if ip["val_fraction"] + ip["test_fraction"] >= 1:
        bad("--val_fraction + --test_fraction must be below 1")
    if "flow_bound" in p and p["flow_bound"] <= 0:
        bad("--flow_bound must be positive")


def _ids_digest(ids: list[str]) -> str:
    return hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _split_counts(splits: list[str]) -> dict[str, int]:
    return {s: splits.count(s) for s in C.SPLITS}


def _index_for(ids: list[str], by_id: dict[str, ClipJob], ip: dict[str, Any], root: str, grouped: bool):
    jobs = [by_id[i] for i in ids]
    labels = [j.label for j in jobs]
    groups = [j.group or "" for j in jobs] if grouped else None
    splits = assign_splits(
        labels, [j.split for j in jobs], groups, ip["val_fraction"], ip["test_fraction"], ip["seed"]
    )
    index = {
        "clip_ids": ids,
        "labels": labels,
        "splits": splits,
        "groups": [j.group for j in jobs],
        "sources": [rel(j.video or j.audio, root) for j in jobs],
    }
    return index, splits


def _flow_stats(maps: dict[str, np.ndarray], offsets: dict[str, list[int]], splits: list[str], seed: int):
    """Per-channel mean/std on [0, 1] of frames modalities other than RGB (flow), train clips."""
    stats = {}
    rng = random.Random(seed)
    for name, arr in maps.items():
        if name not in offsets or name == "visual":
            continue
        off = offsets[name]
        rows = [r for i, s in enumerate(splits) if s == "train" for r in range(off[i], off[i + 1])]
        rows = sorted(rng.sample(rows, min(len(rows), 512)))
        sample = np.asarray(arr[rows], dtype=np.float64) / 255.0
        mean = sample.mean(axis=(0, 2, 3))
        std = np.maximum(sample.std(axis=(0, 2, 3)), 1e-3)
        stats[name] = {"mean": [round(float(m), 6) for m in mean], "std": [round(float(s), 6) for s in std]}
    return stats


def preprocess(layout: Any, opts: Any) -> dict[str, Any]:
    """Run one dataset's preprocessing. Returns a summary dict (also printed as one line)."""
    t0 = time.time()
    quiet = bool(getattr(opts, "quiet", False))
    root = os.path.abspath(opts.root)
    out = os.path.abspath(opts.out)
    if not os.path.isdir(root):
        raise UserError(f"--root {opts.root}: no such directory (expected {layout.EXPECTED})")
    p = processing_params(layout, opts)
    ip = index_params(layout, opts)
    _check_params(p, ip)

    scan: Scan = layout.scan(root, opts)
    for note in scan.notes:
        _say(f"note: {note}", quiet)
    if not scan.jobs and not scan.skipped:
        raise UserError(f"--root {opts.root}: no clips found (expected {layout.EXPECTED})")
    by_id = {j.clip_id: j for j in scan.jobs}
    if len(by_id) != len(scan.jobs):
        raise UserError(f"--root {opts.root}: clip ids are not unique (two files share a name)")
    digest = _ids_digest([j.clip_id for j in scan.jobs] + [f"skipped:{s[0]}" for s in scan.skipped])
    grouped = bool(getattr(layout, "uses_groups", lambda o: False)(opts))
    os.makedirs(out, exist_ok=True)
    work = os.path.join(out, WORK_DIR)
    fresh = bool(getattr(opts, "fresh", False))

    # A finished cache from the same clips and extraction parameters: at most new splits.
    meta_path = os.path.join(out, C.META_FILE)
    if not fresh and os.path.exists(meta_path):
        try:
            reader = C.CacheReader(out, verify=False)
            old = reader.meta
            same = old.get("dataset") == layout.NAME and old.get("processing") == p and old.get("source_ids") == digest
            cached_ids = list(reader.index["clip_ids"])
            cached_offsets = reader.index["offsets"]
            reader.close()
        except UserError:
            same = False
        if same and all(i in by_id for i in cached_ids):
            old_ip = {k: old["params"].get(k) for k in ip}
            if old_ip == ip:
                counts = old["split_counts"]
                line = (
                    f"{layout.NAME}: {out} is up to date ({len(cached_ids)} clips: train {counts['train']} / "
                    f"val {counts['val']} / test {counts['test']}; {old['num_skipped']} skipped); nothing to do"
                )
                _say(line, quiet)
                return {"status": "up_to_date", "clips": len(cached_ids), "skipped": old["num_skipped"],
                        "reused": len(cached_ids), "processed": 0, "split_counts": counts, "out": out}
            index, splits = _index_for(cached_ids, by_id, ip, root, grouped)
            index["offsets"] = cached_offsets
            counts = _split_counts(splits)
            meta = {**old, "params": {**p, **ip}, "split_counts": counts}
            C.rewrite_index(out, meta, index)
            _say(f"{layout.NAME}: new splits written to {out} (train {counts['train']} / val {counts['val']} / "
                 f"test {counts['test']}); frames and audio unchanged", quiet)
            return {"status": "resplit", "clips": len(cached_ids), "skipped": old["num_skipped"], "reused":
                    len(cached_ids), "processed": 0, "split_counts": counts, "out": out}

    # Work directory: per-clip results that survive an interruption.
    if fresh and os.path.isdir(work):
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    wparams = {"dataset": layout.NAME, "processing": p}
    ppath = os.path.join(work, "params.json")
    if os.path.exists(ppath):
        with open(ppath, encoding="utf-8") as f:
            try:
                prev = json.load(f)
            except ValueError:
                prev = None
        if prev is not None and prev != wparams:
            diff = [f"{k}: {prev.get('processing', {}).get(k)} -> {v}" for k, v in p.items()
                    if prev.get("processing", {}).get(k) != v]
            if prev.get("dataset") != layout.NAME:
                diff.insert(0, f"dataset: {prev.get('dataset')} -> {layout.NAME}")
            raise UserError(
                f"--out {opts.out}: holds unfinished work made with other parameters ({'; '.join(diff)}); "
                "rerun with the same options to resume, or add --fresh to start over"
            )
    write_params(work, wparams)

    infos: dict[str, dict[str, Any]] = {}
    todo: list[ClipJob] = []
    for job in scan.jobs:
        wp = _work_path(work, job)
        info = read_work_info(wp) if os.path.exists(wp) else None
        if info is not None and info.get("clip_id") == job.clip_id and info.get("sig") == _source_signature(job):
            infos[job.clip_id] = info
        else:
            todo.append(job)
    reused = len(infos)
    if reused:
        _say(f"{layout.NAME}: resuming, {reused} clips already done, {len(todo)} to go", quiet)

    skipped = list(scan.skipped)
    if todo:
        from tqdm import tqdm

        workers = int(getattr(opts, "workers", 0) or 0)
        bar = tqdm(total=len(todo), desc=f"{layout.NAME}", unit="clip", disable=quiet, mininterval=0.5,
                   dynamic_ncols=True)
        try:
            for clip_id, status, detail in run_jobs(
                process_clip, todo, (p, tuple(layout.MODALITIES), work), workers, progress=lambda: bar.update(1)
            ):
                if status == "ok":
                    infos[clip_id] = {"clip_id": clip_id, "shapes": detail}
                else:
                    reason, path = detail
                    skipped.append((clip_id, reason, rel(path, root)))
        finally:
            bar.close()

    kept = sorted(infos)
    skipped.sort(key=lambda s: s[0])
    if not kept:
        C.write_skipped(out, skipped)
        raise UserError(
            f"{layout.NAME}: no clip could be processed ({len(skipped)} skipped, reasons in "
            f"{os.path.join(out, C.SKIPPED_FILE)})"
        )

    # Shapes: every clip must agree on the per-row shapes.
    spec_shape = tuple(expected_spectrogram_shape(p)) if "audio" in layout.MODALITIES else None
    frame_rows = {m: 0 for m in layout.MODALITIES if m != "audio"}
    row_shape: dict[str, tuple[int, ...]] = {}
    counts_per_clip: dict[str, list[int]] = {m: [] for m in frame_rows}
    for cid in kept:
        shapes = infos[cid]["shapes"]
        if spec_shape is not None and tuple(shapes["audio"]) != spec_shape:
            raise RuntimeError(f"{cid}: spectrogram {shapes['audio']} != expected {spec_shape}")
        for m in frame_rows:
            s = tuple(shapes[m])
            row_shape.setdefault(m, s[1:])
            if s[1:] != row_shape[m]:
                raise RuntimeError(f"{cid}: {m} frames {s[1:]} != {row_shape[m]}")
            frame_rows[m] += s[0]
            counts_per_clip[m].append(s[0])

    index, splits = _index_for(kept, by_id, ip, root, grouped)  # may raise: work stays for a rerun
    offsets = {m: [0] + np.cumsum(c).astype(int).tolist() for m, c in counts_per_clip.items()}
    index["offsets"] = offsets

    arrays: dict[str, tuple[str, tuple[int, ...], str, int]] = {}
    if spec_shape is not None:
        arrays["audio"] = ("spectrogram", spec_shape, "float16", len(kept))
    for m in frame_rows:
        arrays[m] = ("frames", row_shape[m], "uint8", frame_rows[m])
    writer = C.CacheWriter(out, arrays)
    try:
        from tqdm import tqdm

        for i, cid in enumerate(tqdm(kept, desc="assembling", unit="clip", disable=quiet, mininterval=0.5)):
            data = load_work(_work_path(work, by_id[cid]))
            if "audio" in arrays:
                writer.maps["audio"][i] = data["audio"]
            for m in frame_rows:
                writer.maps[m][offsets[m][i] : offsets[m][i + 1]] = data[m]
        stats = _flow_stats(writer.maps, offsets, splits, ip["seed"])
        counts = _split_counts(splits)
        meta = {
            "dataset": layout.NAME,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "root": root,
            "class_names": list(scan.class_names),
            "modalities": list(layout.MODALITIES),
            "params": {**p, **ip},
            "processing": p,
            "num_clips": len(kept),
            "num_skipped": len(skipped),
            "split_counts": counts,
            "source_ids": digest,
            "stats": stats,
            "notes": list(scan.notes),
        }
        writer.commit(meta, index, skipped)
    except BaseException:
        writer.abort()
        raise
    if not getattr(opts, "keep_work", False):
        shutil.rmtree(work, ignore_errors=True)

    processed = len(kept) - reused
    line = (
        f"{layout.NAME}: {len(kept)} clips cached in {out} (train {counts['train']} / val {counts['val']} / "
        f"test {counts['test']}); {len(skipped)} skipped"
        + (f" (reasons in {os.path.join(out, C.SKIPPED_FILE)})" if skipped else "")
        + f"; {reused} reused from an earlier run; {time.time() - t0:.1f} s"
    )
    print(line, flush=True)
    return {"status": "built", "clips": len(kept), "skipped": len(skipped), "reused": reused,
            "processed": processed, "split_counts": counts, "out": out}
