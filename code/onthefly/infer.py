"""Evaluate a checkpoint on a split: a metrics table, metrics.json and per-sample predictions.csv.

The split evaluated must be the one the run was trained with: a checkpoint records what
identifies each split's samples, and a cache split differently since is refused. A checkpoint
whose weights are not finite is refused too (no metric of it would mean anything).

metrics.json's `epoch` is the checkpoint's last completed epoch, counted from 0 as in the run's
metrics.jsonl and test_metrics.json (`best_epoch`).

Missing-modality evaluation (--zero_modality m): "modality m is missing" means: the tensor fed
to m's encoder is all zeros. The zeroing is
applied *after* the device preset, i.e. to the normalised input the encoder sees, so for
frames it stands for the per-channel dataset-mean image (mean imputation), and for
AV-Digits' MFCCs (standardised per coefficient) the mean coefficients -- the same value the
dataset already uses for padding frames. Zeroing the raw uint8 frames instead would feed a
black image, far outside the training distribution after normalisation.

This is not the same as zeroing the encoder's *feature*: in eval mode BatchNorm and biases
still turn a zero input into a non-zero feature, and the fusion head sees that feature.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from .config import ArgumentParser
from .data import DatasetInfo, get_dataset_entry
from .data.loaders import eval_loader
from .data.presets import DevicePreset
from .engine import predict
from .errors import UserError
from .metrics import classification_metrics
from .models import build_model
from .models.encoders import RESNET18_WIDTH
from .utils import autocast_dtype, print_table, select_device


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(prog="inference.py", description="Evaluate a trained checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a run's best.pt / last.pt, or the run directory (uses best.pt)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--data", default=None, help="dataset directory, if it moved since training")
    p.add_argument("--out", default=None, help="output directory (default: <run dir>/eval_<split>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--num_workers", type=int, default=None)
    p.add_argument(
        "--limit_samples",
        type=int,
        default=None,
        help="evaluate only the first N samples of the split (default: all of them)",
    )
    p.add_argument(
        "--zero_modality",
        default=None,
        metavar="NAME",
        help="missing-modality test: feed zeros to NAME's encoder (its normalised input; see infer.py); "
        "default output: <run dir>/eval_<split>_zero_<NAME>",
    )
    return p


class ZeroModality:
    """Wraps a device preset: the batch is prepared as usual, then `name`'s tensor is zeroed."""

    def __init__(self, preset: Callable, name: str):
        self.preset = preset
        self.name = name

    def __call__(self, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs, labels = self.preset(batch)
        if self.name not in inputs:
            raise KeyError(f"cannot zero modality {self.name!r}: the batch has {sorted(inputs)}")
        inputs = dict(inputs)
        inputs[self.name] = torch.zeros_like(inputs[self.name])
        return inputs, labels


def load_trained_model(checkpoint: str | Path, device: torch.device, **overrides) -> tuple:
    """Rebuild a run's model from its checkpoint (a .pt, or a run directory: its best.pt).

    `overrides` (data, batch_size, num_workers, limit_samples) replace the run's settings
    when not None. Returns (model, cfg, info, dataset entry, checkpoint dict).
    """
    path = Path(checkpoint)
    ckpt = ckpt_io.load_checkpoint(path / "best.pt" if path.is_dir() else path)
    if not all(t.isfinite().all() for t in ckpt["model"].values() if t.is_floating_point()):
        raise UserError(
            f"checkpoint {ckpt['path']} holds non-finite weights (NaN or Inf): nothing it predicts means anything"
        )
    cfg = argparse.Namespace(**ckpt["config"])
    cfg.limit_samples = None
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    info = DatasetInfo.from_dict(ckpt["dataset_info"])
    entry = get_dataset_entry(info.name)
    current = entry.info(cfg)
    if (current.class_names, current.modalities) != (info.class_names, info.modalities):
        raise UserError(
            f"checkpoint {ckpt['path']} was trained on a different {info.name} dataset than the one at --data"
        )
    width = getattr(cfg, "encoder_width", RESNET18_WIDTH)  # checkpoints from before the option: ResNet18
    model = build_model(info, cfg.fusion, cfg.modality, width=width).to(device)
    ckpt_io.load_model_state(model, ckpt["model"], ckpt["path"])
    return model, cfg, info, entry, ckpt


def check_split(ckpt: dict, split: str, dataset) -> None:
    """Refuse a split whose samples differ from those the run had under that name: the cache
    was split again (e.g. preprocessed with other fractions), so "test" may hold training clips."""
    recorded = (ckpt.get("splits") or {}).get(split)
    if recorded is None:  # a checkpoint from before splits were recorded: nothing to compare
        return
    if ckpt_io.split_fingerprint(dataset, recorded["count"]) != recorded:
        raise UserError(
            f"--split {split}: the data at --data is split differently from when {ckpt['path']} was trained; "
            "its metrics would not be on held-out samples. Evaluate on the cache the run was trained on"
        )


def build_checked_split(entry, cfg: argparse.Namespace, ckpt: dict, split: str):
    """`entry.build(cfg, split)`, after `check_split`. With fewer samples than the checkpoint
    recorded (--limit_samples), the recorded ones are checked on a second, longer build."""
    dataset = entry.build(cfg, split)
    recorded = (ckpt.get("splits") or {}).get(split)
    if recorded is not None and len(dataset) < recorded["count"] and cfg.limit_samples is not None:
        recorded_cfg = argparse.Namespace(**{**vars(cfg), "limit_samples": recorded["count"]})
        check_split(ckpt, split, entry.build(recorded_cfg, split))
    else:
        check_split(ckpt, split, dataset)
    return dataset


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad options before anything is loaded or written."""
    for name in ("batch_size", "limit_samples"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be > 0 (got {getattr(args, name)})")
    if args.num_workers is not None and args.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0 (got {args.num_workers})")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out: not a directory: {args.out}")


def run_inference(args: argparse.Namespace) -> dict:
    check_args(args)
    device = select_device(args.device)
    limit = getattr(args, "limit_samples", None)
    model, cfg, info, entry, ckpt = load_trained_model(
        args.checkpoint,
        device,
        data=args.data,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        limit_samples=limit,
    )
    dataset = build_checked_split(entry, cfg, ckpt, args.split)
    loader = eval_loader(dataset, cfg.batch_size, cfg.num_workers, 0, 1, device.type == "cuda")
    preset = DevicePreset(info, device)
    zero = getattr(args, "zero_modality", None)
    if zero is not None:
        if zero not in model.modality_names:
            raise UserError(
                f"--zero_modality: this model's modalities are {', '.join(model.modality_names)}, not {zero!r}"
            )
        preset = ZeroModality(preset, zero)
    pred = predict(model, loader, preset, autocast_dtype(args.precision, device), desc=args.split)
    if not all(v.isfinite().all() for k, v in pred.items() if k.startswith("logits")):
        raise UserError(
            f"checkpoint {ckpt['path']}: the model's outputs on --split {args.split} are not finite "
            "(its weights are too large); nothing to report"
        )

    names = model.modality_names
    metrics = classification_metrics(pred["logits"], pred["labels"], {n: pred[f"logits_{n}"] for n in names})
    out_dir = (
        Path(args.out)
        if args.out
        else Path(ckpt["path"]).parent / (f"eval_{args.split}" + (f"_zero_{zero}" if zero else ""))
    )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out: cannot create {out_dir}: {e.strerror or e}") from None
    summary = {
        "checkpoint": ckpt["path"],
        "epoch": ckpt["epoch"] - 1,
        "split": args.split,
        "zero_modality": zero,
        "samples": len(pred["labels"]),
        "limit_samples": limit,
        **metrics,
    }
    clip_ids = getattr(dataset, "clip_ids", None)
    try:
        ckpt_io.atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2))
        csv_text = _predictions_csv(pred, names, info.class_names, clip_ids)
        ckpt_io.atomic_write_text(out_dir / "predictions.csv", csv_text)
    except OSError as e:
        raise UserError(f"--out: cannot write into {out_dir}: {e.strerror or e}") from None
    print_table(
        f"{info.name} {args.split} ({len(pred['labels'])} samples{f', {zero} zeroed' if zero else ''}), "
        f"{ckpt['path']}:",
        metrics,
    )
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'predictions.csv'}")
    return summary


def _predictions_csv(pred: dict, names, class_names, clip_ids=None) -> str:
    """One row per sample: index in the split, clip id (the cache's; AV-Digits: the row of its
    arrays; the index when the dataset names none), label, fused prediction and confidence, each
    modality's prediction."""
    probs = pred["logits"].softmax(dim=1)
    per_mod = [pred[f"logits_{n}"].argmax(1).tolist() for n in names]
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["index", "clip_id", "label", "pred", "confidence", *[f"pred_{n}" for n in names]])
    rows = zip(pred["index"].tolist(), pred["labels"].tolist(), probs.argmax(1).tolist(), probs.max(1).values.tolist())
    for row, (i, y, p, c) in enumerate(rows):
        clip = clip_ids[i] if clip_ids is not None else i
        writer.writerow([i, clip, class_names[y], class_names[p], f"{c:.6f}", *[class_names[m[row]] for m in per_mod]])
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    try:
        run_inference(get_args_parser().parse_args(argv))
        return 0
    except UserError as e:
        print(f"inference.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the outputs are written only at the end, each atomically
        print("inference.py: interrupted", file=sys.stderr)
        return 130
