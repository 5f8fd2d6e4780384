"""From a layout's scan to a finished cache, in named phases:

plan            options checked, --out checked (a folder this program may write), --root scanned
reuse_finished  a finished cache of the same clips and parameters: nothing to do, or new splits
extract         per-clip work files, resumed, in a process pool
assemble        the arrays, splits and metadata of the cache, committed atomically
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import UserError
from ...rundir import acquire_run_lock
from ..cache.format import INDEX_FILE, META_FILE, SKIPPED_FILE, SPLITS
from ..cache.reader import CacheReader
from ..cache.writer import CacheWriter, owned_arrays, read_own_meta, rewrite_index, write_skipped
from .common import ClipJob, Scan, layout_modalities, rel
from .media import expected_spectrogram_shape
from .pool import run_jobs
from .splits import assign_splits
from .work import (
    WORK_DIR,
    load_work,
    process_clip,
    read_params,
    read_work_info,
    source_signature,
    work_path,
    write_params,
)

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
    modalities = layout_modalities(layout, opts)
    if "audio" in modalities:
        keys += AUDIO_KEYS
    keys += FRAME_KEYS
    if "frame_aspect" in layout.DEFAULTS:  # whole frames (CREMA-D): only there, so other caches stay valid
        keys.append("frame_aspect")
    if "flow" in modalities:
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

    for k, v in {**p, **ip}.items():  # NaN passes every comparison below; infinity keeps every frame
        if isinstance(v, float) and not math.isfinite(v):
            bad(f"--{k} must be a finite number (got {v})")
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
    return {s: splits.count(s) for s in SPLITS}


def _index_for(ids: list[str], by_id: dict[str, ClipJob], ip: dict[str, Any], root: str, grouped: bool):
    jobs = [by_id[i] for i in ids]
    labels = [j.label for j in jobs]
    groups = [j.group or "" for j in jobs] if grouped else None
    splits = assign_splits(labels, [j.split for j in jobs], groups, ip["val_fraction"], ip["test_fraction"], ip["seed"])
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


@dataclass
class Plan:
    """Everything the later phases need, fixed before any file is written."""

    layout: Any
    opts: Any
    modalities: tuple[str, ...]  # what is extracted: the layout's streams and the optional ones asked for
    root: str
    out: str
    work: str
    extraction: dict[str, Any]  # extraction parameters (the resume key)
    indexing: dict[str, Any]  # index parameters (splits, default crop)
    scan: Scan
    by_id: dict[str, ClipJob]
    digest: str
    grouped: bool
    quiet: bool
    fresh: bool


def _our_names(layout: Any) -> set[str]:
    arrays = {f"{m}.npy" for m in (*layout.MODALITIES, *getattr(layout, "OPTIONAL_MODALITIES", ()))}
    return {META_FILE, INDEX_FILE, SKIPPED_FILE, *arrays, *(f"{a}.tmp" for a in arrays)}


def _check_out(out: str, given: str, layout: Any) -> None:
    """--out must be a folder this program can write, holding nothing of another origin under a
    name it would write: a cache never replaces a file that preprocessing did not create."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {given}: is a file, not a folder; give a folder for the cache")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UserError(
            f"--out {given}: cannot write there ({e.strerror or e}); choose a folder you can write to"
        ) from None
    ours = owned_arrays(out)  # a finished cache of ours: its arrays and metadata files
    if ours:
        ours |= {META_FILE, INDEX_FILE, SKIPPED_FILE}
    if read_params(os.path.join(out, WORK_DIR)) is not None:  # our unfinished work: anything a run writes
        ours |= _our_names(layout)
    foreign = sorted((_our_names(layout) & set(os.listdir(out))) - ours)
    if foreign:
        raise UserError(
            f"--out {given}: already holds {', '.join(foreign)}, not written by preprocess.py; "
            "choose an empty or new folder (nothing was changed)"
        )


