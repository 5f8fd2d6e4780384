"""Every bad setting is refused before any work, in one line naming the option, exit status 2;
a YAML file's values are parsed as the same options on the command line; the modulation
settings have one source (ModulationConfig)."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from onthefly import infer, runner
from onthefly.config import RANGES, get_args_parser, resolve_config, resolved_defaults, schedule_warnings
from onthefly.errors import UserError
from onthefly.modulation import ModulationConfig, modulation_defaults

REPO = Path(__file__).resolve().parents[1]

BAD = [
    (["--alpha", "-0.1"], "--alpha must be >= 0"),
    (["--alpha", "nan"], "argument --alpha: must be a finite number"),
    (["--lam", "-1"], "--lam must be >= 0"),
    (["--q_base", "1.5"], "--q_base must be in [0, 1]"),
    (["--q_base", "-0.1"], "--q_base must be in [0, 1]"),
    (["--p_exe", "2"], "--p_exe must be in [0, 1]"),
    (["--p_exe", "nan"], "argument --p_exe: must be a finite number"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "inf"], "argument --lr: must be a finite number"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--weight_decay", "-0.001"], "--weight_decay must be >= 0"),
    (["--lr_step", "0"], "--lr_step must be > 0"),
    (["--lr_gamma", "0"], "--lr_gamma must be > 0"),
    (
        ["--modulation_starts", "5", "--modulation_ends", "2"],
        "--modulation_starts (5) must be <= --modulation_ends (2)",
    ),
    (["--modulation_starts", "-1"], "must be >= 0"),
    (["--warmup_epochs", "-1"], "must be >= 0"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--encoder_width", "0"], "--encoder_width must be >= 1"),
    (["--batch_size", "0"], "--batch_size must be >= 2"),
    (["--batch_size", "-8"], "--batch_size must be >= 2"),
    (["--batch_size", "1"], "--batch_size must be >= 2: BatchNorm needs at least 2 samples per batch"),
    (
        ["--warmup_epochs", "5", "--modulation_ends", "2"],
        "--warmup_epochs (5) must be <= --modulation_ends (2): modulation would never run",
    ),
    (["--crop_size", "-1"], "--crop_size must be > 0 (got -1)"),
    (["--preprocess", "garbage"], "--preprocess: only for preprocessed datasets; --dataset avdigits does not use it"),
    # AV-Digits has one frame per sample and no crop: these were once recorded in config.json and ignored
    (["--num_frames", "2"], "--num_frames: only for preprocessed datasets; --dataset avdigits does not use it"),
    (["--frame_crop", "official"], "--frame_crop: only for preprocessed datasets; --dataset avdigits does not use it"),
    (
        ["--dataset", "cremad", "--image_noise", "0.1"],
        "--image_noise: only for avdigits; --dataset cremad does not use it",
    ),
    (["--device", "mps"], "--device mps: not supported; use auto, cpu, cuda or cuda:N"),
    (["--device", "meta"], "--device meta: not supported"),
    (["--alpha", "abc"], "argument --alpha: invalid float value: 'abc'"),
    (["--epochs", "1.5"], "argument --epochs: invalid int value: '1.5'"),
    (["--nonfinite", "ignore"], "argument --nonfinite: invalid choice: 'ignore'"),
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
    (["--fusion", "bilinear"], "argument --fusion: invalid choice: 'bilinear'"),
    (["--modulation", "magic"], "argument --modulation: invalid choice: 'magic'"),
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
        ("batch_size: 8.5\n", "argument --batch_size: invalid int value: '8.5'"),
        ("alpha: [0.1]\n", "alpha: expected one value for --alpha (got [0.1])"),
        ("alpha: .nan\n", "argument --alpha: must be a finite number"),
        ("epochs: true\n", "epochs: expected one value for --epochs (got True)"),
        # each of these once trained with something else than the file said, or gave a traceback
        ("optimizer: adam\n", "argument --optimizer: invalid choice: 'adam'"),
        ("scheduler: linear\n", "argument --scheduler: invalid choice: 'linear'"),
        ("precision: fp16\n", "argument --precision: invalid choice: 'fp16'"),
        ("compile: 'false'\n", "compile: expected true or false (got 'false')"),
        ("deterministic: 'no'\n", "deterministic: expected true or false (got 'no')"),
        ("device: [cpu]\n", "device: expected one value for --device (got ['cpu'])"),
        ("ogm_form: foo\n", "argument --ogm_form: invalid choice: 'foo'"),
        ("config: other.yaml\n", "unknown option(s): config"),
    ],
)
def test_bad_values_from_a_yaml_file(tmp_path, capsys, yaml, message):
    config = tmp_path / "c.yaml"
    config.write_text(yaml)
    assert runner.main(["--config", str(config), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--config {config}: " in err and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_yaml_value_out_of_range_is_refused_like_the_option(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("q_base: 2\n")
    assert runner.main(["--config", str(config), "--output_dir", str(tmp_path / "out")]) == 2
    from_file = capsys.readouterr().err.strip()
    assert runner.main(["--q_base", "2", "--output_dir", str(tmp_path / "out")]) == 2
    assert from_file == capsys.readouterr().err.strip() == "train.py: error: --q_base must be in [0, 1] (got 2.0)"


def test_yaml_values_mean_what_the_same_options_mean_on_the_command_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "output_dir: 5\nlr: 1e-3\ncompile: no\neval_test: false\nchannels_last: false\n"
        "deterministic: yes\noptimizer: adamw\nscheduler: none\nalpha: null\n"
    )
    from_file = resolve_config(["--config", str(config)])
    from_cli = resolve_config(
        [
            "--output_dir",
            "5",
            "--lr",
            "1e-3",
            "--no-eval_test",
            "--no-channels_last",
            "--deterministic",
            "--optimizer",
            "adamw",
            "--scheduler",
            "none",
        ]
    )
    keys = (
        "output_dir",
        "lr",
        "compile",
        "eval_test",
        "channels_last",
        "deterministic",
        "optimizer",
        "scheduler",
        "alpha",
    )
    assert {k: getattr(from_file, k) for k in keys} == {k: getattr(from_cli, k) for k in keys}
    assert (from_file.output_dir, from_file.lr, from_file.compile, from_file.eval_test) == ("5", 1e-3, False, False)
    assert from_file.alpha == 0.5  # null leaves it unset: the dataset's default


def _bench_step(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_step", REPO / "bench" / "bench_step.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_step", module)  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["alpha", "q_base", "lam"])
def test_a_modulation_default_lives_in_one_place(tmp_path, monkeypatch, name):
    """Changing a default in ModulationConfig reaches the parser, the YAML path, the public
    defaults and the benchmark."""
    field = {f.name: f for f in dataclasses.fields(ModulationConfig)}[name]
    assert field.default != 0.37
    monkeypatch.setattr(field, "default", 0.37)
    assert getattr(get_args_parser().parse_args([]), name) == 0.37
    config = tmp_path / "c.yaml"
    config.write_text("dataset: ucf101\nmodulation: OGM_OPM\n")  # no dataset default for alpha, q_base, lam
    assert getattr(resolve_config(["--config", str(config)]), name) == 0.37
    assert resolved_defaults("ucf101")[name] == modulation_defaults()[name] == 0.37
    bench_args = _bench_step(monkeypatch).parse_args([])
    if name == "alpha":  # the benchmark's only modulation option
        assert bench_args.alpha == 0.37


def test_the_option_and_the_field_share_names():
    names = {f.name for f in dataclasses.fields(ModulationConfig)}
    cfg = resolve_config(["--modulation", "OGM_GE", "--q_base", "0.25", "--warmup_epochs", "2"])
    config = ModulationConfig(**{n: getattr(cfg, n) for n in names})
    assert (config.modulation, config.q_base, config.warmup_epochs) == ("OGM_GE", 0.25, 2)
    assert names <= {a.dest for a in get_args_parser()._actions}


@pytest.mark.parametrize(
    "module,forbidden",
    [
        ("infer.py", ("runner", "analysis")),
        ("analysis/probe.py", ("runner",)),
        ("modulation/modulator.py", ("runner", "engine", "config")),
    ],
)
def test_evaluation_does_not_import_training(module, forbidden):
    """Read the imports (lazy ones included) instead of importing: infer and the probes stand
    below the runner, and nothing below analysis imports it."""
    tree = ast.parse((REPO / "code" / "onthefly" / module).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported for bad in forbidden if bad in m.split(".")], imported


@pytest.mark.parametrize(
    "args,message",
    [
        (["--batch_size", "0"], "--batch_size must be > 0 (got 0)"),
        (["--num_workers", "-1"], "--num_workers must be >= 0 (got -1)"),
        (["--device", "mps"], "--device mps: not supported"),
    ],
)
def test_bad_inference_options_are_one_line(tmp_path, capsys, args, message):
    rc = infer.main(["--checkpoint", str(tmp_path / "none.pt"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err


def test_inference_out_naming_a_file_is_refused_and_the_file_kept(tmp_path, capsys):
    out = tmp_path / "results.txt"
    out.write_text("mine")
    rc = infer.main(["--checkpoint", str(tmp_path / "none.pt"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"--out: not a directory: {out}" in err and out.read_text() == "mine", err


def test_good_settings_pass():
    cfg = resolve_config(
        [
            "--alpha",
            "0",
            "--q_base",
            "1",
            "--p_exe",
            "0",
            "--modulation_starts",
            "3",
            "--modulation_ends",
            "3",
            "--image_downsample",
            "28",
            "--image_occlusion",
            "0",
        ]
    )
    assert (cfg.alpha, cfg.q_base, cfg.modulation_starts, cfg.modulation_ends) == (0.0, 1.0, 3, 3)


@pytest.mark.parametrize(
    "args,warning",
    [
        (
            ["--epochs", "4", "--scheduler", "step", "--lr_step", "20"],
            "--lr_step 20 is past the last epoch (3, 0-based) of --epochs 4",
        ),
        (
            ["--epochs", "4", "--scheduler", "none", "--modulation", "OGM", "--modulation_ends", "80"],
            "--modulation_ends 80 is past the last epoch (3) of --epochs 4",
        ),
        (
            ["--epochs", "1", "--scheduler", "none", "--modulation", "OGM", "--modulation_starts", "5"],
            "--modulation OGM: its window starts at epoch 5, past the last epoch (0) of --epochs 1: this "
            "run is the baseline",
        ),
        (
            ["--epochs", "3", "--scheduler", "cosine", "--modulation", "OPM", "--warmup_epochs", "6"],
            "its window starts at epoch 6",
        ),
    ],
)
def test_settings_that_do_nothing_within_the_epochs_are_warned_in_one_line(
    tmp_path, capsys, monkeypatch, args, warning
):
    def stop(cfg):
        raise UserError("stopped before the run folder")

    monkeypatch.setattr(runner, "prepare_run_dir", stop)
    assert runner.main([*args, "--output_dir", str(tmp_path)]) == 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and warning in warnings[0], warnings


def test_a_run_within_its_epochs_gets_no_warning():
    cfg = resolve_config(["--epochs", "100", "--lr_step", "70", "--modulation", "OGM", "--modulation_ends", "50"])
    assert schedule_warnings(cfg) == []


def test_each_range_is_written_once_and_checked():
    """Every RANGES entry is an option of the parser, and a value outside it is refused naming it."""
    options = {a.dest for a in get_args_parser()._actions}
    assert set(RANGES) <= options
    source = (REPO / "code" / "onthefly" / "config.py").read_text()
    for name in RANGES:
        assert source.count(f'"{name}": (lambda') == 1, name
