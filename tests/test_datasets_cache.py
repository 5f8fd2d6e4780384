"""The cache format and training Datasets on synthetic arrays (no media decoding here):
frame picking, shared crop and flip, flow under a flip, splits, pickling for workers."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import pickle
import random
import time
from argparse import Namespace
from pathlib import Path

import decoder_stubs  # tests/: the pool's workers import it by name
import numpy as np
import pytest
import torch

from onthefly.data.cache import format as cache_format
from onthefly.data.cache.dataset import pick_frames
from onthefly.data.cache.format import FLOW_HALF, IMAGENET_MEAN
from onthefly.data.cache.writer import CacheWriter, write_skipped
from onthefly.data.raw.cli import main as cli_main
from onthefly.data.raw.media import flow_to_uint8
from onthefly.data.raw.splits import assign_splits
from onthefly.data.registry import get_dataset_entry
from onthefly.errors import UserError

SIDE, CROP = 16, 12


def write_synthetic(
    out: Path,
    n: int = 6,
    frames_per_clip=(5, 1, 3, 4, 2, 5),
    flow: bool = False,
    dataset: str = "ucf101",
    spec: tuple[int, ...] = (1, 5, 7),
) -> None:
    """Frames whose pixel (y, x) holds x (channel 0), y (channel 1) and the frame number
    within the clip (channel 2), so a crop's position, a flip and the picked frames can
    be read back from the output."""
    counts = list(frames_per_clip)[:n]
    total = sum(counts)
    arrays = {"visual": ("frames", (3, SIDE, SIDE), "uint8", total)}
    if flow:
        arrays["flow"] = ("frames", (2, SIDE, SIDE), "uint8", total)
    else:
        arrays = {"audio": ("spectrogram", spec, "float16", n), **arrays}
    w = CacheWriter(str(out), arrays)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    row = 0
    for i, c in enumerate(counts):
        for f in range(c):
            w.maps["visual"][row] = np.stack([xx, yy, np.full_like(xx, f)])
            if flow:
                w.maps["flow"][row, 0] = FLOW_HALF + 10  # moving right
                w.maps["flow"][row, 1] = FLOW_HALF
            row += 1
        if not flow:
            w.maps["audio"][i] = i
    offsets = [0] + np.cumsum(counts).tolist()
    index = {
        "clip_ids": [f"c{i}" for i in range(n)],
        "labels": [i % 2 for i in range(n)],
        "splits": ["train"] * (n - 2) + ["val", "test"],
        "groups": [None] * n,
        "sources": [""] * n,
        "offsets": {k: offsets for k in arrays if k != "audio"},
    }
    meta = {
        "dataset": dataset,
        "class_names": ["a", "b"],
        "params": {"short_side": SIDE, "crop_size": CROP, "fps": 1.0},
        "split_counts": {"train": n - 2, "val": 1, "test": 1},
        "stats": {"flow": {"mean": [0.5, 0.5], "std": [0.02, 0.02]}} if flow else {},
    }
    w.commit(meta, index, [("bad", "unreadable video", "x.avi")])


def ns(path: Path, **kw) -> Namespace:
    return Namespace(data=str(path), num_frames=kw.pop("num_frames", None), seed=0, **kw)


def test_pick_frames():
    assert pick_frames(10, 3, train=False) == [1, 5, 8]
    assert pick_frames(1, 3, train=False) == [0, 0, 0]
    assert pick_frames(4, 1, train=False) == [2]
    rng = random.Random(0)
    for count in (1, 2, 3, 7):
        for _ in range(50):
            p = pick_frames(count, 3, train=True, rng=rng)
            assert p == sorted(p) and all(0 <= i < count for i in p)
            if count >= 3:
                assert len(set(p)) == 3
    seen = {tuple(pick_frames(7, 3, True, rng)) for _ in range(200)}
    assert len(seen) > 10  # training picks vary


def test_shared_crop_flip_and_frame_order(tmp_path):
    write_synthetic(tmp_path, flow=True)
    ds = get_dataset_entry("ucf101").build(ns(tmp_path, num_frames=3), "train")
    flips = set()
    random.seed(1)
    for _ in range(40):
        for i in range(len(ds)):
            item = ds[i]
            v, f = item["visual"].numpy(), item["flow"].numpy()
            assert v.shape == (3, 3, CROP, CROP) and f.shape == (2, 3, CROP, CROP)
            x = v[0].astype(int)
            # the same crop and flip on every frame of the clip
            assert (x == x[0:1]).all() and (v[1] == v[1][0:1]).all()
            flipped = x[0, 0, 0] > x[0, 0, -1]
            flips.add(bool(flipped))
            assert np.all(np.abs(np.diff(x[0, 0])) == 1)  # a contiguous crop
            # the flow's u changes sign exactly when the frames are flipped
            assert (f[0] == (FLOW_HALF - 10 if flipped else FLOW_HALF + 10)).all()
            assert (f[1] == FLOW_HALF).all()
            assert list(v[2, :, 0, 0]) == sorted(v[2, :, 0, 0])  # frames in time order
    assert flips == {True, False}
    ev = get_dataset_entry("ucf101").build(ns(tmp_path, num_frames=3), "val")
    item = ev[0]
    v = item["visual"].numpy()
    off = (SIDE - CROP) // 2
    assert v[0, 0, 0, 0] == off and v[1, 0, 0, 0] == off  # centre crop, not flipped
    assert list(v[2, :, 0, 0]) == [0, 1, 1]  # the val clip has 2 frames: repeated
    t = get_dataset_entry("ucf101").build(ns(tmp_path, num_frames=3), "test")[0]["visual"].numpy()
    assert list(t[2, :, 0, 0]) == [0, 2, 4]  # 5 frames: evenly spread


def test_official_rule_shares_its_draw_between_frames_and_flow(tmp_path):
    write_synthetic(tmp_path, flow=True, dataset="kinetics_sounds")
    ds = get_dataset_entry("kinetics_sounds").build(
        ns(tmp_path, num_frames=3, frame_crop="official", frame_pick="official"), "train"
    )
    flips = set()
    for seed in range(30):
        torch.manual_seed(seed)
        item = ds[0]
        v, f = item["visual"].numpy().astype(int), item["flow"].numpy()
        assert v.shape == (3, 3, CROP, CROP) and f.shape == (2, 3, CROP, CROP)
        assert list(v[2, :, 0, 0]) == [0, 2, 4]  # first, middle and last of the clip's 5 frames
        assert (v[0] == v[0][0:1]).all()  # one region for the 3 frames
        flipped = v[0, 0, 0, 0] > v[0, 0, 0, -1]
        flips.add(bool(flipped))
        assert (f[0] == (FLOW_HALF - 10 if flipped else FLOW_HALF + 10)).all()  # the frames' flip, u negated
    assert flips == {True, False}
    ucf = tmp_path / "ucf"
    write_synthetic(ucf, flow=True)
    with pytest.raises(UserError, match="--frame_pick official: no official frame rule is known for ucf101"):
        get_dataset_entry("ucf101").build(ns(ucf, frame_pick="official"), "train")


def test_info_and_audio_items(tmp_path):
    write_synthetic(tmp_path, dataset="cremad")
    entry = get_dataset_entry("cremad")
    info = entry.info(ns(tmp_path))
    assert info.class_names == ("a", "b") and info.num_classes == 2
    audio, visual = info.modalities
    assert audio.kind == "spectrogram" and audio.shape == (1, 5, 7)
    assert visual.shape == (3, 1, CROP, CROP) and visual.mean == IMAGENET_MEAN
    ds = entry.build(ns(tmp_path), "train")
    item = ds[2]
    assert item["audio"].dtype == torch.float32 and float(item["audio"][0, 0, 0]) == 2.0
    assert item["label"] == 0 and item["index"] == 2
    assert len(ds) == 4 and len(entry.build(ns(tmp_path), "test")) == 1
    # a DataLoader worker gets a picklable Dataset that maps the files itself
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._arrays is None and torch.equal(clone[2]["audio"], item["audio"])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert batches[0]["visual"].shape == (2, 3, 1, CROP, CROP) and batches[0]["visual"].dtype == torch.uint8


def test_flow_stats_in_info(tmp_path):
    write_synthetic(tmp_path, flow=True)
    info = get_dataset_entry("ucf101").info(ns(tmp_path, num_frames=2))
    assert info.modalities[1].name == "flow" and info.modalities[1].std == (0.02, 0.02)
    assert info.modalities[1].shape == (2, 2, CROP, CROP)


def test_unfinished_or_foreign_cache(tmp_path):
    write_synthetic(tmp_path, dataset="cremad")
    entry = get_dataset_entry("cremad")
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(UserError, match="version 99"):
        entry.info(ns(tmp_path))
    (tmp_path / "meta.json").unlink()
    with pytest.raises(UserError, match="not a finished cache"):
        entry.build(ns(tmp_path), "train")
    with pytest.raises(UserError, match="no such directory"):
        entry.info(ns(tmp_path / "absent"))


def test_flow_quantisation():
    f = np.array([[[-30.0, 0.0], [20.0, 5.0]]], dtype=np.float32)
    q = flow_to_uint8(f, 20.0)
    assert q.tolist() == [[[0, 127], [254, 159]]]
    assert (2 * FLOW_HALF - q[..., 0]).tolist() == flow_to_uint8(-f, 20.0)[..., 0].tolist()


def test_split_rules():
    labels = [c for c in range(3) for _ in range(10)]
    s = assign_splits(labels, [None] * 30, None, 0.1, 0.2, seed=0)
    for c in range(3):
        mine = [s[i] for i in range(30) if labels[i] == c]
        assert mine.count("test") == 2 and mine.count("val") == 1
    assert s == assign_splits(labels, [None] * 30, None, 0.1, 0.2, seed=0)
    assert s != assign_splits(labels, [None] * 30, None, 0.1, 0.2, seed=1)
    # actor groups across classes: no actor in two splits
    actors = [str(i % 10) for i in range(30)]
    s = assign_splits(labels, [None] * 30, actors, 0.1, 0.1, seed=3)
    by_actor = {}
    for a, sp in zip(actors, s):
        by_actor.setdefault(a, set()).add(sp)
    assert all(len(v) == 1 for v in by_actor.values()) and set(s) == {"train", "val", "test"}
    # given lists: kept; val carved from train only, by whole class-specific groups
    given = ["train"] * 24 + ["test"] * 6
    groups = [f"{labels[i]}/g{i // 2}" for i in range(30)]
    s = assign_splits(labels, given, groups, 0.2, 0.1, seed=0)
    assert s[24:] == ["test"] * 6 and "val" in s[:24]
    for g in set(groups):
        assert len({s[i] for i in range(30) if groups[i] == g}) == 1
    with pytest.raises(UserError, match="val would be empty"):
        assign_splits([0, 1], ["train", "test"], None, 0.1, 0.1, seed=0)


def test_worker_crash_skips_only_that_clip():
    from onthefly.data.raw.common import ClipJob
    from onthefly.data.raw.pool import run_jobs

    jobs = [ClipJob(clip_id=c, label=0, video=f"/x/{c}.mp4") for c in "abcde"]
    results = {r[0]: r for r in run_jobs(decoder_stubs.crash_on_b, jobs, ("m",), workers=2)}
    assert set(results) == set("abcde")
    assert results["b"][1] == "skip" and "crashed" in results["b"][2][0]
    assert all(results[c][1:] == ("ok", "m") for c in "acde")


def test_a_hung_and_a_segfaulting_clip_are_reported_and_no_worker_outlives_the_run(tmp_path):
    from onthefly.data.raw.common import ClipJob
    from onthefly.data.raw.pool import run_jobs

    jobs = [ClipJob(clip_id=c, label=0, video=f"/x/{c}.mp4") for c in "abcdefg"]
    t0 = time.time()
    stub = decoder_stubs.hang_on_b_segfault_on_c
    results = {r[0]: r for r in run_jobs(stub, jobs, (str(tmp_path),), workers=2, timeout=2)}
    assert time.time() - t0 < 60
    assert set(results) == set("abcdefg")
    assert results["b"][1] == "skip" and "--clip_timeout 2 s" in results["b"][2][0]
    assert results["c"][1] == "skip" and "crashed" in results["c"][2][0] and "SIGSEGV" in results["c"][2][0]
    assert results["b"][2][1] == "/x/b.mp4"
    assert all(results[c][1:] == ("ok", None) for c in "adefg")
    workers = [int(p.name) for p in tmp_path.iterdir()]
    assert len(workers) >= 3  # the hung and the crashed worker were replaced
    deadline = time.time() + 10
    while any(_alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)], "a worker outlived run_jobs"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --------------------------------------------------------------------------- limits, index, integrity


def test_limit_samples_keeps_the_first_clips_of_each_split(tmp_path):
    write_synthetic(tmp_path, dataset="cremad")
    entry = get_dataset_entry("cremad")
    train = entry.build(ns(tmp_path, limit_samples=3), "train")
    assert len(train) == 3 and train.clip_ids == ["c0", "c1", "c2"]
    # index is the position within the split, the sample's own row is read
    assert [train[i]["index"] for i in range(3)] == [0, 1, 2]
    assert [float(train[i]["audio"][0, 0, 0]) for i in range(3)] == [0.0, 1.0, 2.0]
    assert len(entry.build(ns(tmp_path, limit_samples=3), "test")) == 1  # a smaller split stays whole
    test = entry.build(ns(tmp_path), "test")
    assert test[0]["index"] == 0 and float(test[0]["audio"][0, 0, 0]) == 5.0


def _edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, **changes}))


@pytest.mark.parametrize("names", [["a", "b", "c"], ["b", "a"], ["a"]], ids=["added", "reordered", "removed"])
def test_edited_class_names_are_refused(tmp_path, names):
    write_synthetic(tmp_path, dataset="cremad")
    _edit_meta(tmp_path, class_names=names)
    entry = get_dataset_entry("cremad")
    with pytest.raises(UserError, match="meta.json: edited or damaged"):
        entry.info(ns(tmp_path))
    with pytest.raises(UserError, match="meta.json: edited or damaged"):
        entry.build(ns(tmp_path), "train")


def test_class_names_checked_against_the_index(tmp_path):
    """A meta.json rewritten whole (checksum and all) still has to agree with index.json."""
    write_synthetic(tmp_path, dataset="cremad")
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["class_names"] = ["b", "a"]
    meta["checksum"] = cache_format.meta_checksum(meta)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="index.json: its class names differ from meta.json"):
        get_dataset_entry("cremad").build(ns(tmp_path), "train")


SPEC = (1, 257, 188)  # a CREMA-D spectrogram: 72 of them make a 7 MB file


def cli_verify(path: Path) -> tuple[int, str]:
    """`preprocess.py --verify path`: exit status and everything printed."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = cli_main(["--verify", str(path)])
    return code, (out.getvalue() + err.getvalue()).strip()


