"""Analysis: linear probe accuracy on data with a known answer, the comparison report on
hand-written run folders, and missing-modality inference on a tiny trained checkpoint."""

import argparse
import csv
import errno
import json
import math
import os
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from onthefly import infer, runner
from onthefly.analysis import probe as probe_module
from onthefly.analysis.probe import linear_probe, probe_checkpoint
from onthefly.analysis.probe import main as probe_main
from onthefly.analysis.report import main as report_main
from onthefly.analysis.report import write_report
from onthefly.errors import UserError
from onthefly.infer import ZeroModality
from onthefly.metrics import classification_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- linear probe


def test_probe_is_perfect_on_linearly_separable_classes():
    g = torch.Generator().manual_seed(0)

    def split(n):
        y = torch.randint(0, 3, (n,), generator=g)
        x = torch.randn(n, 16, generator=g)
        x[:, 0] = y.float() * 10 + torch.rand(n, generator=g)  # three bands along dimension 0, gaps of 9
        return x, y

    result = linear_probe(split(300), split(100), split(300), num_classes=3, l2_grid=(1e-2, 1.0))
    assert result["test_acc"] == 1.0 and result["val_acc"] == 1.0 and result["train_acc"] == 1.0


def test_probe_reaches_the_bayes_accuracy_of_gaussian_classes():
    # Four classes N(mu_k, I) in 8-D with equal priors: the Bayes classifier is the nearest mean.
    g = torch.Generator().manual_seed(1)
    means = torch.zeros(4, 8)
    means[:, :2] = torch.tensor([[1.2, 0.0], [-1.2, 0.0], [0.0, 1.2], [0.0, -1.2]])

    def split(n):
        y = torch.randint(0, 4, (n,), generator=g)
        return means[y] + torch.randn(n, 8, generator=g), y

    train, val, test = split(4000), split(1000), split(8000)
    bayes = float((torch.cdist(test[0], means).argmin(1) == test[1]).float().mean())
    result = linear_probe(train, val, test, num_classes=4)
    assert 0.55 < bayes < 0.8  # an informative but not trivial problem
    assert result["test_acc"] == pytest.approx(bayes, abs=0.015)
    assert result["l2"] in [g_["l2"] for g_ in result["grid"]]
    chosen = next(g_ for g_ in result["grid"] if g_["l2"] == result["l2"])
    assert chosen["val_acc"] == max(g_["val_acc"] for g_ in result["grid"])


def test_probe_on_noise_is_at_chance():
    g = torch.Generator().manual_seed(2)

    def split(n):
        return torch.randn(n, 32, generator=g), torch.randint(0, 2, (n,), generator=g)

    result = linear_probe(split(400), split(400), split(4000), num_classes=2)
    assert abs(result["test_acc"] - 0.5) < 0.04


# --------------------------------------------------------------------------- report on hand-written runs


def write_run(
    root: Path,
    name: str,
    config: dict,
    test: dict | None,
    probe: dict | None = None,
    epochs: list[dict] | None = None,
    zero: dict | None = None,
    predictions=None,
    tb: dict | None = None,
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    base = {
        "dataset": "avdigits",
        "modality": "both",
        "fusion": "concat",
        "modulation": "none",
        "seed": 0,
        "lr": 0.01,
        "run_name": name,
        "output_dir": str(root),
    }
    (run / "config.json").write_text(json.dumps({**base, **config}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in (epochs or [])))
    if test is not None:
        (run / "test_metrics.json").write_text(json.dumps(test))
    if probe is not None:
        (run / "probe.json").write_text(json.dumps(probe))
    for m, acc in (zero or {}).items():
        (run / f"eval_test_zero_{m}").mkdir()
        (run / f"eval_test_zero_{m}" / "metrics.json").write_text(json.dumps({"acc": acc, "zero_modality": m}))
    if predictions is not None:
        (run / "eval_test").mkdir()
        (run / "eval_test" / "metrics.json").write_text(json.dumps({"acc": test["acc"]}))
        with open(run / "eval_test" / "predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "label", "pred", "confidence", "pred_audio", "pred_visual"])
            for i, (y, p) in enumerate(predictions):
                w.writerow([i, y, p, "0.9", p, p])
    if tb is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run / "tb"))
        for tag, values in tb.items():
            for step, v in enumerate(values, start=1):
                writer.add_scalar(tag, v, step)
        writer.close()
    return run


