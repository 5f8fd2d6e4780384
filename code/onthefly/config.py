"""One argparse parser, optional YAML defaults, per-dataset defaults, validation.

Precedence, highest first: command line > YAML file (--config) > the dataset's defaults >
the parser's defaults. A YAML value is turned into the same option on a command line and
parsed by the same parser, so it meets exactly the same types, choices and checks. The
modulation options are generated from `ModulationConfig`, which owns their defaults and ranges.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from .data import dataset_names, get_dataset_entry
from .data.avdigits import PRESETS as AVDIGITS_PRESETS
from .data.cache.format import FRAME_CROPS, FRAME_PICKS
from .errors import UserError
from .models import FUSIONS, INITS
from .modulation import ModulationConfig
from .yamlio import load_yaml

# Settings a resumed run may not change: they define the model or the data it was trained on
# (limit_samples, batch_size, drop_last: which samples, and in which batches; best.pt is chosen
# on the validation split they define; frame_crop, frame_pick: which pixels), or (optimizer)
# the kind of optimiser state the checkpoint holds.
RUN_IDENTITY_KEYS = (
    "dataset",
    "data",
    "fusion",
    "modality",
    "modulation",
    "num_frames",
    "crop_size",
    "audio_frames",
    "image_downsample",
    "image_noise",
    "image_occlusion",
    "audio_noise",
    "audio_corrupt",
    "image_corrupt",
    "avdigits_preset",
    "avdigits_modalities",
    "scan_noise",
    "scan_corrupt",
    "data_seed",
    "seed",
    "optimizer",
    "limit_samples",
    "batch_size",
    "drop_last",
    "frame_crop",
    "frame_pick",
    "encoder_width",
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad option as a UserError (one line, exit 2 from the entry
    point) instead of usage + error, so a YAML file's values can be parsed by it too."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see --help)")


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite (never a valid setting here)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
    return value


_FIELD_TYPES = {"float": finite_float, "int": int, "str": str}


def _add_modulation_options(group) -> None:
    """One option per ModulationConfig field, with its name, default, type and choices."""
    for f in fields(ModulationConfig):
        choices = f.metadata["choices"]
        group.add_argument(
            f"--{f.name}",
            type=_FIELD_TYPES[f.type],
            default=f.default,
            choices=choices,
            help=f.metadata["help"] + (f" ({', '.join(choices)})" if choices else ""),
        )


def get_args_parser(prog: str = "train.py") -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Train an audio-visual classifier with on-the-fly modulation.")
    p.add_argument("--config", type=str, default=None, help="YAML file of option defaults (keys = option names)")
    p.add_argument("--print_config", action="store_true", help="print the resolved configuration as YAML and exit")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="avdigits", help=f"one of: {', '.join(dataset_names())}")
    g.add_argument("--data", default=None, help="dataset directory (a preprocessed cache; avdigits: its cache dir)")
    g.add_argument("--num_frames", type=int, default=3, help="preprocessed datasets: frames per clip (dataset default)")
    g.add_argument("--num_workers", type=int, default=4, help="data loader processes (dataset default)")
    g.add_argument(
        "--limit_samples", type=int, default=None, help="use only the first N samples of each split (smoke tests)"
    )
    g.add_argument(
        "--crop_size", type=int, default=None, help="preprocessed datasets: frame crop side (default: the cache's)"
    )
    g.add_argument(
        "--frame_crop",
        default="fixed",
        choices=FRAME_CROPS,
        help="preprocessed datasets: fixed: crop_size crops of the stored frame; official: the dataset's official crop "
        "(CREMA-D, Kinetics-Sounds: see docs/fidelity.md)",
    )
    g.add_argument(
        "--frame_pick",
        default="spread",
        choices=FRAME_PICKS,
        help="spread: random frames in training, evenly spread in evaluation; official: the dataset's "
        "official frames (CREMA-D the first, Kinetics-Sounds first/middle/last) in both",
    )
    g.add_argument(
        "--drop_last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="drop the last incomplete training batch of each epoch (the official loaders keep it)",
    )
    g.add_argument(
        "--preprocess",
        default=None,
        help="preprocessed datasets: expected preprocessing parameters, e.g. 'sample_rate=22050,hop_length=353': "
        "refuse a cache made otherwise",
    )
    g.add_argument(
        "--avdigits_preset",
        default=None,
        choices=tuple(AVDIGITS_PRESETS),
        help="avdigits: degradation preset (complementary: fusion matters; easy: audio nearly perfect)",
    )
    g.add_argument(
        "--avdigits_modalities",
        default=None,
        help="avdigits: comma-separated modalities out of audio,visual,scan (scan: sklearn's 8x8 digits) "
        "[audio,visual]",
    )
    g.add_argument("--audio_frames", type=int, default=None, help="avdigits: MFCC frames per clip (pad / crop)")
    g.add_argument(
        "--audio_noise",
        type=finite_float,
        default=None,
        help="avdigits: Gaussian noise std on the standardised MFCCs (0 = off)",
    )
    g.add_argument(
        "--audio_corrupt",
        type=finite_float,
        default=None,
        help="avdigits: fraction of clips whose audio is replaced by noise",
    )
    g.add_argument(
        "--image_corrupt", type=finite_float, default=None, help="avdigits: fraction of images replaced by noise"
    )
    g.add_argument("--image_downsample", type=int, default=None, help="avdigits: shrink images to this side (28 = off)")
    g.add_argument(
        "--image_noise", type=finite_float, default=None, help="avdigits: Gaussian pixel noise std on [0, 1] (0 = off)"
    )
    g.add_argument(
        "--image_occlusion", type=int, default=None, help="avdigits: side of a random noise square (0 = off)"
    )
    g.add_argument("--scan_noise", type=finite_float, default=None, help="avdigits scans: Gaussian noise std on [0, 1]")
    g.add_argument("--scan_corrupt", type=finite_float, default=None, help="avdigits scans: fraction replaced by noise")
    g.add_argument("--data_seed", type=int, default=None, help="avdigits: seed of the split, pairing and degradation")

    g = p.add_argument_group("model")
    g.add_argument("--fusion", default="concat", choices=FUSIONS)
    g.add_argument(
        "--init",
        default="official",
        choices=INITS,
        help="official: Kaiming-normal convs, Xavier-normal linears (as the official code); torch: PyTorch defaults",
    )
    g.add_argument(
        "--encoder_width",
        type=int,
        default=64,
        help="first-stage channels of each ResNet18 encoder (64: ResNet18; 16: a quarter-width "
        "ResNet18, the CPU benchmark's)",
    )
    g.add_argument(
        "--modality", default="both", help="'both', or one modality's name to train it alone (unimodal reference)"
    )

    _add_modulation_options(p.add_argument_group("modulation (alpha: dataset default)"))

    g = p.add_argument_group("optimisation (dataset defaults)")
    g.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    g.add_argument("--lr", type=finite_float, default=1e-3)
    g.add_argument("--momentum", type=finite_float, default=0.9)
    g.add_argument("--weight_decay", type=finite_float, default=1e-4)
    g.add_argument("--scheduler", default="step", choices=("step", "cosine", "none"))
    g.add_argument("--lr_step", type=int, default=70, help="StepLR period in epochs")
    g.add_argument("--lr_gamma", type=finite_float, default=0.1, help="StepLR factor")
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--batch_size", type=int, default=64, help="per process")

    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    g.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="auto: bf16 autocast on CUDA, fp32 elsewhere",
    )
    g.add_argument(
        "--channels_last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels_last memory format on CUDA",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower; exact reruns)")
    g.add_argument("--output_dir", default="checkpoints", help="runs are written to <output_dir>/<run_name>/")
    g.add_argument("--run_name", default=None, help="default: <dataset>_<modality or fusion>_<modulation>_seed<seed>")
    g.add_argument("--overwrite", action="store_true", help="start afresh in a folder holding an earlier run's files")
    g.add_argument(
        "--resume", default=None, help="a run's last.pt (or its folder) to continue exactly, in its own folder"
    )
    g.add_argument(
        "--log_every",
        type=int,
        default=20,
        help="every N steps, read the step statistics for TensorBoard and the progress bar's epoch loss "
        "(the only host syncs)",
    )
    g.add_argument(
        "--nonfinite",
        default="stop",
        choices=("stop", "skip"),
        help="on a NaN/Inf loss or gradient: stop, or skip the batch",
    )
    g.add_argument("--sync_bn", action="store_true", help="SyncBatchNorm under torchrun")
    g.add_argument(
        "--eval_test",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate best.pt on the test split at the end",
    )
    return p


_FLAGS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)


def _explicit_options(parser: ArgumentParser, argv: Sequence[str]) -> dict[str, Any]:
    """Only the options given on the command line (every default suppressed)."""
    quiet = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if isinstance(action, _FLAGS):
                quiet._add_action(type(action)(action.option_strings, **kwargs))
                continue
            quiet.add_argument(*action.option_strings, type=action.type, **kwargs)
    known, _ = quiet.parse_known_args(argv)
    return vars(known)


def _load_yaml(file: Path, actions: dict[str, argparse.Action]) -> dict[str, Any]:
    if not file.is_file():
        raise UserError(f"--config: no such file: {file}")
    try:
        values = load_yaml(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config {file}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {file}: expected a mapping of option: value")
    unknown = sorted(str(k) for k in values if k not in actions)
    if unknown:
        raise UserError(f"--config {file}: unknown option(s): {', '.join(unknown)}")
    return values


def _as_tokens(action: argparse.Action, key: str, value: Any, file: Path) -> list[str]:
    """The command-line tokens that give `value` to `action` (a YAML bool only for a flag)."""
    if isinstance(action, _FLAGS):
        if not isinstance(value, bool):
            raise UserError(f"--config {file}: {key}: expected true or false (got {value!r})")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [action.option_strings[0] if value else action.option_strings[1]]
        return [action.option_strings[0]] if value != action.default else []
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(f"--config {file}: {key}: expected one value for {action.option_strings[0]} (got {value!r})")
    return [f"{action.option_strings[0]}={value}"]


def _yaml_options(path: str, parser: ArgumentParser) -> dict[str, Any]:
    """The options a YAML file sets, parsed by `parser` exactly as on the command line
    (null leaves an option unset)."""
    file = Path(path)
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    values = {k: v for k, v in _load_yaml(file, actions).items() if v is not None}
    tokens = [t for key, value in values.items() for t in _as_tokens(actions[key], key, value, file)]
    try:
        parsed = parser.parse_args(tokens)
    except UserError as e:
        raise UserError(f"--config {file}: {e}") from None
    return {key: getattr(parsed, key) for key in values}


# Ranges of the options, each written once: name -> (test, what the test requires). An unset
# option (None: the dataset's value applies) passes. The modulation options are
# ModulationConfig's.
RANGES: dict[str, tuple[Any, str]] = {
    "epochs": (lambda v: v > 0, "> 0"),
    "encoder_width": (lambda v: v >= 1, ">= 1"),
    "batch_size": (lambda v: v >= 2, ">= 2: BatchNorm needs at least 2 samples per batch in training"),
    "lr": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lr_step": (lambda v: v > 0, "> 0"),
    "lr_gamma": (lambda v: v > 0, "> 0"),
    "num_frames": (lambda v: v > 0, "> 0"),
    "num_workers": (lambda v: v >= 0, ">= 0"),
    "log_every": (lambda v: v > 0, "> 0"),
    "limit_samples": (lambda v: v > 0, "> 0"),
    "seed": (lambda v: 0 <= v < 2**31, "in [0, 2**31)"),
    "crop_size": (lambda v: v > 0, "> 0"),
    "data_seed": (lambda v: 0 <= v < 2**31, "in [0, 2**31)"),
    "audio_frames": (lambda v: v > 0, "> 0"),
    "image_downsample": (lambda v: 1 <= v <= 28, "in [1, 28] (28 = off)"),
    "audio_corrupt": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "image_corrupt": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "audio_noise": (lambda v: v >= 0, ">= 0"),
    "image_noise": (lambda v: v >= 0, ">= 0"),
    "image_occlusion": (lambda v: 0 <= v <= 28, "in [0, 28] (0 = off)"),
    "scan_noise": (lambda v: v >= 0, ">= 0"),
    "scan_corrupt": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}


def check_ranges(cfg: argparse.Namespace) -> str | None:
    """The first option outside its RANGES entry, as one line, or None."""
    for name, (ok, need) in RANGES.items():
        value = getattr(cfg, name, None)
        if value is not None and not ok(value):
            return f"--{name} must be {need} (got {value})"
    return None


# Options only one kind of dataset reads: given for another, they would be silently ignored.
_DATASET_SPECIFIC = {
    "avdigits": (
        "avdigits_preset",
        "avdigits_modalities",
        "scan_noise",
        "scan_corrupt",
        "audio_frames",
        "audio_noise",
        "audio_corrupt",
        "image_corrupt",
        "image_downsample",
        "image_noise",
        "image_occlusion",
        "data_seed",
    ),
    "preprocessed datasets": ("crop_size", "preprocess", "frame_pick", "num_frames", "frame_crop"),
}


def _dataset_kind(dataset: str) -> str:
    return "avdigits" if dataset == "avdigits" else "preprocessed datasets"


def validate_config(cfg: argparse.Namespace, given: Iterable[str] = ()) -> None:
    """Reject settings that cannot work, naming the option. `given`: the options the user set
    (command line or YAML), checked against what the dataset reads."""
    problem = check_ranges(cfg)
    if problem:
        raise UserError(problem)
    problem = ModulationConfig.check({f.name: getattr(cfg, f.name) for f in fields(ModulationConfig)}, prefix="--")
    if problem:
        raise UserError(problem)
    if cfg.modality != "both" and cfg.modulation != "none":
        raise UserError(f"--modality {cfg.modality}: a unimodal reference run takes --modulation none")
    for kind, options in _DATASET_SPECIFIC.items():
        unused = [f"--{k}" for k in options if k in given and kind != _dataset_kind(cfg.dataset)]
        if unused:
            raise UserError(f"{', '.join(unused)}: only for {kind}; --dataset {cfg.dataset} does not use it, remove it")
    if cfg.data is not None and cfg.dataset != "avdigits" and not Path(cfg.data).is_dir():
        raise UserError(f"--data: no such directory: {cfg.data}")
    if cfg.data is not None and Path(cfg.data).exists() and not Path(cfg.data).is_dir():
        raise UserError(f"--data: not a directory: {cfg.data}")
    if cfg.output_dir is not None and Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise UserError(f"--output_dir: not a directory: {cfg.output_dir}")


def resolve_config(argv: Sequence[str] | None = None, parser: ArgumentParser | None = None) -> argparse.Namespace:
    """Parse argv and fill every option: CLI > YAML > dataset defaults > the parser's defaults.

    `cfg.explicit` lists the options given on the command line or in the --config file: what
    a resumed run takes instead of its saved settings (rundir.merge_resume_config)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = parser or get_args_parser()
    cfg = parser.parse_args(argv)
    explicit = sorted(_explicit_options(parser, argv))
    given = set(explicit)
    if cfg.config:
        from_file = _yaml_options(cfg.config, parser)
        parser.set_defaults(**from_file)
        cfg = parser.parse_args(argv)
        given |= set(from_file)
        explicit = sorted(given)
    for key, value in get_dataset_entry(cfg.dataset).defaults.items():
        if key not in given:
            setattr(cfg, key, value)
    cfg.explicit = explicit
    validate_config(cfg, given)
    if cfg.run_name is None:
        what = cfg.fusion if cfg.modality == "both" else f"{cfg.modality}-only"
        cfg.run_name = f"{cfg.dataset}_{what}_{cfg.modulation}_seed{cfg.seed}"
    return cfg


