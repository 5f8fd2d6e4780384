"""Ablations that keep one part of OGM / OPM and remove the on-the-fly discrepancy.

- OGM_CONST: the gradient of one fixed modality (named by `--const_dominant`, e.g. the one that
  wins when each modality is trained alone) is always scaled by a constant k; no ratio is used.
  A fixed, named modality rather than one picked by the ratios of the first epoch: the choice
  is visible in the run's configuration and cannot differ between seeds.
- DROPOUT_UNIFORM: every modality is dropped with the same fixed probability q (`--drop_prob`),
  through OPM's own dropout (its per-batch p_exe draw, 1 / (1 - theta) rescaling, and loss
  weight 0 for a sample with no modality left); only q no longer depends on the discrepancy.
  Setting q to OPM's mean logged drop probability gives OPM's drop rate without its targeting.
- UNIMODAL_AUX: the joint loss plus `aux_weight` x the cross-entropy of each modality's logits
  z_m. The z_m are the fusion head's shares (concat: h_m W_m^T + b / 2; sum: each branch), with
  gradient to the encoders *and* to the head's share, so each share is trained as a classifier
  of its modality alone (no extra parameters; the same z_m that OGM and OPM measure).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def constant_coefficients(
    num_modalities: int, dominant: int, k: float, device: torch.device | None = None
) -> torch.Tensor:
    """(M,) gradient coefficients: k for modality `dominant`, 1 for every other."""
    if not 0 <= dominant < num_modalities:
        raise ValueError(f"dominant modality index {dominant} outside 0..{num_modalities - 1}")
    coefficients = torch.ones(num_modalities, device=device)
    coefficients[dominant] = k
    return coefficients


def uniform_drop_probabilities(
    num_modalities: int, drop_prob: float, device: torch.device | None = None
) -> torch.Tensor:
    """(M,) OPM drop probabilities, all equal to `drop_prob` (no discrepancy involved)."""
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"drop_prob must be in [0, 1) (got {drop_prob})")
    return torch.full((num_modalities,), float(drop_prob), device=device)


def unimodal_cross_entropy(unimodal_logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """sum_m CE(z_m, y), each the batch mean, in float32 (the z_m must carry gradient to matter)."""
    return torch.stack([F.cross_entropy(z.float(), labels) for z in unimodal_logits]).sum()