def epochs_of(accs):
    return [{"epoch": e, "val_acc": a, "val_acc_audio": a + 0.1, "val_acc_visual": a - 0.2} for e, a in enumerate(accs)]


@pytest.fixture
def fake_runs(tmp_path):
    root = tmp_path / "runs"
    v = {  # (modulation, seed) -> test acc, acc_audio, acc_visual, macro_f1, mAP, probe audio, probe visual
        ("none", 0): (0.80, 0.75, 0.30, 0.79, 0.85, 0.90, 0.50),
        ("none", 1): (0.84, 0.77, 0.36, 0.83, 0.88, 0.92, 0.56),
        ("OGM", 0): (0.86, 0.70, 0.55, 0.85, 0.90, 0.91, 0.70),
        ("OGM", 1): (0.90, 0.74, 0.59, 0.88, 0.93, 0.93, 0.74),
    }
    for (method, seed), (acc, a, b, f1, ap, pa, pb) in v.items():
        write_run(
            root,
            f"{method}_seed{seed}",
            {"modulation": method, "seed": seed},
            {"best_epoch": 1, "acc": acc, "macro_f1": f1, "mAP": ap, "acc_audio": a, "acc_visual": b, "loss": 1.0},
            # OGM seed 1 has no probe: its probe cells average one seed
            probe=None if (method, seed) == ("OGM", 1) else {"acc_audio": pa, "acc_visual": pb},
            epochs=epochs_of([acc - 0.1, acc]),
            zero={"audio": acc / 4, "visual": acc - 0.1},
            predictions=[("0", "0"), ("1", "1"), ("2", "1"), ("1", "1")] if seed == 0 else None,
            tb={
                "modulation/ratio_audio": [2.0, 3.0, 2.5],
                "modulation/ratio_visual": [0.5, 0.33, 0.4],
                "modulation/score_audio": [5, 6, 7],
                "modulation/score_visual": [2, 2, 3],
                **(
                    {"modulation/coeff_audio": [0.5, 0.4, 0.45], "modulation/coeff_visual": [1, 1, 1]}
                    if method == "OGM"
                    else {}
                ),
            },
        )
    for seed, acc in ((0, 0.88), (1, 0.92)):
        write_run(
            root,
            f"audio-alone_seed{seed}",
            {"modality": "audio", "seed": seed},
            {"acc": acc, "macro_f1": acc, "mAP": acc, "acc_audio": acc},
            epochs=[{"epoch": 0, "val_acc": acc, "val_acc_audio": acc}],
        )
    write_run(
        root,
        "visual-alone_seed0",
        {"modality": "visual"},
        {"acc": 0.62, "macro_f1": 0.6, "mAP": 0.7, "acc_visual": 0.62},
        epochs=[{"epoch": 0, "val_acc": 0.62, "val_acc_visual": 0.62}],
    )
    write_run(root, "OGM_unfinished", {"modulation": "OGM", "seed": 2}, test=None)  # no test_metrics.json
    return root, v


def fmt(values):
    text = f"{100 * statistics.fmean(values):.2f}"
    return text + (f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else "")


