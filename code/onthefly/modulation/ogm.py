"""On-the-fly Gradient Modulation (OGM) and its Generalisation Enhancement (OGM-GE)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

OGM_FORMS = ("official", "continuous")
# matrices: every weight with ndim >= 2 (linear, conv of any dimension, attention projections);
# conv: 4-D weights only, the released code's set; all: every trainable encoder parameter.
OGM_PARAMS = ("matrices", "conv", "all")
_SELECTS = {
    "matrices": lambda p: p.ndim >= 2,
    "conv": lambda p: p.ndim == 4,
    "all": lambda p: True,
}


@torch.no_grad()
def ogm_coefficients(ratios: torch.Tensor, alpha: float, form: str = "official") -> torch.Tensor:
    """k_m = 1 - tanh(alpha * x_m) for every dominant modality (rho_m > 1), 1 for the others.

    form="official": x_m = rho_m, as in the released OGM-GE code (published alphas were tuned
    for it; note k jumps from 1 to 1 - tanh(alpha) as rho crosses 1).
    form="continuous": x_m = rho_m - 1, so k is continuous at rho = 1.
    """
    if form not in OGM_FORMS:
        raise ValueError(f"unknown OGM form {form!r}; choose one of {OGM_FORMS}")
    x = ratios if form == "official" else ratios - 1
    return torch.where(ratios > 1, 1 - torch.tanh(alpha * x), torch.ones_like(ratios))


def ogm_parameters(encoder: Sequence[nn.Parameter], which: str = "matrices") -> list[nn.Parameter]:
    """The trainable parameters OGM touches (see OGM_PARAMS). On ResNet encoders `matrices` and
    `conv` are the same set (their only weights with ndim >= 2 are the 4-D conv kernels)."""
    if which not in OGM_PARAMS:
        raise ValueError(f"unknown OGM parameter set {which!r}; choose one of {OGM_PARAMS}")
    selects = _SELECTS[which]
    return [p for p in encoder if p.requires_grad and selects(p)]


@torch.no_grad()
def modulate_gradients_(
    groups: Sequence[Sequence[nn.Parameter]],
    coefficients: torch.Tensor,
    gaussian_noise: bool = False,
) -> None:
    """In place, for every parameter p of modality m: g <- k_m g (+ N(0, std(g)^2) with GE).

    Call between `loss.backward()` and `optimizer.step()`. `coefficients` is a (M,) tensor on
    the parameters' device; it is never read on the host. With `gaussian_noise` (OGM-GE),
    every selected gradient, the non-dominant modality's included (k = 1), also gets
    zero-mean Gaussian noise whose std is that gradient's own std *before* scaling.
    """
    per_group = [[p.grad for p in group if p.grad is not None] for group in groups]
    grads = [g for group_grads in per_group for g in group_grads]
    if not grads:  # nothing to scale: called before backward(), or after zero_grad(set_to_none=True)
        raise RuntimeError("OGM found no gradient to modulate: call it after loss.backward(), before optimizer.step()")
    if gaussian_noise:
        # A 1e-8 floor (as the official code) keeps the std positive for an all-zero gradient
        # (added once to the stacked stds: the same values, one kernel instead of one per gradient).
        stds = torch.stack([g.std() for g in grads]).add_(1e-8).unbind()
        noise = [torch.randn_like(g) for g in grads]
    # One 0-d coefficient per modality keeps _foreach_mul_ on the fused multi-tensor CUDA path;
    # a list of per-gradient 0-d tensors (shapes differ) falls back to one kernel per gradient.
    for m, group_grads in enumerate(per_group):
        if group_grads:
            torch._foreach_mul_(group_grads, coefficients[m])
    if gaussian_noise:
        torch._foreach_addcmul_(grads, noise, stds)
