"""Small helpers that training, inference and the probes share: device, precision, seeding,
unwrapping DDP / torch.compile wrappers, and printing a metrics table.

Imports nothing from the rest of the package but `errors`, so any module may use it.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from .errors import UserError

# Device types this code runs on; others (mps, meta, xla, ...) are refused up front rather
# than failing later inside an operator that device lacks.
DEVICE_TYPES = ("cpu", "cuda")


def select_device(name: str, option: str = "--device") -> torch.device:
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'; anything else is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{option}: unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type not in DEVICE_TYPES:
        raise UserError(f"{option} {name}: not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option} {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --precision: bf16 on request or by default on CUDA; None means fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; deterministic algorithms when asked (slower, exact reruns)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, inside a DistributedDataParallel and/or torch.compile wrapper."""
    for attr in ("_orig_mod", "module", "_orig_mod"):  # compile(DDP(model)) or DDP(compile(model))
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module):
            model = inner
    return model


def print_table(title: str, metrics: dict[str, float]) -> None:
    """`title`, then one `name value` line per metric (floats to 4 decimals)."""
    print(title)
    for k, v in metrics.items():
        print(f"  {k:<14} {v:.4f}" if isinstance(v, float) else f"  {k:<14} {v}")
