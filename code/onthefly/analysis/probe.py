"""Linear probes: how much class information each frozen encoder's features carry.

For a trained checkpoint, every modality's encoder is frozen (eval mode: BatchNorm uses its
running statistics, no dropout) and maps the train / val / test splits, without training
augmentation, to 512-d features. A multinomial logistic regression is fitted on the train
features for each L2 strength of a grid (full-batch L-BFGS, features standardised
with train statistics); the strength with the best validation accuracy (ties: lower
validation loss, then stronger regularisation) is kept, and its test accuracy is reported.
The test split is used once, for that number only.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..fileio import atomic_write_text

DEFAULT_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- the classifier


class Standardizer:
    """x -> (x - mean) / std with statistics of the training features (constant dims -> 0)."""

    def __init__(self, x: torch.Tensor):
        self.mean = x.mean(dim=0)
        self.std = x.std(dim=0, unbiased=False)
        self.std = torch.where(self.std > 1e-8, self.std, torch.ones_like(self.std))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def fit_logistic_regression(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    l2: float,
    max_iter: int = 100,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy + l2 / 2 * ||W||^2 (bias not penalised) with full-batch L-BFGS.

    x: (N, D) float, y: (N,) int64. Returns (W (D, K), b (K,)). `init` warm-starts.
    """
    d = x.shape[1]
    if init is None:
        w = torch.zeros(d, num_classes, dtype=x.dtype)
        b = torch.zeros(num_classes, dtype=x.dtype)
    else:
        w, b = init[0].clone(), init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _scores(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    logits = x @ w + b
    return float((logits.argmax(1) == y).double().mean()), float(F.cross_entropy(logits, y))


def linear_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor] | None,
    num_classes: int,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    max_iter: int = 100,
) -> dict:
    """Fit on `train` for every L2 strength, choose on `val`, report on `test`.

    Each pair is (features (N, D), labels (N,)). Returns a JSON-safe dict:
      l2, train_acc, val_acc, val_loss, test_acc (None without test), grid (per strength).
    """
    scale = Standardizer(train[0].float())
    xs = {"train": scale(train[0].float()), "val": scale(val[0].float())}
    ys = {"train": train[1].long(), "val": val[1].long()}
    if test is not None:
        xs["test"], ys["test"] = scale(test[0].float()), test[1].long()

    grid, fits = [], []
    init = None
    for l2 in sorted(l2_grid, reverse=True):  # strong -> weak, each fit warm-starts the next
        w, b = fit_logistic_regression(xs["train"], ys["train"], num_classes, l2, max_iter, init)
        init = (w, b)
        train_acc, _ = _scores(xs["train"], ys["train"], w, b)
        val_acc, val_loss = _scores(xs["val"], ys["val"], w, b)
        grid.append({"l2": l2, "train_acc": train_acc, "val_acc": val_acc, "val_loss": val_loss})
        fits.append((w, b))
    # Best validation accuracy; ties -> lower validation loss -> stronger L2 (earlier in grid).
    best = min(range(len(grid)), key=lambda i: (-grid[i]["val_acc"], grid[i]["val_loss"], i))
    w, b = fits[best]
    result = {**grid[best], "test_acc": None, "grid": sorted(grid, key=lambda g: g["l2"])}
    if test is not None:
        result["test_acc"], result["test_loss"] = _scores(xs["test"], ys["test"], w, b)
    return result


# --------------------------------------------------------------------------- features of a checkpoint


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader, preset: Callable, amp_dtype: torch.dtype | None = None):
    """Each modality's encoder output for every sample of `loader`, in loader order.

    Returns ({modality: (N, 512) float32 on CPU}, labels (N,)).
    """
    model.eval()
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    names = model.modality_names
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    labels = []
    for batch in loader:
        inputs, y = preset(batch)
        with autocast:
            for n in names:
                feats[n].append(model.encoders[n](inputs[n]).float().cpu())
        labels.append(y.cpu())
    return {n: torch.cat(v) for n, v in feats.items()}, torch.cat(labels)


def without_augmentation(dataset):
    """Datasets that augment their train split expose a boolean `train` switch; turn it off."""
    if isinstance(getattr(dataset, "train", None), bool):
        dataset.train = False
    return dataset


