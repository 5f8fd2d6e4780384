"""On-the-fly Prediction Modulation (OPM): drop the dominant modality's features in the forward pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch

OPM_GRADS = ("clean", "official")


def drop_probabilities(ratios: torch.Tensor, q_base: float, lam: float) -> torch.Tensor:
    """q_m = clip(q_base * (1 + lam * tanh(rho_m - 1)), 0, 1) if rho_m > 1, else 0 (differentiable in rho)."""
    q = (q_base * (1 + lam * torch.tanh(ratios - 1))).clamp(0.0, 1.0)
    return torch.where(ratios > 1, q, torch.zeros_like(q))


@torch.no_grad()
def opm_drop_probabilities(ratios: torch.Tensor, q_base: float, lam: float) -> torch.Tensor:
    """The OPM drop probability q_m of each modality, without gradient (see `drop_probabilities`)."""
    return drop_probabilities(ratios, q_base, lam)


class _RescaleThetaAsGrad(torch.autograd.Function):
    """x / (1 - theta) whose backward returns theta itself as theta's gradient.

    This is what the released T-PAMI code's rescaling does (its custom autograd function);
    with theta built from scores that carry gradient, it sends d(theta^2 / 2) / d(encoder)
    to both encoders on every executed OPM step, whatever the loss. `--opm_grad official`
    reproduces it; the default `clean` path has no such term.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(theta)
        return x / (1 - theta.detach()).clamp_min(1e-6).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (theta,) = ctx.saved_tensors
        return grad_output / (1 - theta).clamp_min(1e-6).to(grad_output.dtype), theta


def opm_feature_dropout(
    features: Sequence[torch.Tensor], drop_prob: torch.Tensor, p_exe: float, grad: str = "clean"
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """Drop each sample's modality m with probability q_m; rescale what is kept.

    features:  M tensors (B, d_m); drop_prob: (M,) q_m; with probability p_exe the drop is
    executed for this batch, otherwise nothing changes (one draw per batch, kept on device).
    Kept features are scaled by 1 / (1 - theta), theta = sum_m d_m q_m / sum_m d_m (the OPM
    rescaling of the T-PAMI 2024 paper), which keeps the expected fused input unchanged.

    grad="clean": q carries no gradient, the rescaling is a plain product. grad="official":
    `drop_prob` may carry gradient (the official code builds it from non-detached scores) and
    the rescaling is `_RescaleThetaAsGrad`, applied once to all kept features as the official
    code applies it once to their stack.

    Returns (features, sample_weight (B,), keep (B, M)); sample_weight is 0 for samples whose
    every modality was dropped, so they leave the loss.
    """
    if grad not in OPM_GRADS:
        raise ValueError(f"unknown OPM gradient {grad!r}; choose one of {OPM_GRADS}")
    batch = features[0].shape[0]
    device = features[0].device
    executed = (torch.rand((), device=device) < p_exe).float()
    q = drop_prob.to(device=device, dtype=torch.float32) * executed  # (M,)
    keep = torch.rand(batch, len(features), device=device) >= q.detach()  # (B, M), P(keep) = 1 - q_m
    dims = [f.shape[1] for f in features]  # Python ints: no host-to-device copy in the step
    theta = sum(d * q[m] for m, d in enumerate(dims)) / sum(dims)
    masked = [f * keep[:, m : m + 1].to(f.dtype) for m, f in enumerate(features)]
    if grad == "official":
        out = tuple(_RescaleThetaAsGrad.apply(torch.cat(masked, dim=1), theta).split(dims, dim=1))
    else:
        scale = 1.0 / (1.0 - theta).clamp_min(1e-6)
        out = tuple(f * scale.to(f.dtype) for f in masked)
    sample_weight = keep.any(dim=1).float()
    return out, sample_weight, keep
