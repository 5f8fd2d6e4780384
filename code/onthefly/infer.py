"""Evaluate a checkpoint on a split: a metrics table, metrics.json and per-sample predictions.csv."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from .config import ArgumentParser
from .data import DatasetInfo, get_dataset_entry
from .data.loaders import eval_loader
from .data.presets import DevicePreset
from .engine import predict
from .analysis.robustness import ZeroModality
from .errors import UserError
from .metrics import classification_metrics
from .models import build_model
from .runner import autocast_dtype, print_table, select_device


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
    p.add_argument("--zero_modality", default=None, metavar="NAME",
                   help="missing-modality test: feed zeros to NAME's encoder (its normalised input; see analysis/robustness.py); "
                        "default output: <run dir>/eval_<split>_zero_<NAME>")
    return p


def load_trained_model(checkpoint: str | Path, device: torch.device, **overrides) -> tuple:
    """Rebuild a run's model from its checkpoint (a .pt, or a run directory: its best.pt).

    `overrides` (data, batch_size, num_workers, limit_samples) replace the run's settings
    when not None. Returns (model, cfg, info, dataset entry, checkpoint dict).
    """
    path = Path(checkpoint)
    ckpt = ckpt_io.load_checkpoint(path / "best.pt" if path.is_dir() else path)
    cfg = argparse.Namespace(**ckpt["config"])
    cfg.limit_samples = None
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    info = DatasetInfo.from_dict(ckpt["dataset_info"])
    entry = get_dataset_entry(info.name)
    current = entry.info(cfg)
    if (current.num_classes, current.modalities) != (info.num_classes, info.modalities):
        raise UserError(f"checkpoint {ckpt['path']} was trained on a different {info.name} dataset than the one at --data")
    model = build_model(info, cfg.fusion, cfg.modality).to(device)
    ckpt_io.load_model_state(model, ckpt["model"], ckpt["path"])
    return model, cfg, info, entry, ckpt


def run_inference(args: argparse.Namespace) -> dict:
    device = select_device(args.device)
    model, cfg, info, entry, ckpt = load_trained_model(
        args.checkpoint, device, data=args.data, batch_size=args.batch_size, num_workers=args.num_workers
    )
    loader = eval_loader(entry.build(cfg, args.split), cfg.batch_size, cfg.num_workers, 0, 1, device.type == "cuda")
    preset = DevicePreset(info, device)
    zero = getattr(args, "zero_modality", None)
    if zero is not None:
        if zero not in model.modality_names:
            raise UserError(f"--zero_modality: this model's modalities are {', '.join(model.modality_names)}, not {zero!r}")
        preset = ZeroModality(preset, zero)
    pred = predict(model, loader, preset, autocast_dtype(args.precision, device), desc=args.split)

    names = model.modality_names
    metrics = classification_metrics(pred["logits"], pred["labels"], {n: pred[f"logits_{n}"] for n in names})
    out_dir = Path(args.out) if args.out else Path(ckpt["path"]).parent / (f"eval_{args.split}" + (f"_zero_{zero}" if zero else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"checkpoint": ckpt["path"], "epoch": ckpt["epoch"], "split": args.split, "zero_modality": zero,
               "samples": len(pred["labels"]), **metrics}
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))

    probs = pred["logits"].softmax(dim=1)
    with open(out_dir / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "label", "pred", "confidence", *[f"pred_{n}" for n in names]])
        per_mod = [pred[f"logits_{n}"].argmax(1).tolist() for n in names]
        for row, (i, y, p, c) in enumerate(zip(pred["index"].tolist(), pred["labels"].tolist(), probs.argmax(1).tolist(), probs.max(1).values.tolist())):
            writer.writerow([i, info.class_names[y], info.class_names[p], f"{c:.6f}", *[info.class_names[m[row]] for m in per_mod]])
    print_table(f"{info.name} {args.split} ({len(pred['labels'])} samples{f', {zero} zeroed' if zero else ''}), {ckpt['path']}:", metrics)
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'predictions.csv'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        run_inference(get_args_parser().parse_args(argv))
        return 0
    except UserError as e:
        print(f"inference.py: error: {e}", file=sys.stderr)
        return 2
