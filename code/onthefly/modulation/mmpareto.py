"""MMPareto (Wei and Hu, ICML 2024): integrate each encoder's multimodal and unimodal gradients.

The loss is the joint cross-entropy plus one unimodal cross-entropy per modality. Encoder m
receives two gradients, g_mm (of the joint loss) and g_m (of its own unimodal loss):
  - direction: if cos(g_mm, g_m) > 0 the two are weighted equally, (w_mm, w_m) = (1/2, 1/2);
    otherwise (a conflict) by the minimum-norm point of their convex hull (MGDA for two tasks):
    w_mm = c, w_m = 1 - c with c = argmin_c |c g_mm + (1 - c) g_m|^2, clipped to [0.001, 0.999]
    as the released code's solver does;
  - magnitude: per parameter tensor p, the integrated g'_p = 2 (w_mm g_mm,p + w_m g_m,p) is
    rescaled to the norm of the plain sum g_mm,p + g_m,p when that is larger, then multiplied
    by gamma (1.5 in the released code): g_p <- gamma max(1, |g_mm,p + g_m,p| / |g'_p|) g'_p.
The cosine and the min-norm weights are over all of encoder m's parameters at once; the
rescaling is per tensor, as in the released code. Every parameter outside the encoders (the
fusion head) keeps the gradient of the summed loss. Everything stays on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MIN_NORM_CLIP = (0.001, 0.999)  # the released two-task solver's values at its boundary cases


def _dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([(x.double() * y.double()).sum() for x, y in zip(xs, ys)]).sum()


def pareto_weights(g_mm: Sequence[torch.Tensor], g_uni: Sequence[torch.Tensor]) -> torch.Tensor:
    """(w_mm, w_uni) for one encoder: (1/2, 1/2) without conflict, the min-norm weights with one."""
    mm_mm, mm_uni, uni_uni = _dot(g_mm, g_mm), _dot(g_mm, g_uni), _dot(g_uni, g_uni)
    cosine = mm_uni / (mm_mm.sqrt() * uni_uni.sqrt()).clamp_min(1e-30)
    # min_c |c a + (1 - c) b|^2 = (b.b - a.b) / (a.a + b.b - 2 a.b), with the solver's boundary cases
    # (a.b >= a.a: c at its upper clip; a.b >= b.b: c at its lower clip).
    interior = (uni_uni - mm_uni) / (mm_mm + uni_uni - 2 * mm_uni).clamp_min(1e-30)
    c = torch.where(
        mm_uni >= mm_mm,
        torch.full_like(interior, MIN_NORM_CLIP[1]),
        torch.where(mm_uni >= uni_uni, torch.full_like(interior, MIN_NORM_CLIP[0]), interior),
    )
    c = torch.where(cosine > 0, torch.full_like(c, 0.5), c)
    return torch.stack([c, 1 - c])


@torch.no_grad()
def integrate_gradients(
    g_mm: Sequence[torch.Tensor], g_uni: Sequence[torch.Tensor], gamma: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The MMPareto gradient of each of one encoder's parameter tensors (see the module docstring),
    and the weights (w_mm, w_uni) used."""
    w = pareto_weights(g_mm, g_uni)
    out = []
    for mm, uni in zip(g_mm, g_uni):
        new = 2 * w[0].to(mm.dtype) * mm + 2 * w[1].to(mm.dtype) * uni
        plain_norm, new_norm = torch.linalg.vector_norm(mm + uni), torch.linalg.vector_norm(new)
        boost = torch.where(new_norm > 0, plain_norm / new_norm.clamp_min(1e-30), torch.ones_like(new_norm))
        out.append(new * (gamma * boost.clamp_min(1.0)))
    return out, w
