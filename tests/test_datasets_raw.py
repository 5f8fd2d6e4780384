"""Raw dataset layouts -> preprocessing -> cache -> training Datasets.

Every dataset gets a tiny copy of its distributed layout written here (WAVs with
soundfile, videos with OpenCV's or PyAV's writer, audio tracks where the real dataset
has them, deliberately broken files), then the preprocessing runs on it and the cache
is checked: shapes, labels, splits, the skip report, resume, and refusal of a cache
that does not match.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import av
import cv2
import decoder_stubs  # tests/: the pool's workers import it by name
import numpy as np
import pytest
import soundfile as sf

from onthefly import runner
from onthefly.data.cache.format import FLOW_HALF
from onthefly.data.raw import get_layout
from onthefly.data.raw.cli import build_parser
from onthefly.data.raw.cli import main as cli_main
from onthefly.data.raw.pipeline import preprocess
from onthefly.data.registry import get_dataset_entry
from onthefly.errors import UserError

REPO = Path(__file__).resolve().parents[1]

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
SMALL_AUDIO = ["--sample_rate", "8000", "--duration", "1", "--n_fft", "64", "--hop_length", "32"]
SMALL_FRAMES = ["--short_side", "32", "--crop_size", "28", "--fps", "2"]
SPEC_SHAPE = (1, 33, 251)  # 1 + 64/2 bins, 1 + 8000 // 32 frames
FSDD = REPO.parent / "shared" / "data" / "fsdd" / "recordings"


# --------------------------------------------------------------------------- media writers


def tone(seconds: float, sr: int, freq: float, amp: float = 0.3, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (amp * np.sin(2 * np.pi * freq * t) + (0.01 * noise if amp else 0)).astype(np.float32)


def moving_square(n: int, w: int = 64, h: int = 48, seed: int = 0) -> list[np.ndarray]:
    """BGR frames: a bright square sliding right over a background set by `seed`."""
    frames = []
    for i in range(n):
        img = np.full((h, w, 3), (30 + 50 * seed) % 255, np.uint8)
        x = (i * 3) % (w - 12)
        img[h // 3 : h // 3 + 12, x : x + 12] = (0, 128, 255)
        frames.append(img)
    return frames


def write_wav(path: Path, seconds: float = 1.5, sr: int = 16000, freq: float = 440.0, amp: float = 0.3) -> None:
    sf.write(str(path), tone(seconds, sr, freq, amp), sr)


def write_cv2_video(path: Path, fourcc: str, seconds: float = 2.0, fps: int = 10, seed: int = 0) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (64, 48))
    assert writer.isOpened(), f"OpenCV cannot write {fourcc}"
    for frame in moving_square(int(seconds * fps), seed=seed):
        writer.write(frame)
    writer.release()


def write_mp4(
    path: Path,
    seconds: float = 2.0,
    fps: int = 10,
    sr: int = 16000,
    freq: float = 440.0,
    audio: bool = True,
    seed: int = 0,
) -> None:
    """H.264 video with (optionally) a stereo AAC audio track, muxed by PyAV."""
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        if audio:
            ast = c.add_stream("aac", rate=sr)
            ast.layout = "stereo"
        for frame in moving_square(int(seconds * fps), seed=seed):
            for pkt in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[..., ::-1]), format="rgb24")):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)
        if audio:
            y = tone(seconds, sr, freq, seed=seed)
            y = np.stack([y, 0.5 * y])
            for k in range(0, y.shape[1], 1024):
                fr = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(y[:, k : k + 1024]), format="fltp", layout="stereo"
                )
                fr.sample_rate, fr.pts = sr, k
                for pkt in ast.encode(fr):
                    c.mux(pkt)
            for pkt in ast.encode():
                c.mux(pkt)


def write_garbage(path: Path) -> None:
    path.write_bytes(b"\x00\x01 this is not a media file " * 64)


# --------------------------------------------------------------------------- running


def run(dataset: str, root: Path, out: Path, *extra: str, workers: int = 0, official: bool = False) -> dict:
    """Preprocess quietly. CREMA-D test folders hold made-up clip ids: the seeded split unless
    `official` (their ids are then the official lists')."""
    if dataset == "cremad" and not official and "--speaker_independent" not in extra:
        extra = (*extra, "--random_split")
    argv = ["--dataset", dataset, "--root", str(root), "--out", str(out), "--workers", str(workers), "--quiet", *extra]
    opts = build_parser().parse_args(argv)
    return preprocess(get_layout(dataset), opts)


def skipped(out: Path) -> dict[str, str]:
    with open(out / "skipped.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["clip_id", "reason", "source"]
    return {r[0]: r[1] for r in rows[1:]}


def index(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())


def cfg(data: Path, **kw):
    from argparse import Namespace

    return Namespace(data=str(data), num_frames=kw.pop("num_frames", None), seed=0, **kw)


def check_splits(idx: dict) -> None:
    assert set(idx["splits"]) == {"train", "val", "test"}
    assert len(idx["splits"]) == len(idx["clip_ids"]) == len(set(idx["clip_ids"]))


# --------------------------------------------------------------------------- CREMA-D


def make_cremad(root: Path, actors=(1001, 1002, 1003), broken: bool = True) -> None:
    (root / "AudioWAV").mkdir(parents=True)
    (root / "VideoFlash").mkdir()
    for a in actors:
        for k, emo in enumerate(EMOTIONS):
            cid = f"{a}_IEO_{emo}_HI"
            write_wav(root / "AudioWAV" / f"{cid}.wav", 1.5, 16000, 200 + 60 * k)
            write_cv2_video(root / "VideoFlash" / f"{cid}.flv", "FLV1", 2.0, seed=k)
    if broken:
        write_garbage(root / "AudioWAV" / "1001_IEO_NEU_HI.wav")  # corrupt audio
        write_wav(root / "AudioWAV" / "1002_IEO_NEU_HI.wav", amp=0.0)  # silent
        write_wav(root / "AudioWAV" / "1002_IEO_SAD_HI.wav", seconds=0.02)  # too short
        os.remove(root / "VideoFlash" / "1003_IEO_NEU_HI.flv")  # missing video
        write_garbage(root / "VideoFlash" / "1001_IEO_HAP_HI.flv")  # corrupt video
        (root / "AudioWAV" / "README.wav").write_bytes(b"")  # a stray file, not a clip


@pytest.fixture(scope="module")
def cremad_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw") / "CREMA-D"
    make_cremad(root)
    return root


@pytest.fixture(scope="module")
def cremad_cache(cremad_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "cremad"
    summary = run("cremad", cremad_root, out, *SMALL_AUDIO, *SMALL_FRAMES)
    assert summary["status"] == "built"
    return out


def test_cremad_cache_contents(cremad_cache):
    out = cremad_cache
    meta = json.loads((out / "meta.json").read_text())
    idx = index(out)
    skips = skipped(out)
    assert skips["1001_IEO_NEU_HI"].startswith("unreadable audio")
    assert skips["1002_IEO_NEU_HI"].startswith("silent audio")
    assert skips["1002_IEO_SAD_HI"].startswith("audio too short")
    assert skips["1003_IEO_NEU_HI"].startswith("missing video")
    assert skips["1001_IEO_HAP_HI"].startswith("unreadable video")
    assert skips["README"].startswith("file name is not")
    assert meta["num_skipped"] == len(skips) == 6
    assert len(idx["clip_ids"]) == meta["num_clips"] == 18 - 5
    assert meta["class_names"] == list(EMOTIONS)
    for cid, label in zip(idx["clip_ids"], idx["labels"]):
        assert EMOTIONS[label] == cid.split("_")[2]
    check_splits(idx)
    audio = np.load(out / "audio.npy", mmap_mode="r")
    visual = np.load(out / "visual.npy", mmap_mode="r")
    assert audio.dtype == np.float16 and audio.shape == (13, *SPEC_SHAPE)
    assert visual.dtype == np.uint8 and visual.shape[1:] == (3, 32, 43)  # channel-planar, whole 4:3 frame
    counts = np.diff(idx["offsets"]["visual"])
    assert (counts == 4).all()  # 2 s at 2 frames per second
    assert np.isfinite(audio[:].astype(np.float32)).all()
    assert meta["params"]["hop_length"] == 32 and meta["params"]["sample_rate"] == 8000
    # frames are RGB: the square is drawn as BGR (0, 128, 255), so red is the bright channel
    frame = visual[0].reshape(3, -1).T.astype(int)
    bright = frame[frame.sum(1).argmax()]
    assert bright[0] > 200 and bright[2] < 60


def test_cremad_training_dataset(cremad_cache):
    entry = get_dataset_entry("cremad")
    info = entry.info(cfg(cremad_cache))
    assert info.num_classes == 6 and info.modality_names == ("audio", "visual")
    assert info.modalities[0].shape == SPEC_SHAPE
    assert info.modalities[1].shape == (3, 1, 28, 28)  # cremad: 1 frame by default
    assert entry.defaults["num_frames"] == 1 and entry.defaults["lr"] == 1e-3
    train = entry.build(cfg(cremad_cache, num_frames=3), "train")
    item = train[0]
    assert item["audio"].dtype.is_floating_point and tuple(item["audio"].shape) == SPEC_SHAPE
    assert str(item["visual"].dtype) == "torch.uint8" and tuple(item["visual"].shape) == (3, 3, 28, 28)
    assert item["index"] == 0 and item["label"] == int(train.labels[0])
    test = entry.build(cfg(cremad_cache, num_frames=2), "test")
    a, b = test[1], test[1]
    assert (a["visual"] == b["visual"]).all() and (a["audio"] == b["audio"]).all()  # evaluation is deterministic
    sizes = sum(len(entry.build(cfg(cremad_cache), s)) for s in ("train", "val", "test"))
    assert sizes == 13


def test_cremad_speaker_independent(cremad_root, tmp_path):
    out = tmp_path / "si"
    run("cremad", cremad_root, out, *SMALL_AUDIO, *SMALL_FRAMES, "--speaker_independent")
    idx = index(out)
    check_splits(idx)
    actors = {}
    for cid, split in zip(idx["clip_ids"], idx["splits"]):
        actors.setdefault(cid.split("_")[0], set()).add(split)
    assert all(len(s) == 1 for s in actors.values()), actors  # no actor in two splits


def test_cremad_resume_up_to_date_and_resplit(cremad_root, tmp_path):
    out = tmp_path / "res"
    first = run("cremad", cremad_root, out, *SMALL_AUDIO, *SMALL_FRAMES, "--keep_work")
    assert first["processed"] == 13 and first["reused"] == 0
    work = out / ".work"
    works = sorted(work.glob("*.npz"))
    assert len(works) == 13
    # interrupted run: no cache yet, one clip's work missing, one damaged
    os.remove(out / "meta.json")
    os.remove(works[0])
    works[1].write_bytes(b"truncated")
    again = run("cremad", cremad_root, out, *SMALL_AUDIO, *SMALL_FRAMES)
    assert again["status"] == "built" and again["reused"] == 11 and again["processed"] == 2
    assert not work.exists()  # removed after success without --keep_work
    same = run("cremad", cremad_root, out, *SMALL_AUDIO, *SMALL_FRAMES)
    assert same["status"] == "up_to_date"
    before = index(out)["splits"]
    other = run("cremad", cremad_root, out, *SMALL_AUDIO, *SMALL_FRAMES, "--seed", "7")
    assert other["status"] == "resplit"
    assert index(out)["splits"] != before
    assert get_dataset_entry("cremad").build(cfg(out), "val")[0]["visual"].shape[1] == 1
    # other extraction parameters over unfinished work: refused, named
    (out / ".work").mkdir()
    (out / ".work" / "params.json").write_text(json.dumps({"dataset": "cremad", "processing": {"fps": 9}}))
    with pytest.raises(UserError, match="other parameters.*--fresh"):
        run("cremad", cremad_root, out, *SMALL_AUDIO, *SMALL_FRAMES, "--hop_length", "16")
    done = run("cremad", cremad_root, out, *SMALL_AUDIO, *SMALL_FRAMES, "--hop_length", "16", "--fresh")
    assert done["status"] == "built" and done["reused"] == 0
    assert np.load(out / "audio.npy", mmap_mode="r").shape[-1] == 1 + 8000 // 16


def test_cremad_process_pool_matches_in_process(cremad_root, cremad_cache, tmp_path):
    out = tmp_path / "pool"
    summary = run("cremad", cremad_root, out, *SMALL_AUDIO, *SMALL_FRAMES, workers=2)
    assert summary["clips"] == 13 and summary["skipped"] == 6
    assert index(out)["splits"] == index(cremad_cache)["splits"]
    for name in ("audio.npy", "visual.npy"):
        assert np.array_equal(np.load(out / name), np.load(cremad_cache / name))


def test_cache_refusals(cremad_cache, tmp_path):
    entry = get_dataset_entry("cremad")
    with pytest.raises(UserError, match="holds a 'cremad' cache, not 'ave'"):
        get_dataset_entry("ave").info(cfg(cremad_cache))
    with pytest.raises(UserError, match=r"hop_length=32 \(requested 353\)"):
        entry.info(cfg(cremad_cache, preprocess="sample_rate=8000,hop_length=353"))
    entry.info(cfg(cremad_cache, preprocess={"sample_rate": 8000, "fps": 2}))  # matching: accepted
    with pytest.raises(UserError, match="crop"):
        entry.info(cfg(cremad_cache, crop_size=64))
    with pytest.raises(UserError, match="no meta.json"):
        entry.info(cfg(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(cremad_cache, broken)
    with open(broken / "visual.npy", "r+b") as f:
        f.truncate(os.path.getsize(broken / "visual.npy") - 1000)
    with pytest.raises(UserError, match="visual.npy.*truncated"):
        entry.build(cfg(broken), "train")
    shutil.copy(cremad_cache / "visual.npy", broken / "visual.npy")
    a = np.load(broken / "audio.npy", mmap_mode="r+")
    a[0, 0, 0, :] = 3.0  # same size, other content
    a.flush()
    del a
    with pytest.raises(UserError, match="audio.npy.*another run"):
        entry.build(cfg(broken), "train")
    shutil.copy(cremad_cache / "audio.npy", broken / "audio.npy")
    idx = index(broken)
    idx["labels"] = idx["labels"][:-1]
    (broken / "index.json").write_text(json.dumps(idx))
    with pytest.raises(UserError, match="index.json"):
        entry.build(cfg(broken), "train")


def test_cremad_real_recordings(tmp_path):
    """Real speech (FSDD) in CREMA-D's layout, with the paper's audio parameters."""
    if not FSDD.is_dir():
        pytest.skip("../shared/data/fsdd/recordings not present")
    root = tmp_path / "CREMA-D"
    (root / "AudioWAV").mkdir(parents=True)
    (root / "VideoFlash").mkdir()
    speakers = ("george", "jackson", "lucas")
    for s, speaker in enumerate(speakers):
        for digit, emo in enumerate(EMOTIONS):
            cid = f"{1001 + s}_IEO_{emo}_XX"
            shutil.copy(FSDD / f"{digit}_{speaker}_{s}.wav", root / "AudioWAV" / f"{cid}.wav")
            if not (s == 2 and digit < 2):  # two clips without their video
                write_cv2_video(root / "VideoFlash" / f"{cid}.flv", "FLV1", 1.0, seed=digit)
    out = tmp_path / "cache"
    summary = run("cremad", root, out, "--short_side", "32", "--crop_size", "28")
    assert summary["clips"] == 16 and summary["skipped"] == 2
    assert all(r.startswith("missing video") for r in skipped(out).values())
    audio = np.load(out / "audio.npy", mmap_mode="r")
    assert audio.shape == (16, 1, 257, 188)  # the official CREMA-D input: 22050 Hz, 3 s, n_fft 512, hop 353
    spec = audio[0, 0].astype(np.float32)
    assert spec.max() > 0 and spec.min() < -10  # log magnitude of real speech with quiet bins
    item = get_dataset_entry("cremad").build(cfg(out), "train")[0]
    assert tuple(item["audio"].shape) == (1, 257, 188) and tuple(item["visual"].shape) == (3, 1, 28, 28)


def test_cremad_spectrogram_matches_official_recipe(cremad_root):
    """Our audio path equals librosa.load + tile + clip + stft + log, the official code."""
    import librosa

    from onthefly.data.raw.media import load_audio_file, log_spectrogram

    p = dict(get_layout("cremad").DEFAULTS)
    wav = str(cremad_root / "AudioWAV" / "1003_IEO_ANG_HI.wav")
    ours = log_spectrogram(load_audio_file(wav, p), p)
    samples, rate = librosa.load(wav, sr=22050)
    resamples = np.tile(samples, 3)[: 22050 * 3]
    resamples[resamples > 1.0] = 1.0
    resamples[resamples < -1.0] = -1.0
    ref = np.log(np.abs(librosa.stft(resamples, n_fft=512, hop_length=353)) + 1e-7)
    assert ours.shape == (1, 257, 188) == (1, *ref.shape)
    assert np.allclose(ours[0].astype(np.float32), ref, atol=0.02)


# --------------------------------------------------------------------------- Kinetics-Sounds


def make_ks_videos(base: Path, classes=("playing drums", "dog barking"), per_class: int = 3) -> list[tuple[str, str]]:
    made = []
    for c, cls in enumerate(classes):
        (base / cls).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            vid = f"yt{c}{k}abcdEF"
            write_mp4(base / cls / f"{vid}.mp4", 2.0, freq=300 + 200 * c + 20 * k, seed=c)
            made.append((vid, cls))
    return made


@pytest.fixture(scope="module")
def ks_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw") / "ks"
    make_ks_videos(root)
    write_garbage(root / "dog barking" / "corrupt01.mp4")
    write_mp4(root / "dog barking" / "silentvid.mp4", 2.0, audio=False)
    return root


def test_kinetics_sounds_class_folders(ks_root, tmp_path):
    out = tmp_path / "ks"
    summary = run("kinetics_sounds", ks_root, out, *SMALL_AUDIO, *SMALL_FRAMES, "--max_frames", "3")
    idx, meta = index(out), json.loads((out / "meta.json").read_text())
    assert meta["class_names"] == ["dog barking", "playing drums"]
    assert summary["clips"] == 6
    skips = skipped(out)
    assert skips["silentvid"].startswith("no audio track")
    assert "unreadable" in skips["corrupt01"]
    check_splits(idx)  # no lists: stratified train/val/test
    assert np.load(out / "audio.npy", mmap_mode="r").shape == (6, *SPEC_SHAPE)
    assert (np.diff(idx["offsets"]["visual"]) == 3).all()  # 4 frames at 2 fps, capped to 3
    assert any("Kinetics-Sounds has 31" in n for n in meta["notes"])
    ds = get_dataset_entry("kinetics_sounds").build(cfg(out), "val")
    assert tuple(ds[0]["visual"].shape) == (3, 3, 28, 28)  # 3 frames by default


def test_kinetics_sounds_csv(tmp_path):
    root = tmp_path / "ks_csv"
    made = make_ks_videos(root / "clips", per_class=4)
    with open(root / "kinetics_sounds.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["youtube_id", "label", "split"])
        for k, (vid, cls) in enumerate(made):
            w.writerow([vid, cls, "val" if k % 4 == 3 else "train"])
        w.writerow(["notdownloaded", "dog barking", "train"])
    write_mp4(root / "clips" / "stray.mp4")  # a video no row names: ignored and counted
    out = tmp_path / "out"
    summary = run("kinetics_sounds", root, out, *SMALL_AUDIO, *SMALL_FRAMES)
    assert summary["unlisted"] == 1 and json.loads((out / "meta.json").read_text())["split"]["unlisted"] == 1
    idx = index(out)
    check_splits(idx)  # val from the list, test carved from train
    listed_val = {vid for k, (vid, _) in enumerate(made) if k % 4 == 3}
    assert {c for c, s in zip(idx["clip_ids"], idx["splits"]) if s == "val"} == listed_val
    assert skipped(out)["notdownloaded"].startswith("missing video")


# --------------------------------------------------------------------------- UCF101

UCF_CLASSES = ("ApplyEyeMakeup", "Basketball")


@pytest.fixture(scope="module")
def ucf_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw") / "UCF101"
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(UCF_CLASSES)))
    train1, test1, train2, test2 = [], [], [], []
    for ci, cls in enumerate(UCF_CLASSES):
        (root / "UCF-101" / cls).mkdir(parents=True)
        for g in range(1, 5):
            for c in range(1, 3):
                name = f"v_{cls}_g{g:02d}_c{c:02d}.avi"
                write_cv2_video(root / "UCF-101" / cls / name, "MJPG", 1.5, seed=ci)
                entry = f"{cls}/{name}"
                if ci == 1 and g == 3 and c == 1:
                    entry = entry.lower()  # the lists' spelling need not match the disk's case
                (test1 if g == 1 else train1).append(f"{entry} {ci + 1}" if g != 1 else entry)
                (test2 if g == 2 else train2).append(f"{entry} {ci + 1}" if g != 2 else entry)
    write_garbage(root / "UCF-101" / "Basketball" / "v_Basketball_g04_c02.avi")
    for lines in (train1, train2):
        lines.append("Basketball/v_Basketball_g05_c01.avi 2")  # listed, not on disk
    for name, lines in (("trainlist01", train1), ("testlist01", test1), ("trainlist02", train2), ("testlist02", test2)):
        (lists / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_ucf101_rgb_and_flow(ucf_root, tmp_path):
    out = tmp_path / "ucf"
    summary = run("ucf101", ucf_root, out, *SMALL_FRAMES)
    idx, meta = index(out), json.loads((out / "meta.json").read_text())
    assert summary["clips"] == 15 and meta["modalities"] == ["visual", "flow"]
    skips = skipped(out)
    assert skips["v_Basketball_g05_c01"].startswith("missing video")
    assert skips["v_Basketball_g04_c02"].startswith("unreadable video")
    assert not (out / "audio.npy").exists()
    flow = np.load(out / "flow.npy", mmap_mode="r")
    visual = np.load(out / "visual.npy", mmap_mode="r")
    assert flow.shape[1:] == (2, 32, 32) and visual.shape[1:] == (3, 32, 32) and flow.shape[0] == visual.shape[0]
    assert idx["offsets"]["flow"] == idx["offsets"]["visual"]
    assert (flow[:, 0].astype(int) > FLOW_HALF + 3).any()  # the square moves right: u > 0 somewhere
    split_of = dict(zip(idx["clip_ids"], idx["splits"]))
    assert all(split_of[c] == "test" for c in split_of if "_g01_" in c)  # official split 1
    groups = {}
    for _cid, g, s in zip(idx["clip_ids"], idx["groups"], idx["splits"]):
        groups.setdefault(g, set()).add(s)
    assert all(len(s) == 1 for s in groups.values())  # val carved by whole gXX groups
    assert "val" in set(idx["splits"])
    assert "flow" in meta["stats"] and len(meta["stats"]["flow"]["std"]) == 2
    info = get_dataset_entry("ucf101").info(cfg(out))
    assert [m.channels for m in info.modalities] == [3, 2]
    assert info.modalities[1].kind == "frames" and info.modalities[1].shape == (2, 3, 28, 28)
    # --split 2: same clips, new splits, nothing extracted again
    again = run("ucf101", ucf_root, out, *SMALL_FRAMES, "--split", "2")
    assert again["status"] == "resplit"
    idx2 = index(out)
    assert all(s == "test" for c, s in zip(idx2["clip_ids"], idx2["splits"]) if "_g02_" in c)


# --------------------------------------------------------------------------- AVE


def test_ave(tmp_path):
    root = tmp_path / "AVE_Dataset"
    (root / "AVE").mkdir(parents=True)
    cats = ("Church bell", "Dog")
    lines, sets = [], {"train": [], "val": [], "test": []}
    for c, cat in enumerate(cats):
        for k, split in enumerate(("train", "train", "train", "val", "test")):
            vid = f"ave{c}{k}XyZ"
            write_mp4(root / "AVE" / f"{vid}.mp4", 2.0, freq=250 + 300 * c, seed=c)
            line = f"{cat}&{vid}&good&0&10"
            lines.append(line)
            sets[split].append(line)
    write_garbage(root / "AVE" / "ave00XyZ.mp4")
    sets["train"].append("Dog&gone0000&good&0&10")
    (root / "Annotations.txt").write_text("Category&VideoID&Quality&StartTime&EndTime\n" + "\n".join(lines) + "\n")
    for split, name in (("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt")):
        (root / name).write_text("\n".join(sets[split]) + "\n")
    out = tmp_path / "out"
    summary = run("ave", tmp_path, out, *SMALL_AUDIO, *SMALL_FRAMES)  # the folder above AVE_Dataset/ works too
    idx = index(out)
    assert summary["clips"] == 9
    assert skipped(out)["gone0000"].startswith("missing video")
    assert "unreadable" in skipped(out)["ave00XyZ"]
    assert json.loads((out / "meta.json").read_text())["class_names"] == list(cats)
    split_of = dict(zip(idx["clip_ids"], idx["splits"]))
    assert split_of["ave03XyZ"] == "val" and split_of["ave14XyZ"] == "test" and split_of["ave01XyZ"] == "train"
    item = get_dataset_entry("ave").build(cfg(out), "test")[0]
    assert tuple(item["audio"].shape) == SPEC_SHAPE


# --------------------------------------------------------------------------- VGGSound


def test_vggsound(tmp_path):
    root = tmp_path / "vggsound"
    (root / "video").mkdir(parents=True)
    labels = ("dog barking", "people marching, parade")
    rows = []
    for c, label in enumerate(labels):
        for k in range(5):
            vid, start = f"-v{c}{k}_abcDE", 30 + k
            split = "test" if k == 4 else "train"
            rows.append([vid, start, label, split])
            write_mp4(root / "video" / f"{vid}_{start:06d}.mp4", 2.0, freq=350 + 250 * c, seed=c)
    rows.append(["missing0000", 10, labels[0], "train"])
    with open(root / "vggsound.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    write_garbage(root / "video" / f"-v00_abcDE_{30:06d}.mp4")
    out = tmp_path / "out"
    summary = run("vggsound", root, out, *SMALL_AUDIO, *SMALL_FRAMES)
    idx, meta = index(out), json.loads((out / "meta.json").read_text())
    assert meta["class_names"] == list(labels)
    assert summary["clips"] == 9
    assert skipped(out)["missing0000_000010"].startswith("missing video")
    assert "unreadable" in skipped(out)["-v00_abcDE_000030"]
    check_splits(idx)  # val carved from train
    split_of = dict(zip(idx["clip_ids"], idx["splits"]))
    assert split_of["-v14_abcDE_000034"] == "test"
    assert (np.diff(idx["offsets"]["visual"]) == 3).all()  # vggsound keeps 3 frames by default
    ds = get_dataset_entry("vggsound").build(cfg(out), "train")
    assert tuple(ds[0]["visual"].shape) == (3, 3, 28, 28)


# --------------------------------------------------------------------------- command line


def test_cli_errors_are_one_line(run_script, tmp_path, capsys):
    status, err = run_script(
        "preprocess.py", "--dataset", "cremad", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")
    )
    assert status == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "no such directory" in err
    (tmp_path / "wrong").mkdir()
    cases = [
        ("cremad", [], "AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav"),
        ("ucf101", [], "ucfTrainTestlist"),
        ("ave", [], "Annotations.txt"),
        ("vggsound", [], "vggsound.csv"),
        ("kinetics_sounds", [], "class folders"),
        ("ucf101", ["--n_fft", "64"], "has no audio"),
        ("cremad", ["--split", "2"], "ucf101 only"),
        ("cremad", ["--crop_size", "300"], "--crop_size 300"),
    ]
    for dataset, extra, expected in cases:
        code = cli_main(["--dataset", dataset, "--root", str(tmp_path / "wrong"), "--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and err.count("\n") == 1, (dataset, err)


def test_finished_cache_with_other_parameters_is_refused(cremad_root, cremad_cache, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(cremad_cache, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match=r"holds a cache made with other parameters \(hop_length: 32 -> 16\).*--fresh"):
        run("cremad", cremad_root, out, *SMALL_AUDIO, *SMALL_FRAMES, "--hop_length", "16")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "dataset": "ave"}))
    with pytest.raises(UserError, match="holds a ave cache; use another --out, or add --fresh"):
        run("cremad", cremad_root, out, *SMALL_AUDIO, *SMALL_FRAMES)


def test_files_preprocessing_did_not_write_are_never_replaced(cremad_root, tmp_path):
    out = tmp_path / "shared"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    np.save(out / "flow.npy", np.arange(3))  # not an array a CREMA-D cache has
    run("cremad", cremad_root, out, *SMALL_AUDIO, *SMALL_FRAMES)
    assert (out / "notes.txt").read_text() == "mine" and np.load(out / "flow.npy").tolist() == [0, 1, 2]
    assert get_dataset_entry("cremad").info(cfg(out)).num_classes == 6
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "index.json").write_text('{"mine": true}')
    with pytest.raises(UserError, match="already holds index.json, not written by preprocess.py"):
        run("cremad", cremad_root, foreign, *SMALL_AUDIO, *SMALL_FRAMES)
    assert sorted(p.name for p in foreign.iterdir()) == ["index.json"]
    assert (foreign / "index.json").read_text() == '{"mine": true}'


def _read_only_folder(tmp_path: Path) -> Path | None:
    """A folder this process cannot write to: a chmod 555 one, or (as root, whom modes do not
    stop) /sys where the kernel refuses new files; None where neither holds."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    for candidate in (ro, Path("/sys")):
        try:
            with open(candidate / ".probe", "w"):
                pass
            (candidate / ".probe").unlink()
        except OSError:
            return candidate
    return None


def test_output_that_cannot_be_written_is_one_line(cremad_root, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    ro = _read_only_folder(tmp_path)
    cases = [(a_file, "is a file, not a folder")]
    if ro is not None:
        cases.append((ro, "cannot write there"))
    for out, expected in cases:
        code = cli_main(["--dataset", "cremad", "--root", str(cremad_root), "--out", str(out), "--workers", "0"])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and err.count("\n") == 1, err
    assert a_file.read_text() == "keep"


@pytest.mark.parametrize(
    "option", [["--fps", "inf"], ["--fps", "nan"], ["--duration", "nan"], ["--val_fraction", "nan"]]
)
def test_non_finite_options_are_refused(cremad_root, tmp_path, capsys, option):
    out = tmp_path / "o"
    code = cli_main(["--dataset", "cremad", "--root", str(cremad_root), "--out", str(out), *option])
    err = capsys.readouterr().err
    assert code == 2 and f"{option[0]} must be a finite number" in err and err.count("\n") == 1, err
    assert not out.exists()  # refused before anything was written


def test_empty_result_is_an_error(tmp_path):
    root = tmp_path / "CREMA-D"
    (root / "AudioWAV").mkdir(parents=True)
    (root / "VideoFlash").mkdir()
    for actor in (1001, 1002, 1003):  # enough for a train, a val and a test clip
        write_garbage(root / "AudioWAV" / f"{actor}_IEO_NEU_HI.wav")
        write_cv2_video(root / "VideoFlash" / f"{actor}_IEO_NEU_HI.flv", "FLV1", 1.0)
    with pytest.raises(UserError, match="no clip could be processed"):
        run("cremad", root, tmp_path / "out", *SMALL_AUDIO, *SMALL_FRAMES)
    assert "1001_IEO_NEU_HI" in skipped(tmp_path / "out")


def test_an_empty_split_is_refused_before_any_clip_is_decoded(tmp_path, monkeypatch):
    from onthefly.data.raw import pipeline

    root = tmp_path / "CREMA-D"
    (root / "AudioWAV").mkdir(parents=True)
    (root / "VideoFlash").mkdir()
    write_wav(root / "AudioWAV" / "1001_IEO_NEU_HI.wav")
    write_cv2_video(root / "VideoFlash" / "1001_IEO_NEU_HI.flv", "FLV1", 1.0)
    monkeypatch.setattr(pipeline, "run_jobs", lambda *a, **k: pytest.fail("a clip was decoded"))
    with pytest.raises(UserError, match="would be empty"):
        run("cremad", root, tmp_path / "out", *SMALL_AUDIO, *SMALL_FRAMES)
    assert not (tmp_path / "out" / ".work").exists()


def test_help_and_cache_side_import_no_media_libraries():
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['preprocess.py', '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(REPO / 'code' / 'preprocess.py')!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0\n"
        "import onthefly.data.cache.registration\n"
        "print(sorted(m for m in ('librosa', 'cv2', 'av') if m in sys.modules))\n"
    )
    # A fresh interpreter: what this one has imported already says nothing.
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
    assert "--speaker_independent" in r.stdout


def test_train_one_epoch_from_cache(tiny_encoders, cremad_cache, tmp_path, capsys):
    """train.py's main runs one short epoch from a preprocessed cache."""
    argv = [
        "--dataset",
        "cremad",
        "--data",
        str(cremad_cache),
        "--epochs",
        "1",
        "--batch_size",
        "2",
        "--device",
        "cpu",
        "--num_workers",
        "0",
        "--limit_samples",
        "4",
        "--output_dir",
        str(tmp_path / "runs"),
    ]
    assert runner.main(argv) == 0, capsys.readouterr().err[-2000:]
    out = capsys.readouterr().out
    assert "epoch   0" in out
    assert "train/val samples: 4/" in out  # --limit_samples: the first 4 of each split
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "last.pt").exists()


# --------------------------------------------------------------------------- reports of broken clips, hangs, crashes


def make_small_cremad(root: Path, actors: range) -> None:
    """One ANG clip per actor, each a good WAV and FLV."""
    (root / "AudioWAV").mkdir(parents=True)
    (root / "VideoFlash").mkdir()
    for k, a in enumerate(actors):
        write_wav(root / "AudioWAV" / f"{a}_IEO_ANG_HI.wav", 1.5, 16000, 200 + 40 * k)
        write_cv2_video(root / "VideoFlash" / f"{a}_IEO_ANG_HI.flv", "FLV1", 1.0, seed=k)


def test_a_video_without_audio_and_both_files_of_a_corrupt_pair_are_reported(tmp_path):
    root = tmp_path / "CREMA-D"
    make_small_cremad(root, range(1001, 1006))
    write_garbage(root / "AudioWAV" / "1004_IEO_ANG_HI.wav")  # a corrupt pair
    write_garbage(root / "VideoFlash" / "1004_IEO_ANG_HI.flv")
    os.remove(root / "AudioWAV" / "1005_IEO_ANG_HI.wav")  # a video without its audio
    out = tmp_path / "out"
    summary = run("cremad", root, out, *SMALL_AUDIO, *SMALL_FRAMES)
    skips = skipped(out)
    assert summary["clips"] == 3 and set(skips) == {"1004_IEO_ANG_HI", "1005_IEO_ANG_HI"}
    assert skips["1005_IEO_ANG_HI"] == "missing audio AudioWAV/1005_IEO_ANG_HI.wav"
    pair = skips["1004_IEO_ANG_HI"]
    assert pair.startswith("unreadable audio file (NoBackendError: no installed decoder")  # not an empty reason
    assert "unreadable video" in pair and "1004_IEO_ANG_HI.flv" in pair  # the corrupt video is named too


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_named_pipes_a_hung_and_a_crashing_decoder_are_reported_and_every_other_clip_kept(tmp_path, monkeypatch):
    from onthefly.data.raw import pipeline

    root = tmp_path / "CREMA-D"
    make_small_cremad(root, range(1001, 1008))
    for path in (root / "AudioWAV" / "1003_IEO_ANG_HI.wav", root / "VideoFlash" / "1004_IEO_ANG_HI.flv"):
        path.unlink()
        os.mkfifo(path)  # opening it for reading blocks until a writer comes: never
    monkeypatch.setattr(pipeline, "process_clip", decoder_stubs.hang_or_crash_then_process)
    out = tmp_path / "out"
    t0 = time.time()
    summary = run("cremad", root, out, *SMALL_AUDIO, *SMALL_FRAMES, "--clip_timeout", "3", workers=2)
    assert time.time() - t0 < 120
    skips = skipped(out)
    assert "--clip_timeout 3 s" in skips["1001_IEO_ANG_HI"]
    assert "crashed" in skips["1002_IEO_ANG_HI"] and "SIGSEGV" in skips["1002_IEO_ANG_HI"]
    assert skips["1003_IEO_ANG_HI"] == "audio file is not a regular file (a named pipe, device or folder)"
    assert skips["1004_IEO_ANG_HI"] == "video file is not a regular file (a named pipe, device or folder)"
    assert summary["clips"] == 3 and len(skips) == 4
    assert sorted(index(out)["clip_ids"]) == [f"{a}_IEO_ANG_HI" for a in (1005, 1006, 1007)]


def test_a_second_preprocess_on_one_out_is_refused_in_one_line(cremad_root, tmp_path, capsys):
    from onthefly.rundir import acquire_run_lock

    out = tmp_path / "out"
    out.mkdir()
    held = acquire_run_lock(out)  # another preprocess.py working in --out
    try:
        code = cli_main(
            [
                "--dataset",
                "cremad",
                "--root",
                str(cremad_root),
                "--out",
                str(out),
                "--workers",
                "0",
                "--random_split",
                "--quiet",
                *SMALL_AUDIO,
                *SMALL_FRAMES,
            ]
        )
    finally:
        held.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"error: {out} is in use by process {os.getpid()}")
    assert err[-1].endswith("choose another --out") and not (out / ".work").exists()
