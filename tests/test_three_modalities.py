"""Three modalities from end to end: AV-Digits with sklearn's 8x8 scans as a third stream, and
Kinetics-Sounds with Farneback flow beside audio and frames (preprocess -> cache -> one epoch)."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from test_datasets_raw import SMALL_AUDIO, SMALL_FRAMES, index, make_ks_videos, run

from onthefly import runner
from onthefly.analysis.tb import read_scalars
from onthefly.config import get_args_parser
from onthefly.data import avdigits as A
from onthefly.data.cache.format import FLOW_HALF
from onthefly.data.raw.cli import main as preprocess_main
from onthefly.data.registry import get_dataset_entry

REPO = Path(__file__).resolve().parents[1]
THREE = "audio,visual,scan"
METHODS = tuple(get_args_parser()._option_string_actions["--modulation"].choices)  # every method train.py offers


# --------------------------------------------------------------------------- AV-Digits + scans


@pytest.fixture(scope="module")
def arrays3() -> dict[str, np.ndarray]:
    return A.build_arrays(A.build_params(modalities=("audio", "visual", "scan")))


@pytest.fixture(scope="module")
def avdigits_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("avdigits")


def test_default_two_modalities_unchanged(arrays3):
    """The default parameters, and so the cache file they name, are those of the two-modality data
    (main's file name), and the scans leave the audio and image arrays as they were."""
    assert A.build_params() == A.build_params(modalities=("audio", "visual"))
    assert "scan_noise" not in A.build_params()
    assert A.cache_path(Namespace(data="d")).name == "avdigits_6609958d3e.npz"
    assert A.cache_path(Namespace(data="d", avdigits_modalities=THREE)).name != "avdigits_6609958d3e.npz"
    two = A.build_arrays(A.build_params())
    assert set(two) == {"audio", "image", "label", "split", "image_index"}
    for k, v in two.items():
        np.testing.assert_array_equal(v, arrays3[k], err_msg=k)


def test_scans_paired_by_class_from_disjoint_split_pools(arrays3):
    digits = load_digits()
    pairs, split = arrays3["scan_index"], arrays3["split"]
    np.testing.assert_array_equal(digits.target[pairs], arrays3["label"])  # same digit as the clip
    used = [set(pairs[split == s]) for s in range(3)]
    assert not (used[0] & used[1]) and not (used[0] & used[2]) and not (used[1] & used[2])
    # The pool is smaller than the clips: each scan of a split serves 1 or 2 of its clips, no more.
    for s in range(3):
        counts = np.bincount(pairs[split == s])
        assert counts[counts > 0].min() >= 1 and counts.max() <= 2
    scans = arrays3["scan"]
    assert scans.shape == (3000, 8, 8) and scans.dtype == np.uint8
    # Degraded, not replaced wholesale: clean-scan correlation is high on average but not 1.
    clean = digits.images[pairs].reshape(3000, -1) / 16.0
    noisy = scans.reshape(3000, -1) / 255.0
    r = [np.corrcoef(c, n)[0, 1] for c, n in zip(clean[:200], noisy[:200])]
    assert 0.2 < float(np.nanmean(r)) < 0.95


def test_three_modality_items_and_info(avdigits_dir):
    cfg = Namespace(data=str(avdigits_dir), avdigits_modalities="scan,audio,visual", limit_samples=5)
    info = get_dataset_entry("avdigits").info(cfg)
    assert info.modality_names == ("audio", "visual", "scan")  # canonical order whatever the order given
    assert info.extra["build"]["scan_noise"] == A.SCAN_DEFAULTS["scan_noise"]
    item = get_dataset_entry("avdigits").build(cfg, "val")[3]
    assert set(item) == {"audio", "visual", "scan", "label", "index"}
    assert tuple(item["scan"].shape) == (1, 1, 8, 8) and tuple(item["visual"].shape) == (3, 1, 28, 28)
    pair = Namespace(data=str(avdigits_dir), avdigits_modalities="audio,scan", limit_samples=5)
    assert set(get_dataset_entry("avdigits").build(pair, "val")[3]) == {"audio", "scan", "label", "index"}
    np.testing.assert_array_equal(get_dataset_entry("avdigits").build(pair, "val")[3]["scan"], item["scan"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--avdigits_modalities", "audio"], "--avdigits_modalities audio: give two or more distinct names"),
        (["--avdigits_modalities", "audio,smell"], "--avdigits_modalities audio,smell: give two or more"),
        (["--avdigits_modalities", "audio,audio"], "give two or more distinct names"),
        (["--scan_noise", "0.1"], "--scan_noise: only with scans"),
        (["--avdigits_modalities", THREE, "--scan_corrupt", "2"], "--scan_corrupt must be in [0, 1]"),
        (["--dataset", "cremad", "--avdigits_modalities", THREE], "--avdigits_modalities: only for avdigits"),
        (["--avdigits_modalities", THREE, "--modality", "smell"], "avdigits has modalities audio, visual, scan"),
    ],
)
def test_three_modality_misuse_is_one_line(tmp_path, capsys, args, message):
    rc = runner.main([*args, "--data", str(tmp_path / "d"), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_three_modalities(tiny_encoders, avdigits_dir, tmp_path, capsys, method):
    argv = [
        "--avdigits_modalities",
        THREE,
        "--data",
        str(avdigits_dir),
        "--modulation",
        method,
        "--epochs",
        "1",
        "--batch_size",
        "16",
        "--limit_samples",
        "48",
        "--device",
        "cpu",
        "--output_dir",
        str(tmp_path),
    ]
    argv += ["--const_dominant", "audio"] if method == "OGM_CONST" else []  # the modality it scales, by name
    assert runner.main(argv) == 0, capsys.readouterr().err[-2000:]
    (run_dir,) = tmp_path.iterdir()
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"val_acc_audio", "val_acc_visual", "val_acc_scan"} <= set(record)
    # The modulator scored all three modalities, and each method's own statistic is there for each.
    logged = set(read_scalars(run_dir / "tb", "modulation/"))
    own = {
        "OGM": ("coeff",),
        "OGM_GE": ("coeff",),
        "OPM": ("drop_prob",),
        "OGM_OPM": ("coeff", "drop_prob"),
        "OGM_GE_OPM": ("coeff", "drop_prob"),
    }.get(method, ())
    expected = {f"modulation/{what}_{m}" for what in ("score", "ratio", *own) for m in ("audio", "visual", "scan")}
    assert expected <= logged, sorted(logged)


def test_scan_alone_reference(tiny_encoders, avdigits_dir, tmp_path, capsys):
    argv = [
        "--avdigits_modalities",
        THREE,
        "--data",
        str(avdigits_dir),
        "--modality",
        "scan",
        "--epochs",
        "1",
        "--batch_size",
        "16",
        "--limit_samples",
        "48",
        "--device",
        "cpu",
        "--output_dir",
        str(tmp_path),
    ]
    assert runner.main(argv) == 0, capsys.readouterr().err[-2000:]
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name == "avdigits_scan-only_none_seed0"
    assert "val_acc_scan" in json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


# --------------------------------------------------------------------------- Kinetics-Sounds + flow


@pytest.fixture(scope="module")
def ks_flow_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw") / "ks"
    make_ks_videos(root, per_class=5)
    out = tmp_path_factory.mktemp("cache") / "ks3"
    summary = run("kinetics_sounds", root, out, *SMALL_AUDIO, *SMALL_FRAMES, "--max_frames", "3", "--with_flow")
    assert summary["status"] == "built"
    return out


def test_kinetics_sounds_flow_cache(ks_flow_cache):
    out = ks_flow_cache
    meta, idx = json.loads((out / "meta.json").read_text()), index(out)
    assert meta["modalities"] == ["audio", "visual", "flow"]
    assert meta["processing"]["flow_bound"] == 20.0 and "farneback" in meta["processing"]["flow_method"]
    flow, visual = np.load(out / "flow.npy", mmap_mode="r"), np.load(out / "visual.npy", mmap_mode="r")
    assert flow.shape[1:] == (2, 32, 32) and flow.shape[0] == visual.shape[0] == 3 * len(idx["clip_ids"])
    assert idx["offsets"]["flow"] == idx["offsets"]["visual"]
    assert (flow[:, 0].astype(int) > FLOW_HALF + 3).any()  # the square moves right: u > 0 somewhere
    assert len(meta["stats"]["flow"]["mean"]) == 2
    info = get_dataset_entry("kinetics_sounds").info(Namespace(data=str(out), num_frames=None))
    assert info.modality_names == ("audio", "visual", "flow")
    assert info.modalities[2].kind == "frames" and info.modalities[2].shape == (2, 3, 28, 28)


def test_kinetics_sounds_without_flow_keeps_its_parameters(tmp_path):
    """Without --with_flow the extraction parameters (the resume and reuse key) are those of before."""
    from onthefly.data.raw import get_layout
    from onthefly.data.raw.cli import build_parser
    from onthefly.data.raw.pipeline import processing_params

    layout = get_layout("kinetics_sounds")
    plain = processing_params(layout, build_parser().parse_args(["--dataset", "kinetics_sounds"]))
    assert "flow_bound" not in plain and "flow_method" not in plain
    flow = processing_params(layout, build_parser().parse_args(["--dataset", "kinetics_sounds", "--with_flow"]))
    assert {k: v for k, v in flow.items() if not k.startswith("flow_")} == plain


@pytest.mark.parametrize(
    "dataset,extra,message",
    [
        ("ucf101", ["--with_flow"], "--with_flow: applies to kinetics_sounds only"),
        ("cremad", ["--with_flow"], "--with_flow: applies to kinetics_sounds only"),
        (
            "kinetics_sounds",
            ["--flow_bound", "10"],
            "--flow_bound: kinetics_sounds has no optical flow (add --with_flow)",
        ),
    ],
)
def test_flow_options_refused_where_they_do_nothing(tmp_path, capsys, dataset, extra, message):
    argv = ["--dataset", dataset, "--root", str(tmp_path), "--out", str(tmp_path / "out"), *extra]
    assert preprocess_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_kinetics_sounds_three_modalities_train_one_epoch(tiny_encoders, ks_flow_cache, tmp_path, capsys):
    """configs/kinetics_sounds_3mod.yaml on the tiny cache, shortened: one epoch, three encoders."""
    argv = [
        "--config",
        str(REPO / "configs" / "kinetics_sounds_3mod.yaml"),
        "--data",
        str(ks_flow_cache),
        "--epochs",
        "1",
        "--batch_size",
        "2",
        "--crop_size",
        "28",
        "--warmup_epochs",
        "0",
        "--device",
        "cpu",
        "--num_workers",
        "0",
        "--output_dir",
        str(tmp_path),
    ]
    assert runner.main(argv) == 0, capsys.readouterr().err[-2000:]
    assert "(audio " in capsys.readouterr().out
    (run_dir,) = tmp_path.iterdir()
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"val_acc_audio", "val_acc_visual", "val_acc_flow"} <= set(record)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset"] == "kinetics_sounds" and config["modulation"] != "none"


def test_zero_modality_on_three_modalities(tiny_encoders, avdigits_dir, tmp_path, capsys):
    """--zero_modality scan on a three-modality run: the scans' share sees only zeros, while the
    audio and visual shares of the concat head (z_m = h_m W_m^T + b/M) are exactly unchanged."""
    from onthefly.infer import main as inference_main

    argv = [
        "--avdigits_modalities",
        THREE,
        "--data",
        str(avdigits_dir),
        "--epochs",
        "1",
        "--batch_size",
        "16",
        "--limit_samples",
        "48",
        "--device",
        "cpu",
        "--output_dir",
        str(tmp_path),
    ]
    assert runner.main(argv) == 0, capsys.readouterr().err[-2000:]
    (run_dir,) = tmp_path.iterdir()
    evaluate = ["--checkpoint", str(run_dir), "--split", "val", "--device", "cpu"]
    assert inference_main(evaluate) == 0
    assert inference_main([*evaluate, "--zero_modality", "scan"]) == 0
    plain = json.loads((run_dir / "eval_val" / "metrics.json").read_text())
    zeroed = json.loads((run_dir / "eval_val_zero_scan" / "metrics.json").read_text())
    assert zeroed["zero_modality"] == "scan" and zeroed["samples"] == plain["samples"] > 0
    assert (zeroed["acc_audio"], zeroed["acc_visual"]) == (plain["acc_audio"], plain["acc_visual"])
    rows = (run_dir / "eval_val_zero_scan" / "predictions.csv").read_text().splitlines()
    scan_predictions = {line.split(",")[-1] for line in rows[1:]}
    assert len(scan_predictions) == 1  # every sample's scan input is the same zero tensor