def plan(layout: Any, opts: Any) -> Plan:
    """Check every option, the output folder and the raw layout; write nothing but --out itself."""
    root = os.path.abspath(opts.root)
    if not os.path.isdir(root):
        raise UserError(f"--root {opts.root}: no such directory (expected {layout.EXPECTED})")
    p = processing_params(layout, opts)
    ip = index_params(layout, opts)
    _check_params(p, ip)
    out = os.path.abspath(opts.out)
    _check_out(out, opts.out, layout)
    quiet = bool(getattr(opts, "quiet", False))
    scan: Scan = layout.scan(root, opts)
    for note in scan.notes:  # the split's source and what it left out: shown even with --quiet
        print(f"note: {note}", file=sys.stderr, flush=True)
    if not scan.jobs and not scan.skipped:
        raise UserError(f"--root {opts.root}: no clips found (expected {layout.EXPECTED})")
    by_id = {j.clip_id: j for j in scan.jobs}
    if len(by_id) != len(scan.jobs):
        raise UserError(f"--root {opts.root}: clip ids are not unique (two files share a name)")
    grouped = bool(getattr(layout, "uses_groups", lambda o: False)(opts))
    if scan.jobs:  # an empty val or test split is refused now, not after every clip was decoded
        _index_for([j.clip_id for j in scan.jobs], by_id, ip, root, grouped)
    return Plan(
        layout=layout,
        opts=opts,
        modalities=layout_modalities(layout, opts),
        root=root,
        out=out,
        work=os.path.join(out, WORK_DIR),
        extraction=p,
        indexing=ip,
        scan=scan,
        by_id=by_id,
        digest=_ids_digest(
            [j.clip_id for j in scan.jobs]
            + [f"skipped:{s[0]}" for s in scan.skipped]
            + [f"unlisted:{c}" for c in scan.unlisted]
        ),
        grouped=grouped,
        quiet=quiet,
        fresh=bool(getattr(opts, "fresh", False)),
    )


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    return "; ".join(f"{k}: {old.get(k)} -> {v}" for k, v in new.items() if old.get(k) != v)


def reuse_finished(run: Plan) -> dict[str, Any] | None:
    """A finished cache in --out: the same clips and parameters need nothing or only new splits
    (a summary is returned); other extraction parameters are refused unless --fresh; other clips
    (None) are extracted again, reusing the work files."""
    old = None if run.fresh else read_own_meta(run.out)
    if old is None:
        return None
    name = run.layout.NAME
    if old.get("dataset") != name or old.get("processing") != run.extraction:
        what = (
            f"a {old.get('dataset')} cache"
            if old.get("dataset") != name
            else f"a cache made with other parameters ({_differences(old.get('processing') or {}, run.extraction)})"
        )
        raise UserError(f"--out {run.opts.out}: holds {what}; use another --out, or add --fresh to replace it")
    try:
        reader = CacheReader(run.out, verify=False)
    except UserError:
        return None  # an older or damaged cache of ours, same parameters: rebuilt
    old = reader.meta
    cached_ids = list(reader.index["clip_ids"])
    cached_offsets = reader.index["offsets"]
    reader.close()
    if old.get("source_ids") != run.digest or not all(i in run.by_id for i in cached_ids):
        return None
    if {k: old["params"].get(k) for k in run.indexing} == run.indexing:
        counts = old["split_counts"]
        _say(
            f"{name}: {run.out} is up to date ({len(cached_ids)} clips: train {counts['train']} / "
            f"val {counts['val']} / test {counts['test']}; {old['num_skipped']} skipped); nothing to do",
            run.quiet,
        )
        return _reused_summary("up_to_date", run, old, len(cached_ids), counts)
    index, splits = _index_for(cached_ids, run.by_id, run.indexing, run.root, run.grouped)
    index["offsets"] = cached_offsets
    counts = _split_counts(splits)
    rewrite_index(run.out, {**old, "params": {**run.extraction, **run.indexing}, "split_counts": counts}, index)
    _say(
        f"{name}: new splits written to {run.out} (train {counts['train']} / val {counts['val']} / "
        f"test {counts['test']}); frames and audio unchanged",
        run.quiet,
    )
    return _reused_summary("resplit", run, old, len(cached_ids), counts)


