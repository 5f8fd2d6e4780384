"""One argparse parser, optional YAML defaults, per-dataset defaults, validation.

Precedence, highest first: command line > YAML file (--config) > the dataset's defaults >
GLOBAL_DEFAULTS. Options whose default depends on the dataset are declared with
default=None here and filled in by `resolve_config`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from .data import dataset_names, get_dataset_entry
from .data.avdigits import PRESETS as AVDIGITS_PRESETS
from .errors import UserError
from .models import FUSIONS, INITS
from .modulation import METHODS
from .modulation.ogm import OGM_FORMS, OGM_PARAMS
from .modulation.opm import OPM_GRADS

# Used when neither the command line, the YAML file nor the dataset sets a value.
GLOBAL_DEFAULTS: dict[str, Any] = {
    "optimizer": "sgd",
    "lr": 1e-3,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "scheduler": "step",
    "lr_step": 70,
    "lr_gamma": 0.1,
    "epochs": 100,
    "batch_size": 64,
    "alpha": 0.1,
    "q_base": 0.5,
    "lam": 0.5,
    "p_exe": 0.7,
    "modulation_starts": 0,
    "modulation_ends": 10**9,
    "warmup_epochs": 0,
    "num_frames": 3,
    "frame_crop": "fixed",
    "num_workers": 4,
}

# Settings a resumed run may not change: they define the model or the data it was trained on.
RUN_IDENTITY_KEYS = (
    "dataset", "data", "fusion", "modality", "modulation", "num_frames", "crop_size", "audio_frames",
    "image_downsample", "image_noise", "image_occlusion", "audio_noise", "audio_corrupt", "image_corrupt", "avdigits_preset", "data_seed", "seed",
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (exit 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def get_args_parser(prog: str = "train.py") -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Train an audio-visual classifier with on-the-fly modulation.")
    p.add_argument("--config", type=str, default=None, help="YAML file of option defaults (keys = option names)")
    p.add_argument("--print_config", action="store_true", help="print the resolved configuration as YAML and exit")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="avdigits", help=f"one of: {', '.join(dataset_names())}")
    g.add_argument("--data", default=None, help="dataset directory (a preprocessed cache; avdigits: its cache dir)")
    g.add_argument("--num_frames", type=int, default=None, help="frames per clip (dataset default)")
    g.add_argument("--num_workers", type=int, default=None, help="data loader processes (dataset default)")
    g.add_argument("--limit_samples", type=int, default=None, help="use only the first N samples of each split (smoke tests)")
    g.add_argument("--crop_size", type=int, default=None, help="frame crop side for preprocessed datasets (default: the cache's)")
    g.add_argument("--frame_crop", default=None, choices=("fixed", "official"), help="fixed: crop_size crops of the stored frame; official: CREMA-D's RandomResizedCrop / resize of the whole frame (dataset default)")
    g.add_argument("--preprocess", default=None,
                   help="expected preprocessing parameters, e.g. 'sample_rate=22050,hop_length=353': refuse a cache made otherwise")
    g.add_argument("--avdigits_preset", default=None, choices=tuple(AVDIGITS_PRESETS),
                   help="avdigits: degradation preset (complementary: fusion matters; easy: audio nearly perfect)")
    g.add_argument("--audio_frames", type=int, default=None, help="avdigits: MFCC frames per clip (pad / crop)")
    g.add_argument("--audio_noise", type=float, default=None, help="avdigits: Gaussian noise std on the standardised MFCCs (0 = off)")
    g.add_argument("--audio_corrupt", type=float, default=None, help="avdigits: fraction of clips whose audio is replaced by noise")
    g.add_argument("--image_corrupt", type=float, default=None, help="avdigits: fraction of images replaced by noise")
    g.add_argument("--image_downsample", type=int, default=None, help="avdigits: shrink images to this side (28 = off)")
    g.add_argument("--image_noise", type=float, default=None, help="avdigits: Gaussian pixel noise std on [0, 1] (0 = off)")
    g.add_argument("--image_occlusion", type=int, default=None, help="avdigits: side of a random noise square (0 = off)")
    g.add_argument("--data_seed", type=int, default=None, help="avdigits: seed of the split, pairing and degradation")

    g = p.add_argument_group("model")
    g.add_argument("--fusion", default="concat", help=f"one of: {', '.join(FUSIONS)}")
    g.add_argument("--init", default="official", choices=INITS,
                   help="official: Kaiming-normal convs, Xavier-normal linears (as the official code); torch: PyTorch defaults")
    g.add_argument("--modality", default="both", help="'both', or one modality's name to train it alone (unimodal reference)")

    g = p.add_argument_group("modulation")
    g.add_argument("--modulation", default="none", help=f"one of: {', '.join(METHODS)}")
    g.add_argument("--alpha", type=float, default=None, help="OGM strength alpha (dataset default)")
    g.add_argument("--ogm_form", default="official", choices=OGM_FORMS, help="k = 1 - tanh(alpha*rho) (official) or 1 - tanh(alpha*(rho-1))")
    g.add_argument("--ogm_params", default="conv", choices=OGM_PARAMS, help="scale conv weights' gradients (official) or all encoder parameters'")
    g.add_argument("--q_base", type=float, default=None, help="OPM base drop probability (dataset default)")
    g.add_argument("--lam", type=float, default=None, help="OPM: how fast the drop probability grows with the discrepancy")
    g.add_argument("--p_exe", type=float, default=None, help="OPM: probability that a batch is modulated at all")
    g.add_argument("--modulation_starts", type=int, default=None, help="first epoch (0-based, inclusive) with modulation")
    g.add_argument("--modulation_ends", type=int, default=None, help="last epoch (0-based, inclusive) with modulation")
    g.add_argument("--warmup_epochs", type=int, default=None, help="epochs of plain joint training before any modulation")
    g.add_argument("--opm_grad", default="clean", choices=OPM_GRADS, help="clean: no gradient through OPM's theta; official: as the released code (docs/fidelity.md)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default=None, choices=("sgd", "adamw"), help="dataset default")
    g.add_argument("--lr", type=float, default=None, help="dataset default")
    g.add_argument("--momentum", type=float, default=None)
    g.add_argument("--weight_decay", type=float, default=None)
    g.add_argument("--scheduler", default=None, choices=("step", "cosine", "none"))
    g.add_argument("--lr_step", type=int, default=None, help="StepLR period in epochs")
    g.add_argument("--lr_gamma", type=float, default=None, help="StepLR factor")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch_size", type=int, default=None, help="per process")

    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 autocast on CUDA, fp32 elsewhere")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True, help="channels_last memory format on CUDA")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower; exact reruns)")
    g.add_argument("--output_dir", default="checkpoints", help="runs are written to <output_dir>/<run_name>/")
    g.add_argument("--run_name", default=None, help="default: <dataset>_<modality or fusion>_<modulation>_seed<seed>")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an existing run directory")
    g.add_argument("--resume", default=None, help="a run's last.pt (or its directory) to continue exactly")
    g.add_argument("--log_every", type=int, default=20, help="read and log step statistics every N steps (the only host syncs)")
    g.add_argument("--nonfinite", default="stop", choices=("stop", "skip"), help="on a NaN/Inf loss or gradient: stop, or skip the batch")
    g.add_argument("--sync_bn", action="store_true", help="SyncBatchNorm under torchrun")
    g.add_argument("--eval_test", action=argparse.BooleanOptionalAction, default=True, help="evaluate best.pt on the test split at the end")
    return p


def _explicit_options(parser: ArgumentParser, argv: Sequence[str]) -> dict[str, Any]:
    """Only the options given on the command line (every default suppressed)."""
    quiet = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
                quiet._add_action(type(action)(action.option_strings, **kwargs))
                continue
            quiet.add_argument(*action.option_strings, type=action.type, **kwargs)
    known, _ = quiet.parse_known_args(argv)
    return vars(known)


def _load_yaml(path: str, parser: ArgumentParser) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--config: no such file: {file}")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config {file}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {file}: expected a mapping of option: value")
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"--config {file}: unknown option(s): {', '.join(unknown)}")
    return values


# Numeric options, checked for type first: a YAML file can give 8.5 for an integer option or
# a string for any. Floats must also be finite: NaN or infinity is never a valid setting.
FLOAT_OPTIONS = ("alpha", "q_base", "lam", "p_exe", "lr", "momentum", "weight_decay", "lr_gamma", "image_noise", "audio_noise", "audio_corrupt", "image_corrupt")
INT_OPTIONS = (
    "epochs", "batch_size", "num_frames", "num_workers", "limit_samples", "crop_size", "lr_step", "log_every", "seed",
    "modulation_starts", "modulation_ends", "warmup_epochs", "data_seed", "audio_frames", "image_downsample",
    "image_occlusion",
)


def _unset_or(cfg: argparse.Namespace, key: str, ok) -> bool:
    value = getattr(cfg, key, None)
    return value is None or ok(value)


def validate_config(cfg: argparse.Namespace) -> None:
    """Reject settings that cannot work, naming the option."""
    for key in INT_OPTIONS:
        value = getattr(cfg, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"--{key} must be an integer (got {value!r})")
    for key in FLOAT_OPTIONS:
        value = getattr(cfg, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"--{key} must be a number (got {value!r})")
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{key} must be a finite number (got {value})")
    checks = [
        (cfg.fusion in FUSIONS, f"--fusion: unknown fusion {cfg.fusion!r}; choose one of: {', '.join(FUSIONS)}"),
        (cfg.modulation in METHODS, f"--modulation: unknown {cfg.modulation!r}; choose one of: {', '.join(METHODS)}"),
        (cfg.alpha >= 0, f"--alpha must be >= 0 (got {cfg.alpha})"),
        (0 <= cfg.q_base <= 1, f"--q_base must be in [0, 1] (got {cfg.q_base})"),
        (0 <= cfg.p_exe <= 1, f"--p_exe must be in [0, 1] (got {cfg.p_exe})"),
        (cfg.lam >= 0, f"--lam must be >= 0 (got {cfg.lam})"),
        (cfg.modulation_starts <= cfg.modulation_ends,
         f"--modulation_starts ({cfg.modulation_starts}) must be <= --modulation_ends ({cfg.modulation_ends})"),
        (cfg.modulation_starts >= 0 and cfg.warmup_epochs >= 0, "--modulation_starts and --warmup_epochs must be >= 0"),
        (cfg.epochs > 0, f"--epochs must be > 0 (got {cfg.epochs})"),
        (cfg.batch_size > 0, f"--batch_size must be > 0 (got {cfg.batch_size})"),
        (cfg.lr > 0, f"--lr must be > 0 (got {cfg.lr})"),
        (cfg.weight_decay >= 0, f"--weight_decay must be >= 0 (got {cfg.weight_decay})"),
        (0 <= cfg.momentum < 1, f"--momentum must be in [0, 1) (got {cfg.momentum})"),
        (cfg.lr_step > 0, f"--lr_step must be > 0 (got {cfg.lr_step})"),
        (cfg.lr_gamma > 0, f"--lr_gamma must be > 0 (got {cfg.lr_gamma})"),
        (cfg.num_frames > 0, f"--num_frames must be > 0 (got {cfg.num_frames})"),
        (cfg.num_workers >= 0, f"--num_workers must be >= 0 (got {cfg.num_workers})"),
        (cfg.log_every > 0, f"--log_every must be > 0 (got {cfg.log_every})"),
        (cfg.limit_samples is None or cfg.limit_samples > 0, "--limit_samples must be > 0"),
        (0 <= cfg.seed < 2**31, f"--seed must be in [0, 2**31) (got {cfg.seed})"),
        (_unset_or(cfg, "data_seed", lambda v: 0 <= v < 2**31), f"--data_seed must be in [0, 2**31) (got {getattr(cfg, 'data_seed', None)})"),
        (_unset_or(cfg, "audio_frames", lambda v: v > 0), f"--audio_frames must be > 0 (got {getattr(cfg, 'audio_frames', None)})"),
        (_unset_or(cfg, "image_downsample", lambda v: 1 <= v <= 28),
         f"--image_downsample must be in [1, 28] (28 = off; got {getattr(cfg, 'image_downsample', None)})"),
        (_unset_or(cfg, "audio_corrupt", lambda v: 0 <= v <= 1), f"--audio_corrupt must be in [0, 1] (got {getattr(cfg, 'audio_corrupt', None)})"),
        (_unset_or(cfg, "image_corrupt", lambda v: 0 <= v <= 1), f"--image_corrupt must be in [0, 1] (got {getattr(cfg, 'image_corrupt', None)})"),
        (_unset_or(cfg, "audio_noise", lambda v: v >= 0), f"--audio_noise must be >= 0 (got {getattr(cfg, 'audio_noise', None)})"),
        (_unset_or(cfg, "image_noise", lambda v: v >= 0), f"--image_noise must be >= 0 (got {getattr(cfg, 'image_noise', None)})"),
        (_unset_or(cfg, "image_occlusion", lambda v: 0 <= v <= 28),
         f"--image_occlusion must be in [0, 28] (0 = off; got {getattr(cfg, 'image_occlusion', None)})"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if cfg.modality != "both" and cfg.modulation != "none":
        raise UserError(f"--modality {cfg.modality}: a unimodal reference run takes --modulation none")
    if cfg.data is not None and cfg.dataset != "avdigits" and not Path(cfg.data).is_dir():
        raise UserError(f"--data: no such directory: {cfg.data}")
    if cfg.data is not None and Path(cfg.data).exists() and not Path(cfg.data).is_dir():
        raise UserError(f"--data: not a directory: {cfg.data}")
    if cfg.output_dir is not None and Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise UserError(f"--output_dir: not a directory: {cfg.output_dir}")


def resolve_config(argv: Sequence[str] | None = None, parser: ArgumentParser | None = None) -> argparse.Namespace:
    """Parse argv and fill every option: CLI > YAML > dataset defaults > global defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = parser or get_args_parser()
    cfg = parser.parse_args(argv)
    if cfg.config:
        parser.set_defaults(**_load_yaml(cfg.config, parser))
        cfg = parser.parse_args(argv)
    cfg.explicit = sorted(_explicit_options(parser, argv))
    entry = get_dataset_entry(cfg.dataset)
    for key, value in {**GLOBAL_DEFAULTS, **entry.defaults}.items():
        if getattr(cfg, key, None) is None:
            setattr(cfg, key, value)
    validate_config(cfg)
    if cfg.run_name is None:
        what = cfg.fusion if cfg.modality == "both" else f"{cfg.modality}-only"
        cfg.run_name = f"{cfg.dataset}_{what}_{cfg.modulation}_seed{cfg.seed}"
    return cfg


def config_to_dict(cfg: argparse.Namespace) -> dict[str, Any]:
    """JSON-safe copy of the resolved config."""
    return json.loads(json.dumps(vars(cfg), default=str))


def format_config(cfg: argparse.Namespace) -> str:
    """The resolved options as YAML (sorted; usable again as a --config file)."""
    values = {k: v for k, v in config_to_dict(cfg).items() if k not in ("explicit", "print_config", "config")}
    return yaml.safe_dump(values, sort_keys=True, default_flow_style=False)
