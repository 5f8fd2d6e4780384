"""Every bad setting is refused before any work, in one line naming the option, exit status 2."""
from __future__ import annotations

import pytest

from onthefly import runner
from onthefly.config import resolve_config

BAD = [
    (["--alpha", "-0.1"], "--alpha must be >= 0"),
    (["--alpha", "nan"], "--alpha must be a finite number"),
    (["--lam", "-1"], "--lam must be >= 0"),
    (["--q_base", "1.5"], "--q_base must be in [0, 1]"),
    (["--q_base", "-0.1"], "--q_base must be in [0, 1]"),
    (["--p_exe", "2"], "--p_exe must be in [0, 1]"),
    (["--p_exe", "nan"], "--p_exe must be a finite number"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--weight_decay", "-0.001"], "--weight_decay must be >= 0"),
    (["--lr_step", "0"], "--lr_step must be > 0"),
    (["--lr_gamma", "0"], "--lr_gamma must be > 0"),
    (["--modulation_starts", "5", "--modulation_ends", "2"], "--modulation_starts (5) must be <= --modulation_ends (2)"),
    (["--modulation_starts", "-1"], "must be >= 0"),
    (["--warmup_epochs", "-1"], "must be >= 0"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--batch_size", "0"], "--batch_size must be > 0"),
    (["--batch_size", "-8"], "--batch_size must be > 0"),
    (["--num_frames", "0"], "--num_frames must be > 0"),
    (["--num_workers", "-1"], "--num_workers must be >= 0"),
    (["--log_every", "0"], "--log_every must be > 0"),
    (["--limit_samples", "0"], "--limit_samples must be > 0"),
    (["--seed", "-1"], "--seed must be in [0, 2**31)"),
    (["--data_seed", "-1"], "--data_seed must be in [0, 2**31)"),
    (["--audio_frames", "0"], "--audio_frames must be > 0"),
    (["--image_downsample", "0"], "--image_downsample must be in [1, 28]"),
    (["--image_downsample", "29"], "--image_downsample must be in [1, 28]"),
    (["--image_noise", "-0.5"], "--image_noise must be >= 0"),
    (["--image_occlusion", "29"], "--image_occlusion must be in [0, 28]"),
    (["--modality", "audio", "--modulation", "OGM"], "a unimodal reference run takes --modulation none"),
    (["--fusion", "bilinear"], "--fusion: unknown fusion 'bilinear'"),
    (["--modulation", "magic"], "--modulation: unknown 'magic'"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--config", "/nonexistent/c.yaml"], "--config: no such file: /nonexistent/c.yaml"),
    (["--resume", "/nonexistent/last.pt"], "checkpoint not found: /nonexistent/last.pt"),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--modality", "smell"], "--modality: avdigits has modalities audio, visual"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_setting_is_one_clear_line(tmp_path, capsys, args, message):
    rc = runner.main([*args, "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("what", ["data", "output_dir"])
def test_a_file_where_a_directory_belongs(tmp_path, capsys, what):
    path = tmp_path / "file"
    path.write_text("")
    rc = runner.main([f"--{what}", str(path)] + (["--output_dir", str(tmp_path / "out")] if what == "data" else []))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"--{what}: not a directory: {path}" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "yaml,message",
    [
        ("batch_size: 8.5\n", "--batch_size must be an integer (got 8.5)"),
        ("alpha: [0.1]\n", "--alpha must be a number (got [0.1])"),
        ("alpha: .nan\n", "--alpha must be a finite number"),
        ("epochs: true\n", "--epochs must be an integer (got True)"),
        ("q_base: 2\n", "--q_base must be in [0, 1] (got 2)"),
    ],
)
def test_bad_values_from_a_yaml_file(tmp_path, capsys, yaml, message):
    config = tmp_path / "c.yaml"
    config.write_text(yaml)
    assert runner.main(["--config", str(config), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("args", [["--alpha", "abc"], ["--epochs", "1.5"], ["--nonfinite", "ignore"]])
def test_an_unparsable_value_exits_2_in_one_line(capsys, args):
    with pytest.raises(SystemExit) as exit_:
        resolve_config(args)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and args[0] in err and len(err.splitlines()) == 1, err


def test_good_settings_pass():
    cfg = resolve_config(["--alpha", "0", "--q_base", "1", "--p_exe", "0", "--modulation_starts", "3",
                          "--modulation_ends", "3", "--image_downsample", "28", "--image_occlusion", "0"])
    assert (cfg.alpha, cfg.q_base, cfg.modulation_starts, cfg.modulation_ends) == (0.0, 1.0, 3, 3)