def _reused_summary(status: str, run: Plan, meta: dict, clips: int, counts: dict) -> dict:
    """The summary of a run that decoded nothing: every clip came from the existing cache."""
    return {
        "status": status,
        "clips": clips,
        "skipped": meta["num_skipped"],
        "reused": clips,
        "processed": 0,
        "split_counts": counts,
        "out": run.out,
    }


def _open_work(run: Plan) -> None:
    """The work folder of per-clip results, refused when it was made with other parameters."""
    if run.fresh and os.path.isdir(run.work):
        shutil.rmtree(run.work)
    os.makedirs(run.work, exist_ok=True)
    wparams = {"dataset": run.layout.NAME, "processing": run.extraction}
    prev = read_params(run.work)
    if prev is not None and prev != wparams:
        diff = _differences(prev.get("processing", {}), run.extraction)
        if prev.get("dataset") != run.layout.NAME:
            diff = f"dataset: {prev.get('dataset')} -> {run.layout.NAME}" + (f"; {diff}" if diff else "")
        raise UserError(
            f"--out {run.opts.out}: holds unfinished work made with other parameters ({diff}); "
            "rerun with the same options to resume, or add --fresh to start over"
        )
    write_params(run.work, wparams)


def extract(run: Plan) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str, str]], int]:
    """Every clip not already in a valid work file, through the pool. Returns the shapes of each
    kept clip, the skipped clips (clip_id, reason, source) and how many were reused."""
    _open_work(run)
    infos: dict[str, dict[str, Any]] = {}
    todo: list[ClipJob] = []
    for job in run.scan.jobs:
        wp = work_path(run.work, job)
        info = read_work_info(wp) if os.path.exists(wp) else None
        if info is not None and info.get("clip_id") == job.clip_id and info.get("sig") == source_signature(job):
            infos[job.clip_id] = info
        else:
            todo.append(job)
    reused = len(infos)
    if reused:
        _say(f"{run.layout.NAME}: resuming, {reused} clips already done, {len(todo)} to go", run.quiet)
    skipped = list(run.scan.skipped)
    if todo:
        from tqdm import tqdm

        workers = int(getattr(run.opts, "workers", 0) or 0)
        bar = tqdm(
            total=len(todo),
            desc=f"{run.layout.NAME}",
            unit="clip",
            disable=run.quiet,
            mininterval=0.5,
            dynamic_ncols=True,
        )
        try:
            args = (run.extraction, run.modalities, run.work)
            timeout = getattr(run.opts, "clip_timeout", None)
            results = run_jobs(process_clip, todo, args, workers, progress=lambda: bar.update(1), timeout=timeout)
            for clip_id, status, detail in results:
                if status == "ok":
                    infos[clip_id] = {"clip_id": clip_id, "shapes": detail}
                else:
                    reason, path = detail
                    skipped.append((clip_id, reason, rel(path, run.root)))
        finally:
            bar.close()
    skipped.sort(key=lambda s: s[0])
    if not infos:
        write_skipped(run.out, skipped)
        raise UserError(
            f"{run.layout.NAME}: no clip could be processed ({len(skipped)} skipped, reasons in "
            f"{os.path.join(run.out, SKIPPED_FILE)})"
        )
    return infos, skipped, reused


def _array_layout(run: Plan, infos: dict[str, dict[str, Any]], kept: list[str]):
    """Per-row shapes (every clip must agree) and per-clip frame counts of each array."""
    modalities = run.modalities
    spec_shape = tuple(expected_spectrogram_shape(run.extraction)) if "audio" in modalities else None
    row_shape: dict[str, tuple[int, ...]] = {}
    counts_per_clip: dict[str, list[int]] = {m: [] for m in modalities if m != "audio"}
    for cid in kept:
        shapes = infos[cid]["shapes"]
        if spec_shape is not None and tuple(shapes["audio"]) != spec_shape:
            raise RuntimeError(f"{cid}: spectrogram {shapes['audio']} != expected {spec_shape}")
        for m in counts_per_clip:
            s = tuple(shapes[m])
            row_shape.setdefault(m, s[1:])
            if s[1:] != row_shape[m]:
                raise RuntimeError(f"{cid}: {m} frames {s[1:]} != {row_shape[m]}")
            counts_per_clip[m].append(s[0])
    arrays: dict[str, tuple[str, tuple[int, ...], str, int]] = {}
    if spec_shape is not None:
        arrays["audio"] = ("spectrogram", spec_shape, "float16", len(kept))
    for m, counts in counts_per_clip.items():
        arrays[m] = ("frames", row_shape[m], "uint8", int(sum(counts)))
    offsets = {m: [0] + np.cumsum(c).astype(int).tolist() for m, c in counts_per_clip.items()}
    return arrays, offsets


