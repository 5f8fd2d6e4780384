"""End to end: train.py on a tiny AV-Digits subset, exact resume, inference, CLI errors."""

import csv
import json
from pathlib import Path

import pytest
import torch

from onthefly import infer, runner

# Quarter-width ResNet18 encoders (the layout is ResNet18's, tests/test_core_models.py): resuming,
# outputs and inference do not depend on the width, and full width costs about 6x per epoch.
TINY = ["--limit_samples", "96", "--batch_size", "32", "--device", "cpu", "--deterministic", "--log_every", "1"]
TINY += ["--encoder_width", "16"]


def train(tmp_path: Path, *args: str) -> int:
    return runner.main([*TINY, "--output_dir", str(tmp_path), "--run_name", "run", *args])


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    # A step schedule does not depend on --epochs, so "1 epoch, then resume to 2" is the same run.
    # OGM_GE_OPM draws both random streams that resuming must restore: OGM-GE's gradient
    # noise and OPM's feature drops.
    common = ("--modulation", "OGM_GE_OPM", "--scheduler", "step", "--lr_step", "1", "--no-eval_test")
    assert train(tmp_path / "full", *common, "--epochs", "2") == 0
    assert train(tmp_path / "split", *common, "--epochs", "1") == 0
    last = tmp_path / "split" / "run" / "last.pt"
    assert runner.main(["--resume", str(last), "--epochs", "2", "--no-eval_test"]) == 0
    full, resumed = weights(tmp_path / "full" / "run" / "last.pt"), weights(last)
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    lines = (tmp_path / "split" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]


def test_run_outputs_and_inference(tmp_path):
    assert train(tmp_path, "--modulation", "OGM", "--epochs", "2") == 0
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "test_metrics.json"):
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    config = json.loads((run / "config.json").read_text())
    assert config["modulation"] == "OGM" and config["dataset"] == "avdigits" and config["alpha"] == 0.5
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # best.pt is the epoch with the best *validation* accuracy
    assert best["epoch"] - 1 == max(epochs, key=lambda r: r["val_acc"])["epoch"]
    assert best["config"]["fusion"] == "concat" and best["dataset_info"]["num_classes"] == 10
    for key in ("train_loss", "val_acc", "val_macro_f1", "val_mAP", "val_acc_audio", "val_acc_visual"):
        assert key in epochs[0]

    assert (
        infer.main(["--checkpoint", str(run), "--split", "val", "--device", "cpu", "--out", str(tmp_path / "eval")])
        == 0
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "eval" / "predictions.csv")))
    assert metrics["samples"] == len(rows) == 300
    accuracy = sum(r["label"] == r["pred"] for r in rows) / len(rows)
    assert metrics["acc"] == pytest.approx(accuracy)
    assert set(rows[0]) == {"index", "clip_id", "label", "pred", "confidence", "pred_audio", "pred_visual"}


def test_unimodal_reference_run(tmp_path):
    assert train(tmp_path, "--modality", "visual", "--epochs", "1", "--no-eval_test") == 0
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert "val_acc_visual" in line and "val_acc_audio" not in line


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--no_such_option"], "unrecognized arguments: --no_such_option"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--fusion", "bilinear"], "--fusion"),
        (["--modulation", "magic"], "--modulation"),
        (["--alpha", "-1"], "--alpha"),
        (["--resume", "/nonexistent/last.pt"], "/nonexistent/last.pt"),
    ],
)
def test_bad_input_is_one_clear_line(run_script, args, needle):
    status, err = run_script("train.py", *args)
    assert status == 2
    assert needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_inference_rejects_a_foreign_checkpoint(run_script, tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    status, err = run_script("inference.py", "--checkpoint", str(foreign))
    assert status == 2 and str(foreign) in err and "Traceback" not in err


def test_yaml_config_sets_defaults_and_cli_wins(tmp_path):
    from onthefly.config import resolve_config

    yml = tmp_path / "c.yaml"
    yml.write_text("fusion: sum\nalpha: 0.3\nepochs: 7\n")
    cfg = resolve_config(["--config", str(yml), "--alpha", "0.9"])
    assert (cfg.fusion, cfg.alpha, cfg.epochs) == ("sum", 0.9, 7)
    assert cfg.lr == 0.01  # AV-Digits default, untouched by the file
    yml.write_text("fuson: sum\n")
    from onthefly.errors import UserError

    with pytest.raises(UserError, match="fuson"):
        resolve_config(["--config", str(yml)])


def test_a_narrow_run_is_rebuilt_at_its_width_for_inference(tmp_path):
    assert train(tmp_path, "--encoder_width", "8", "--epochs", "1") == 0
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["encoder_width"] == 8
    model, *_ = infer.load_trained_model(run, torch.device("cpu"))
    assert model.head.fc.in_features == 2 * 64  # concat of two 8 x 8 = 64-d features
    out = str(tmp_path / "e")
    assert infer.main(["--checkpoint", str(run), "--split", "val", "--device", "cpu", "--out", out]) == 0