def test_report_table_and_figures(fake_runs, tmp_path):
    root, v = fake_runs
    out = tmp_path / "report"
    result = write_report([root], out)
    md = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    (ds,) = summary["datasets"]
    assert ds["modalities"] == ["audio", "visual"]
    groups = {g["label"]: g for g in ds["groups"]}
    assert list(groups) == ["none", "OGM", "audio alone", "visual alone"]
    assert groups["OGM"]["finished"] == 2 and len(groups["OGM"]["runs"]) == 3

    main_table = md.split("### Test results")[1].split("###")[0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in main_table.splitlines() if line.startswith("| ")}
    for method in ("none", "OGM"):
        vals = np.array([v[(method, s)] for s in (0, 1)])
        c = groups[method]["columns"]
        for j, key in enumerate(["acc", "head_audio", "head_visual", "macro_f1", "mAP"]):
            assert c[key]["mean"] == pytest.approx(vals[:, j].mean())
            assert c[key]["std"] == pytest.approx(vals[:, j].std(ddof=1))
        # mean ± std of every column, in table order
        probe_a = [v[(method, s)][5] for s in (0, 1) if (method, s) != ("OGM", 1)]
        probe_b = [v[(method, s)][6] for s in (0, 1) if (method, s) != ("OGM", 1)]
        expected = [
            fmt(vals[:, 0]),
            fmt(vals[:, 1]),
            fmt(vals[:, 2]),
            fmt(probe_a) + (" (n=1)" if method == "OGM" else ""),
            fmt(probe_b) + (" (n=1)" if method == "OGM" else ""),
            fmt([0.88, 0.92]),
            fmt([0.62]),
            fmt(vals[:, 3]),
            fmt(vals[:, 4]),
        ]
        assert rows[method] == f"| {method} | 2 | " + " | ".join(expected) + " |"
    assert c["probe_audio"]["n"] == 1 and c["probe_audio"]["std"] is None
    assert groups["audio alone"]["columns"]["acc"]["mean"] == pytest.approx(0.90)
    assert rows["audio alone"].startswith(f"| audio alone | 2 | {fmt([0.88, 0.92])} | {fmt([0.88, 0.92])} | – |")

    # missing-modality table: zeroed accuracies next to eval_test's clean accuracy
    assert "### Missing modality at test time" in md
    none_zero = [line for line in md.split("### Missing modality")[1].splitlines() if line.startswith("| none |")][0]
    assert fmt([0.80 / 4, 0.84 / 4]) in none_zero and fmt([0.80 - 0.1, 0.84 - 0.1]) in none_zero
    assert "OGM_unfinished" in md  # listed as left out

    for name in (
        "val_acc_per_modality.png",
        "modulation_over_steps.png",
        "modality_accuracy.png",
        "confusion_none.png",
        "confusion_ogm.png",
    ):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        import matplotlib.image

        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 200
        assert f"({name})" in md
    assert not (out / "confusion_audio_alone.png").exists()  # no predictions.csv for it
    assert result["figures"]["avdigits"]


def test_report_reads_tensorboard_scalars(fake_runs):
    from onthefly.analysis.tb import read_scalars

    root, _ = fake_runs
    scalars = read_scalars(root / "OGM_seed0" / "tb", prefix="modulation/")
    steps, values = scalars["modulation/coeff_audio"]
    assert steps.tolist() == [1, 2, 3] and values == pytest.approx([0.5, 0.4, 0.45])
    assert "modulation/coeff_audio" not in read_scalars(root / "none_seed0" / "tb")
    assert "modulation/ratio_visual" in read_scalars(root / "none_seed0" / "tb")

    from onthefly.analysis.plots import modulation_series

    per_method = {
        m: [read_scalars(root / f"{m}_seed{s}" / "tb", prefix="modulation/") for s in (0, 1)] for m in ("none", "OGM")
    }
    drawn = modulation_series(per_method, ["audio", "visual"])
    assert [(e["label"], e["modality"], e["n"]) for e in drawn["ratio"]] == [("none", "audio", 2), ("OGM", "audio", 2)]
    assert [(e["label"], e["modality"]) for e in drawn["coeff"]] == [("OGM", "audio"), ("OGM", "visual")]
    assert drawn["coeff"][0]["mean"] == pytest.approx([0.5, 0.4, 0.45]) and drawn["drop_prob"] == []
    # runs logged before the tags carried modality names (modulation/coeff_0) are read too
    old = {"modulation/coeff_0": (np.array([1, 2]), np.array([0.3, 0.6]))}
    assert modulation_series({"OGM": [old]}, ["audio", "visual"])["coeff"][0]["mean"] == pytest.approx([0.3, 0.6])


# ---------------------------------------------------------------- missing modality, probe on a real checkpoint


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_encoders_within):
    """A one-epoch run on tiny encoders: tests that use it request `tiny_encoders` to load it."""
    root = tmp_path_factory.mktemp("tiny")
    argv = [
        "--epochs",
        "1",
        "--limit_samples",
        "64",
        "--batch_size",
        "16",
        "--device",
        "cpu",
        "--log_every",
        "1",
        "--modulation",
        "OGM_GE",
        "--output_dir",
        str(root),
        "--run_name",
        "run",
    ]
    with tiny_encoders_within():
        assert runner.main(argv) == 0
    return root / "run"


