"""Command line of code/preprocess.py (imports neither librosa nor OpenCV at load time)."""

from __future__ import annotations

import argparse
import math
import sys

from ...errors import UserError
from ..loaders import available_cpus
from . import LAYOUTS, get_layout
from .common import layout_modalities
from .pool import DEFAULT_CLIP_TIMEOUT

AUDIO_OPTS = ("sample_rate", "duration", "n_fft", "hop_length", "min_audio_seconds", "silence_threshold")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess.py",
        description="Turn a downloaded dataset into the compact cache that training reads "
        "(see docs/datasets.md for each dataset's layout, parameters and split).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", choices=LAYOUTS, help="required unless --verify")
    p.add_argument("--root", help="the downloaded dataset's folder (required unless --verify)")
    p.add_argument("--out", help="cache directory to write, e.g. data/cremad (required unless --verify)")
    p.add_argument(
        "--verify",
        metavar="DIR",
        default=None,
        help="check the finished cache in DIR in full (every array against its sha1, no NaN) and exit",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=available_cpus(),
        help="worker processes (0: run in this process) [the CPUs this process may use]",
    )
    g = p.add_argument_group("frames")
    g.add_argument("--fps", type=float, default=None, help="frames kept per second of video [1]")
    g.add_argument(
        "--short_side",
        type=int,
        default=None,
        help="stored frames are short_side high: centre squares short_side x short_side, or for cremad "
        "whole frames short_side x round(short_side * frame_aspect) [256]",
    )
    g.add_argument(
        "--frame_aspect",
        type=float,
        default=None,
        help="cremad: store whole frames short_side x round(short_side * this) (0: centre square) [4/3]",
    )
    g.add_argument("--crop_size", type=int, default=None, help="crop the loader takes from a stored frame [224]")
    g.add_argument(
        "--max_frames",
        type=int,
        default=None,
        help="at most this many frames per clip, evenly spread (0: all) [cremad/ucf101 0, "
        "kinetics_sounds/ave 10, vggsound 3]",
    )
    g.add_argument(
        "--flow_bound",
        type=float,
        default=None,
        help="ucf101, kinetics_sounds --with_flow: optical flow clipped to +-this many pixels before uint8 [20]",
    )
    g.add_argument(
        "--with_flow",
        action="store_true",
        help="kinetics_sounds: also store Farneback optical flow, a third modality 'flow' (as ucf101's)",
    )
    a = p.add_argument_group("audio (log-magnitude STFT)")
    a.add_argument("--sample_rate", type=int, default=None, help="[cremad 22050, others 16000]")
    a.add_argument(
        "--duration", type=float, default=None, help="seconds kept, shorter clips tiled [cremad 3, others 10]"
    )
    a.add_argument("--n_fft", type=int, default=None, help="[512]")
    a.add_argument("--hop_length", type=int, default=None, help="[cremad 353, others 853]")
    a.add_argument("--min_audio_seconds", type=float, default=None, help="shorter audio is skipped [0.1]")
    a.add_argument("--silence_threshold", type=float, default=None, help="audio with a lower peak is skipped [1e-4]")
    s = p.add_argument_group("splits")
    s.add_argument("--split", type=int, default=1, choices=(1, 2, 3), help="ucf101: official split")
    s.add_argument("--speaker_independent", action="store_true", help="cremad: actor-disjoint train/val/test")
    s.add_argument(
        "--random_split",
        action="store_true",
        help="cremad: seeded stratified split instead of the official lists (data/splits/cremad)",
    )
    s.add_argument("--val_fraction", type=float, default=0.1, help="val share where val is carved")
    s.add_argument("--test_fraction", type=float, default=0.1, help="test share where test is carved")
    s.add_argument("--seed", type=int, default=0, help="seed of carved splits")
    i = p.add_argument_group("input and run")
    i.add_argument("--csv", default=None, help="kinetics_sounds/vggsound: the list (id,label,split)")
    i.add_argument("--videos", default=None, help="kinetics_sounds/vggsound: folder searched for videos [--root]")
    i.add_argument("--keep_work", action="store_true", help="keep <out>/.work (per-clip results) after success")
    i.add_argument("--fresh", action="store_true", help="discard unfinished work in <out>/.work and start over")
    i.add_argument(
        "--clip_timeout",
        type=float,
        default=DEFAULT_CLIP_TIMEOUT,
        help="seconds one clip may take to decode in a worker before it is stopped and skipped "
        "(with --workers 0 nothing can stop it)",
    )
    i.add_argument("--quiet", action="store_true", help="no progress bar (the split notes are still shown)")
    return p


def _check_applicable(opts: argparse.Namespace, layout) -> None:
    given = lambda k: getattr(opts, k) is not None  # noqa: E731
    if "audio" not in layout.MODALITIES:
        bad = [k for k in AUDIO_OPTS if given(k)]
        if bad:
            raise UserError(f"--{bad[0]}: {layout.NAME} has no audio")
    if opts.with_flow and "flow" not in getattr(layout, "OPTIONAL_MODALITIES", ()):
        raise UserError(
            f"--with_flow: applies to kinetics_sounds only ({layout.NAME} has {', '.join(layout.MODALITIES)})"
        )
    if "flow" not in layout_modalities(layout, opts) and given("flow_bound"):
        hint = " (add --with_flow)" if "flow" in getattr(layout, "OPTIONAL_MODALITIES", ()) else ""
        raise UserError(f"--flow_bound: {layout.NAME} has no optical flow{hint}")
    if opts.speaker_independent and layout.NAME != "cremad":
        raise UserError("--speaker_independent applies to cremad only")
    if opts.random_split and layout.NAME != "cremad":
        raise UserError("--random_split applies to cremad only")
    if given("frame_aspect") and "frame_aspect" not in layout.DEFAULTS:
        raise UserError(f"--frame_aspect: {layout.NAME} stores centre squares only")
    if opts.split != 1 and layout.NAME != "ucf101":
        raise UserError("--split applies to ucf101 only")
    if (opts.csv or opts.videos) and layout.NAME not in ("kinetics_sounds", "vggsound"):
        raise UserError("--csv / --videos apply to kinetics_sounds and vggsound only")


def _verify(path: str) -> None:
    from ..cache.reader import verify_cache

    summary = verify_cache(path)
    print(
        f"{path}: verified ({summary['clips']} clips; {', '.join(summary['arrays'])}: content as written, "
        "no NaN or infinity)",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    missing = [f"--{k}" for k in ("dataset", "root", "out") if getattr(opts, k) is None]
    if opts.verify is None and missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if opts.verify is not None and len(missing) < 3:
        parser.error("--verify DIR checks a finished cache on its own: drop --dataset, --root and --out")
    try:
        if opts.verify is not None:
            _verify(opts.verify)
            return 0
        if not (math.isfinite(opts.clip_timeout) and opts.clip_timeout > 0):
            raise UserError(f"--clip_timeout must be a positive number of seconds (got {opts.clip_timeout:g})")
        layout = get_layout(opts.dataset)
        _check_applicable(opts, layout)
        from .pipeline import preprocess

        preprocess(layout, opts)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if opts.verify is not None:
            print(f"interrupted: {opts.verify} was not fully checked; run --verify again", file=sys.stderr)
        else:
            print("interrupted: rerun the same command to resume (finished clips are kept)", file=sys.stderr)
        return 130
    return 0
