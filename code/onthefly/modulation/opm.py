"""On-the-fly Prediction Modulation (OPM): drop the dominant modality's features in the forward pass."""
from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def opm_drop_probabilities(ratios: torch.Tensor, q_base: float, lam: float) -> torch.Tensor:
    """q_m = clip(q_base * (1 + lam * tanh(rho_m - 1)), 0, 1) if rho_m > 1, else 0, the OPM drop probability."""
    q = (q_base * (1 + lam * torch.tanh(ratios - 1))).clamp(0.0, 1.0)
    return torch.where(ratios > 1, q, torch.zeros_like(q))


def opm_feature_dropout(
    features: Sequence[torch.Tensor], drop_prob: torch.Tensor, p_exe: float
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """Drop each sample's modality m with probability q_m; rescale what is kept.

    features:  M tensors (B, d_m); drop_prob: (M,) q_m; with probability p_exe the drop is
    executed for this batch, otherwise nothing changes (one draw per batch, kept on device).
    Kept features are scaled by 1 / (1 - theta), theta = sum_m d_m q_m / sum_m d_m, the
    official code's rescaling that keeps the expected fused input unchanged.

    Returns (features, sample_weight (B,), keep (B, M)); sample_weight is 0 for samples whose
    every modality was dropped, so they leave the loss.
    """
    batch = features[0].shape[0]
    device = features[0].device
    executed = (torch.rand((), device=device) < p_exe).float()
    q = drop_prob.to(device=device, dtype=torch.float32) * executed  # (M,)
    keep = torch.rand(batch, len(features), device=device) >= q  # (B, M), P(keep) = 1 - q_m
    dims = [f.shape[1] for f in features]  # Python ints: no host-to-device copy in the step
    theta = sum(d * q[m] for m, d in enumerate(dims)) / sum(dims)
    scale = 1.0 / (1.0 - theta).clamp_min(1e-6)
    out = tuple(f * (keep[:, m : m + 1] * scale).to(f.dtype) for m, f in enumerate(features))
    sample_weight = keep.any(dim=1).float()
    return out, sample_weight, keep