def _damage(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_damage_anywhere_in_an_array_is_refused(tmp_path):
    write_synthetic(tmp_path, n=72, frames_per_clip=[1] * 72, dataset="cremad", spec=SPEC)
    audio = tmp_path / "audio.npy"
    # Between what a 16-block sample of the file would read (blocks 0 and 1 are 460 KB apart).
    _damage(audio, audio.stat().st_size // 30, np.zeros(4096, np.uint8).tobytes())
    with pytest.raises(UserError, match="audio.npy: content does not match"):
        get_dataset_entry("cremad").build(ns(tmp_path), "train")
    assert cli_verify(tmp_path)[0] == 2


def test_nan_between_sampled_blocks_stops_at_the_sample_and_in_verify(tmp_path, monkeypatch):
    """Above FULL_HASH_BYTES only blocks are hashed at open: a NaN elsewhere is caught when its
    sample is read, and by --verify (here with the limit lowered so a test file is "large")."""
    monkeypatch.setattr(cache_format, "FULL_HASH_BYTES", 1 << 20)
    monkeypatch.setattr(cache_format, "FP_BLOCKS", 4)
    write_synthetic(tmp_path, n=72, frames_per_clip=[1] * 72, dataset="cremad", spec=SPEC)
    code, text = cli_verify(tmp_path)
    assert code == 0 and "verified (72 clips" in text and text.count("\n") == 0
    arr = np.load(tmp_path / "audio.npy", mmap_mode="r+")
    arr[40, 0, 100, 50] = np.nan  # row 40 of 72 lies between the 4 sampled blocks
    arr.flush()
    del arr
    train = get_dataset_entry("cremad").build(ns(tmp_path), "train")  # the sampled fingerprint still matches
    assert float(train[39]["audio"][0, 0, 0]) == 39.0
    with pytest.raises(UserError, match="audio.npy: NaN or infinite values for clip c40; .*--verify"):
        train[40]
    code, text = cli_verify(tmp_path)
    assert code == 2 and "audio.npy: content differs" in text and text.count("\n") == 0


def test_skipped_report_quotes_tabs_and_line_breaks(tmp_path):
    rows = [("a\tb", "unreadable video", "x/a\tb.mp4"), ("c\nd", "reason with\nnewline", "y.mp4"), ("e", "ok", "")]
    write_skipped(str(tmp_path), rows)
    with open(tmp_path / "skipped.tsv", newline="") as f:
        back = list(csv.reader(f, delimiter="\t"))
    assert back == [["clip_id", "reason", "source"], *[list(r) for r in rows]]


def test_verify_stands_alone(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--verify", str(tmp_path), "--dataset", "cremad"])
    assert e.value.code == 2 and "--verify DIR checks a finished cache on its own" in capsys.readouterr().err
    write_synthetic(tmp_path, dataset="cremad")
    assert cli_main(["--verify", str(tmp_path)]) == 0


def test_verify_errors_name_verify_and_ctrl_c_is_one_line(tmp_path, capsys, monkeypatch):
    from onthefly.data.cache import reader

    assert cli_main(["--verify", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --verify {tmp_path / 'nope'}: no such directory") and "--data" not in err
    write_synthetic(tmp_path, dataset="cremad")

    def interrupted(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(reader, "file_sha1", interrupted)
    assert cli_main(["--verify", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err == f"interrupted: {tmp_path} was not fully checked; run --verify again\n"


def test_preprocess_help_describes_whole_frames():
    from onthefly.data.raw.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "round(short_side * frame_aspect)" in text and "--clip_timeout" in text
