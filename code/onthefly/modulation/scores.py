"""Discrepancy monitoring: per-modality confidence on the true class and its ratio."""
from __future__ import annotations

from typing import Callable, Sequence

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


def discrepancy_ratios(scores: torch.Tensor) -> torch.Tensor:
    """rho = (s_a / s_b, s_b / s_a) for two modalities (the paper's discrepancy ratio).

    A zero denominator is clamped to EPS, so the ratios stay finite: with both scores zero
    both ratios are zero (no modality counts as dominant).
    """
    if scores.numel() != 2:
        raise ValueError(f"discrepancy ratios are defined for two modalities, got {scores.numel()} scores")
    return scores / scores.flip(0).clamp_min(EPS)