def probe_checkpoint(
    checkpoint: str | Path,
    data: str | None = None,
    device_name: str = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    limit_samples: int | None = None,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    max_iter: int = 100,
    out: str | Path | None = None,
) -> dict:
    """Probe every encoder of a checkpoint (a .pt, or a run directory: its best.pt); write probe.json."""
    from ..data.loaders import eval_loader
    from ..data.presets import DevicePreset
    from ..infer import build_checked_split, load_trained_model
    from ..utils import autocast_dtype, select_device

    device = select_device(device_name)
    amp = autocast_dtype(precision, device)
    model, cfg, info, entry, ckpt = load_trained_model(
        checkpoint, device, data=data, batch_size=batch_size, num_workers=num_workers, limit_samples=limit_samples
    )
    preset = DevicePreset(info, device)
    features, labels = {}, {}
    for split in SPLITS:
        dataset = without_augmentation(build_checked_split(entry, cfg, ckpt, split))
        loader = eval_loader(dataset, cfg.batch_size, cfg.num_workers, 0, 1, device.type == "cuda")
        features[split], labels[split] = extract_features(model, loader, preset, amp)

    modalities = {}
    for name in model.modality_names:
        pairs = {s: (features[s][name], labels[s]) for s in SPLITS}
        modalities[name] = linear_probe(
            pairs["train"], pairs["val"], pairs["test"], info.num_classes, l2_grid, max_iter
        )
    result = {
        "checkpoint": ckpt["path"],
        "epoch": ckpt["epoch"] - 1,  # its last completed epoch, from 0 as in metrics.jsonl
        "dataset": info.name,
        "samples": {s: len(labels[s]) for s in SPLITS},
        "feature_dim": int(next(iter(features["train"].values())).shape[1]),
        **{f"acc_{n}": r["test_acc"] for n, r in modalities.items()},
        "modalities": modalities,
    }
    out_path = Path(out) if out else Path(ckpt["path"]).parent / "probe.json"
    try:  # atomic: a failed write never leaves a probe.json that --skip_existing would take as done
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_path, json.dumps(result, indent=2))
    except OSError as e:
        raise UserError(f"cannot write {out_path}: {e.strerror or e}") from None
    result["out"] = str(out_path)
    return result


# --------------------------------------------------------------------------- command line


def get_args_parser():
    from ..config import ArgumentParser, finite_float

    p = ArgumentParser(prog="probe.py", description="Linear probes on the frozen encoders of trained checkpoints.")
    p.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        help="run directories (their best.pt is probed) or .pt files; probe.json goes next to each",
    )
    p.add_argument("--out", default=None, help="output file (only with one checkpoint; default <run dir>/probe.json)")
    p.add_argument("--skip_existing", action="store_true", help="skip checkpoints whose probe.json already exists")
    p.add_argument("--data", default=None, help="dataset directory, if it moved since training")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--num_workers", type=int, default=None)
    p.add_argument(
        "--limit_samples", type=int, default=None, help="probe only the first N samples of each split (smoke tests)"
    )
    p.add_argument(
        "--l2",
        type=finite_float,
        nargs="+",
        default=list(DEFAULT_L2_GRID),
        help="L2 strengths tried (chosen on val), each >= 0",
    )
    p.add_argument("--max_iter", type=int, default=100, help="L-BFGS iterations per strength")
    return p


def check_args(args) -> None:
    """Refuse settings that would fail later or give a meaningless probe, naming the option."""
    for name in ("batch_size", "limit_samples", "max_iter"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be > 0 (got {getattr(args, name)})")
    if args.num_workers is not None and args.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0 (got {args.num_workers})")
    negative = [v for v in args.l2 if v < 0]
    if negative:
        raise UserError(f"--l2 strengths must be >= 0 (got {negative[0]})")
    if args.out and Path(args.out).is_dir():
        raise UserError(f"--out names a folder, not a file: {args.out}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = get_args_parser().parse_args(argv)
        check_args(args)
        if args.out and len(args.checkpoint) > 1:
            raise UserError("--out takes one --checkpoint; with several, probe.json goes into each run directory")
        for ckpt in args.checkpoint:
            target = (
                Path(args.out)
                if args.out
                else (Path(ckpt) if Path(ckpt).is_dir() else Path(ckpt).parent) / "probe.json"
            )
            if args.skip_existing and target.exists():
                print(f"skip {ckpt}: {target} exists")
                continue
            r = probe_checkpoint(
                ckpt,
                args.data,
                args.device,
                args.precision,
                args.batch_size,
                args.num_workers,
                args.limit_samples,
                args.l2,
                args.max_iter,
                args.out,
            )
            accs = "  ".join(
                f"{n} {m['test_acc']:.4f} (l2 {m['l2']:g}, val {m['val_acc']:.4f})" for n, m in r["modalities"].items()
            )
            print(f"linear probe, test accuracy: {accs}  -> {r['out']}")
        return 0
    except UserError as e:
        print(f"probe.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # each probe.json is written whole or not at all
        print("probe.py: interrupted; the probes finished before it are written", file=sys.stderr)
        return 130