def test_zero_modality_preset_zeroes_only_that_input():
    def preset(batch):
        return {"audio": batch["audio"] + 1, "visual": batch["visual"] + 1}, batch["label"]

    batch = {"audio": torch.ones(2, 3), "visual": torch.ones(2, 4), "label": torch.tensor([0, 1])}
    inputs, labels = ZeroModality(preset, "visual")(batch)
    assert torch.equal(inputs["visual"], torch.zeros(2, 4)) and torch.equal(inputs["audio"], torch.full((2, 3), 2.0))
    assert torch.equal(labels, batch["label"])


def test_inference_with_a_modality_zeroed(tiny_encoders, tiny_run):
    for m in ("visual",):  # the frames path: zeroed after the preset's normalisation
        assert infer.main(["--checkpoint", str(tiny_run), "--device", "cpu", "--zero_modality", m]) == 0
        out = tiny_run / f"eval_test_zero_{m}"
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["zero_modality"] == m and metrics["samples"] == 300
        rows = list(csv.DictReader(open(out / "predictions.csv")))
        # A constant (zero) input gives one feature vector, hence one prediction, for every sample.
        assert len({r[f"pred_{m}"] for r in rows}) == 1
        assert metrics[f"acc_{m}"] == pytest.approx(sum(r["label"] == r[f"pred_{m}"] for r in rows) / len(rows))
    with pytest.raises(UserError, match="--zero_modality"):
        infer.run_inference(
            infer.get_args_parser().parse_args(["--checkpoint", str(tiny_run), "--zero_modality", "depth"])
        )


def test_probe_of_a_trained_checkpoint(tiny_encoders, tiny_run):
    result = probe_checkpoint(tiny_run, device_name="cpu", limit_samples=48, max_iter=30)
    saved = json.loads((tiny_run / "probe.json").read_text())
    assert saved["samples"] == {"train": 48, "val": 48, "test": 48} and saved["feature_dim"] == 512
    for m in ("audio", "visual"):
        assert 0.0 <= saved[f"acc_{m}"] <= 1.0 and saved[f"acc_{m}"] == saved["modalities"][m]["test_acc"]
        assert not math.isnan(saved["modalities"][m]["val_loss"])
    assert result["out"] == str(tiny_run / "probe.json")


def test_training_logs_epoch_and_step_values_under_distinct_tags_and_the_epoch_means_of_k(tiny_run):
    from onthefly.analysis.tb import read_scalars

    scalars = read_scalars(tiny_run / "tb")
    (record,) = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    steps, losses = scalars["epoch/train_loss"]
    assert steps.tolist() == [0] and losses[0] == pytest.approx(record["train_loss"], rel=1e-6)
    assert scalars["step/loss"][0].tolist() == [1, 2, 3, 4]  # 64 samples / 16 per batch, logged every step
    assert "train/loss" not in scalars
    # k_m averaged over the epoch's steps on the device equals the mean of the per-step values logged
    for m in ("audio", "visual"):
        per_step = scalars[f"modulation/coeff_{m}"][1]
        assert len(per_step) == 4 and record[f"train_k_{m}"] == pytest.approx(per_step.mean(), rel=1e-6)
    assert "train_q_audio" not in record  # OGM-GE computes no OPM drop probability


def test_inference_names_the_epoch_as_training_logged_it_and_each_clip(tiny_encoders, tiny_run, tmp_path):
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(tiny_run), "--device", "cpu", "--out", str(out), "--limit_samples", "20"]
    assert infer.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    test = json.loads((tiny_run / "test_metrics.json").read_text())
    assert metrics["epoch"] == test["best_epoch"] == 0 and metrics["samples"] == 20 and metrics["limit_samples"] == 20
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    from onthefly.data import get_dataset_entry

    cfg = argparse.Namespace(**{**json.loads((tiny_run / "config.json").read_text()), "limit_samples": 20})
    dataset = get_dataset_entry("avdigits").build(cfg, "test")
    assert [r["clip_id"] for r in rows] == [str(c) for c in dataset.clip_ids]