def schedule_warnings(cfg: argparse.Namespace) -> list[str]:
    """Settings that do nothing within this run's --epochs (e.g. a recipe shortened for a smoke
    test), one line each. A modulation window that starts after the last epoch is among them:
    such a run trains exactly as --modulation none, under the method's name."""
    last = cfg.epochs - 1  # epochs are 0-based, as in metrics.jsonl
    notes = []
    if cfg.scheduler == "step" and cfg.lr_step > last:
        notes.append(
            f"--lr_step {cfg.lr_step} is past the last epoch ({last}, 0-based) of --epochs {cfg.epochs}: "
            "the learning rate never decays"
        )
    if cfg.modulation != "none":
        first = max(cfg.modulation_starts, cfg.warmup_epochs)
        if first > last:
            notes.append(
                f"--modulation {cfg.modulation}: its window starts at epoch {first}, past the last epoch "
                f"({last}) of --epochs {cfg.epochs}: this run is the baseline (none) under "
                f"{cfg.modulation}'s name"
            )
        elif last < cfg.modulation_ends < ModulationConfig.modulation_ends:  # the default: never ends
            notes.append(
                f"--modulation_ends {cfg.modulation_ends} is past the last epoch ({last}) of --epochs "
                f"{cfg.epochs}: modulation runs to the end of this run"
            )
    return notes


def resolved_defaults(dataset: str = "avdigits") -> dict[str, Any]:
    """Every training option's value in a run of `dataset` given no other option: the parser's
    defaults (the modulation's from ModulationConfig) under the dataset's own."""
    values = config_to_dict(resolve_config(["--dataset", dataset]))
    del values["explicit"]
    return values


def config_to_dict(cfg: argparse.Namespace) -> dict[str, Any]:
    """JSON-safe copy of the resolved config."""
    return json.loads(json.dumps(vars(cfg), default=str))


def format_config(cfg: argparse.Namespace) -> str:
    """The resolved options as YAML (sorted; usable again as a --config file)."""
    values = {k: v for k, v in config_to_dict(cfg).items() if k not in ("explicit", "print_config", "config")}
    return yaml.safe_dump(values, sort_keys=True, default_flow_style=False)