def assemble(run: Plan, infos: dict[str, dict[str, Any]], skipped: list[tuple[str, str, str]]) -> dict[str, int]:
    """Write the arrays from the work files, then index.json and meta.json. Returns the split counts."""
    kept = sorted(infos)
    arrays, offsets = _array_layout(run, infos, kept)
    index, splits = _index_for(
        kept, run.by_id, run.indexing, run.root, run.grouped
    )  # may raise: work stays for a rerun
    index["offsets"] = offsets
    writer = CacheWriter(run.out, arrays)
    try:
        from tqdm import tqdm

        for i, cid in enumerate(tqdm(kept, desc="assembling", unit="clip", disable=run.quiet, mininterval=0.5)):
            data = load_work(work_path(run.work, run.by_id[cid]))
            if "audio" in arrays:
                writer.maps["audio"][i] = data["audio"]
            for m in offsets:
                writer.maps[m][offsets[m][i] : offsets[m][i + 1]] = data[m]
        counts = _split_counts(splits)
        meta = {
            "dataset": run.layout.NAME,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "root": run.root,
            "class_names": list(run.scan.class_names),
            "modalities": list(run.modalities),
            "params": {**run.extraction, **run.indexing},
            "processing": run.extraction,
            "num_clips": len(kept),
            "num_skipped": len(skipped),
            "split_counts": counts,
            "source_ids": run.digest,
            "split": run.scan.split_record(),
            "stats": _flow_stats(writer.maps, offsets, splits, run.indexing["seed"]),
            "notes": list(run.scan.notes),
        }
        writer.commit(meta, index, skipped)
    except BaseException:
        writer.abort()
        raise
    if not getattr(run.opts, "keep_work", False):
        shutil.rmtree(run.work, ignore_errors=True)
    return counts


def _left_out(scan: Scan) -> str:
    """The summary's words for clips the split lists left out (empty when none)."""
    parts = [f"{len(scan.unlisted)} in no split list (ignored)"] if scan.unlisted else []
    if scan.listed_absent:
        parts.append(f"{len(scan.listed_absent)} listed but not found")
    return "; " + "; ".join(parts) if parts else ""


def preprocess(layout: Any, opts: Any) -> dict[str, Any]:
    """Run one dataset's preprocessing. Returns a summary dict (also printed as one line)."""
    t0 = time.time()
    run = plan(layout, opts)
    # One preprocessing run per --out at a time (the run-folder lock of training).
    lock = acquire_run_lock(Path(run.out), hint="choose another --out")
    try:
        summary = reuse_finished(run)
        if summary is not None:
            return summary
        infos, skipped, reused = extract(run)
        counts = assemble(run, infos, skipped)
    finally:
        lock.release()
    kept = len(infos)
    print(
        f"{layout.NAME}: {kept} clips cached in {run.out} (train {counts['train']} / val {counts['val']} / "
        f"test {counts['test']}); {len(skipped)} skipped"
        + (f" (reasons in {os.path.join(run.out, SKIPPED_FILE)})" if skipped else "")
        + _left_out(run.scan)
        + f"; {reused} reused from an earlier run; {time.time() - t0:.1f} s",
        flush=True,
    )
    return {
        "status": "built",
        "clips": kept,
        "skipped": len(skipped),
        "reused": reused,
        "processed": kept - reused,
        "split_counts": counts,
        "out": run.out,
        "unlisted": len(run.scan.unlisted),
        "listed_absent": len(run.scan.listed_absent),
    }