def test_inference_refuses_non_finite_weights_in_one_line(tiny_encoders, tiny_run, tmp_path, capsys):
    ckpt = torch.load(tiny_run / "best.pt", map_location="cpu", weights_only=False)
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name].view(-1)[0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(ckpt, bad)
    rc = infer.main(["--checkpoint", str(bad), "--device", "cpu", "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "non-finite weights" in err and str(bad) in err, err
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("main", [infer.main, probe_main, report_main], ids=["inference", "probe", "report"])
def test_ctrl_c_is_one_line_and_exit_130(tiny_encoders, tiny_run, tmp_path, capsys, monkeypatch, main):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(infer, "predict", interrupt)
    monkeypatch.setattr(probe_module, "extract_features", interrupt)
    argv = {
        infer.main: ["--checkpoint", str(tiny_run), "--device", "cpu", "--out", str(tmp_path / "e")],
        probe_main: ["--checkpoint", str(tiny_run), "--device", "cpu", "--out", str(tmp_path / "p.json")],
        report_main: [str(tiny_run), "--evaluate", "--device", "cpu", "--out", str(tmp_path / "r")],
    }[main]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 130 and len(err.splitlines()) == 1 and "interrupted" in err, err


def test_probe_refuses_a_dataset_split_differently(tiny_encoders, tiny_run, tmp_path, capsys, monkeypatch):
    from onthefly.data import avdigits

    real = avdigits.load_arrays

    def resplit(cfg):  # the same samples, assigned to the splits differently
        arrays = dict(real(cfg))
        arrays["split"] = np.roll(arrays["split"], 1)
        return arrays

    monkeypatch.setattr(avdigits, "load_arrays", resplit)
    out = tmp_path / "probe.json"
    rc = probe_main(["--checkpoint", str(tiny_run), "--device", "cpu", "--out", str(out), "--limit_samples", "16"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "split differently" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--l2", "nan"], "argument --l2: must be a finite number"),
        (["--l2", "0.1", "-1"], "--l2 strengths must be >= 0"),
        (["--max_iter", "0"], "--max_iter must be > 0"),
        (["--limit_samples", "0"], "--limit_samples must be > 0"),
        (["--batch_size", "0"], "--batch_size must be > 0"),
    ],
)
def test_bad_probe_options_are_one_line(tmp_path, capsys, args, message):
    rc = probe_main(["--checkpoint", str(tmp_path), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err


def test_a_failed_probe_write_leaves_no_probe_json(tiny_encoders, tiny_run, tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "probe.json"
    rc = probe_main(
        [
            "--checkpoint",
            str(tiny_run),
            "--device",
            "cpu",
            "--out",
            str(out),
            "--limit_samples",
            "16",
            "--max_iter",
            "5",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "No space left on device" in err and str(out) in err, err
    assert not out.exists() and not list(tmp_path.glob(".probe.json.*"))


# --------------------------------------------------------------------------- metrics, grouping, figures


def test_macro_f1_averages_over_the_classes_present():
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2])  # class 9 of 10 absent from the split
    logits = torch.nn.functional.one_hot(labels, 10).float()  # a perfect prediction
    assert classification_metrics(logits, labels)["macro_f1"] == 1.0
    # one class-0 sample predicted as 1: F1 = 2 tp / (2 tp + fp + fn) per present class, by hand
    wrong = logits.clone()
    wrong[0] = torch.nn.functional.one_hot(torch.tensor(1), 10).float()
    f1_0 = 2 * 1 / (2 * 1 + 0 + 1)  # tp 1, fp 0, fn 1
    f1_1 = 2 * 2 / (2 * 2 + 1 + 0)  # tp 2, fp 1, fn 0
    expected = (f1_0 + f1_1 + 7 * 1.0) / 9
    assert classification_metrics(wrong, labels)["macro_f1"] == pytest.approx(expected, abs=1e-12)


def test_runs_differing_in_any_setting_but_the_seed_are_separate_rows(tmp_path):
    root = tmp_path / "runs"
    test = {"best_epoch": 0, "acc": 0.5, "macro_f1": 0.5, "mAP": 0.5, "acc_audio": 0.5, "acc_visual": 0.5}
    for name, config in {
        "cvpr_s0": {"modulation": "OGM_GE", "optimizer": "sgd", "alpha": 0.8, "seed": 0},
        "cvpr_s1": {"modulation": "OGM_GE", "optimizer": "sgd", "alpha": 0.8, "seed": 1, "device": "cuda"},
        "tpami_s0": {"modulation": "OGM_GE", "optimizer": "adamw", "alpha": 2.6, "seed": 0},
        "base_s0": {"modulation": "none", "seed": 0},
    }.items():
        write_run(root, name, config, test)
    result = write_report([root], tmp_path / "report", plots=False)
    groups = {g["label"]: g for g in result["summary"][0]["groups"]}
    assert set(groups) == {"none", "OGM_GE (alpha 0.8, optimizer sgd)", "OGM_GE (alpha 2.6, optimizer adamw)"}
    assert groups["OGM_GE (alpha 0.8, optimizer sgd)"]["seeds"] == [0, 1]  # the device does not define a run
    assert groups["OGM_GE (alpha 2.6, optimizer adamw)"]["seeds"] == [0]


def test_evaluate_scores_a_limited_run_on_its_own_samples(tiny_encoders, tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval_*", "probe.json"))
    result = write_report([run], tmp_path / "report", evaluate=True, device="cpu", plots=False)
    for folder in ("eval_test", "eval_test_zero_audio", "eval_test_zero_visual"):
        metrics = json.loads((run / folder / "metrics.json").read_text())
        assert metrics["samples"] == metrics["limit_samples"] == 64, folder
    assert any("first 64 samples" in note for note in result["notes"])


@pytest.mark.parametrize("where", ["a file", "a full disk"])
def test_a_report_that_cannot_be_written_is_one_line(fake_runs, tmp_path, capsys, monkeypatch, where):
    root, _ = fake_runs
    out = tmp_path / "report"
    if where == "a file":
        out.write_text("keep")
    else:

        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", full)
    rc = report_main([str(root), "--out", str(out), "--no_plots"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(out) in err, err
    if where == "a file":
        assert out.read_text() == "keep"
    else:
        assert not (out / "report.md").exists()


def test_seeds_logged_at_different_steps_still_draw_their_mean():
    from onthefly.analysis.plots import modulation_series

    # two seeds whose log steps share only step 1: the mean is taken on the interpolated series
    a = {"modulation/coeff_audio": (np.array([1, 21, 41, 61]), np.array([0.5, 0.5, 0.5, 0.5]))}
    b = {"modulation/coeff_audio": (np.array([1, 11, 31, 51]), np.array([0.7, 0.7, 0.7, 0.7]))}
    (entry,) = modulation_series({"OGM": [a, b]}, ["audio", "visual"])["coeff"]
    assert entry["steps"].tolist() == [1, 11, 21, 31, 41, 51] and entry["n"] == 2
    assert entry["mean"] == pytest.approx([0.6] * 6)


def test_the_accuracy_band_stays_within_0_and_100(monkeypatch, tmp_path):
    from onthefly.analysis import plots
    from onthefly.analysis.runs import Run

    bands = []
    import matplotlib.axes

    def recording(self, x, low, high, **kwargs):
        bands.append((np.asarray(low), np.asarray(high)))

    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", recording)
    # accuracies near 100% with a large spread over seeds: mean ± std leaves [0, 100]
    runs = [
        Run(tmp_path / f"s{s}", {"modality": "both"}, epochs=[{"epoch": 0, "val_acc": a, "val_acc_audio": a}])
        for s, a in enumerate((1.0, 0.6))
    ]
    plots.plot_validation_curves({"OGM": runs}, ["audio"], tmp_path / "curves.png")
    assert bands and all(low.min() >= 0 and high.max() <= 100 for low, high in bands)
    assert any(high.max() == 100 for _, high in bands)  # clipped, not dropped


def test_outputs_of_another_epoch_than_best_pt_are_left_out(tmp_path):
    """A run extended after its probe and evaluations: they scored the former best.pt."""
    root = tmp_path / "runs"
    test = {"best_epoch": 4, "acc": 0.5, "macro_f1": 0.5, "mAP": 0.5, "acc_audio": 0.5, "acc_visual": 0.5}
    run = write_run(
        root,
        "OGM_seed0",
        {"modulation": "OGM"},
        test,
        probe={"epoch": 1, "acc_audio": 0.9, "acc_visual": 0.9},
        zero={"audio": 0.3},
    )
    metrics = json.loads((run / "eval_test_zero_audio" / "metrics.json").read_text())
    (run / "eval_test_zero_audio" / "metrics.json").write_text(json.dumps({**metrics, "epoch": 1}))
    result = write_report([root], tmp_path / "report", plots=False)
    (group,) = result["summary"][0]["groups"]
    assert group["columns"]["probe_audio"] is None and group["columns"]["zero_audio"] is None
    assert any("probe.json, eval_test_zero_audio/ scored another epoch" in note for note in result["notes"])
