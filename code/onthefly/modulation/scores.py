"""Discrepancy monitoring: per-modality confidence on the true class and its ratio."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

EPS = 1e-8

ReduceFn = Callable[[torch.Tensor], torch.Tensor]


def scores_with_grad(unimodal_logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """`unimodal_scores` keeping the logits' gradient (only the official OPM gradient uses it)."""
    index = labels.view(-1, 1)
    return torch.stack([z.float().softmax(dim=1).gather(1, index).sum() for z in unimodal_logits])


@torch.no_grad()
def unimodal_scores(unimodal_logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """s_m = sum_i softmax(z_m)_i[y_i] over the batch, for each modality m.

    The paper's unimodal discriminative score (Sec. 3, 'discrepancy ratio'). Returns a float32
    tensor (M,) on the logits' device, computed with one gather per modality and no host sync.
    """
    return scores_with_grad(unimodal_logits, labels)


RATIO_REFS = ("mean_others", "min_others", "sum_others")


def discrepancy_ratios(scores: torch.Tensor, ref: str = "mean_others") -> torch.Tensor:
    """rho_m = s_m / r_m, with r_m a reference built from the *other* modalities' scores:

      mean_others: r_m = mean_{j != m} s_j   (the OGM-GE authors' suggestion for M > 2)
      min_others:  r_m = min_{j != m} s_j    (divide by the weakest other modality)
      sum_others:  r_m = sum_{j != m} s_j    (divide by the others together)

    With two modalities all three are the paper's rho_a = s_a / s_v, rho_v = s_v / s_a
    (docs/modalities.md). `scores`: (M,) with M >= 2. Vectorised over an (M, M) matrix of the
    others' scores, so it stays on the device. A zero reference is clamped to EPS: the ratios
    stay finite, and with every score zero every ratio is zero (no modality dominant).
    """
    if ref not in RATIO_REFS:
        raise ValueError(f"unknown ratio reference {ref!r}; choose one of {RATIO_REFS}")
    m = scores.numel()
    if m < 2:
        raise ValueError(f"a discrepancy ratio compares modalities: it needs two or more scores, got {m}")
    self_mask = torch.eye(m, dtype=torch.bool, device=scores.device)
    row = scores.view(1, m).expand(m, m)  # row m: every score; the diagonal (m itself) is masked out
    if ref == "min_others":
        reference = row.masked_fill(self_mask, float("inf")).amin(dim=1)
    else:
        reference = row.masked_fill(self_mask, 0.0).sum(dim=1)
        if ref == "mean_others":
            reference = reference / (m - 1)
    return scores / reference.clamp_min(EPS)
