"""PMR, Prototypical Modal Rebalance (Fan et al., CVPR 2023), as its released training script does it.

Each modality m keeps one prototype per class: the mean encoder feature of that class,
computed without gradient in evaluation mode over the first tenth of the training batches,
before the first epoch and again after every epoch (from the update after the second epoch on
blended with the previous ones, P <- (1 - mu) P_new + mu P_old, mu = `--pmr_momentum`; the
released scripts run mu = 0). In every training step:
  - the prototype logits of modality m are minus the Euclidean distances of its features to
    the prototypes, u_m = -|h_m - P_m,k| (B, K), with gradient to the encoder only;
  - the prototype score s'_m = sum_i softmax(u_m)_i[y_i] gives the ratio rho'_m = s'_m / s'_other;
  - the modality behind (rho'_m < 1) gets the prototypical cross-entropy CE(u_m, y) with
    weight alpha (`--pmr_alpha`); the one ahead gets none (at equality, neither):
        L = CE(fused, y) + sum_m alpha [rho'_m < 1] CE(u_m, y).
The weight is a step function of the ratio in the released script; the paper's prototype
entropy regularisation of the modality ahead does not appear in that script and is not
implemented here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

PROTOTYPE_FRACTION = 10  # prototypes come from the first 1/10 of the training batches, as released


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """-|h_i - P_k|_2: (B, d), (K, d) -> (B, K), differentiable in the features; float32 at least."""
    dtype = torch.promote_types(features.dtype, torch.float32)
    diff = features.to(dtype).unsqueeze(1) - prototypes.to(dtype).unsqueeze(0)  # (B, K, d)
    # sqrt of the summed squares, not torch.cdist: cdist's matrix-product path loses digits. The floor
    # (a distance of at least 1e-6) makes a feature lying on a prototype give zero gradient, not NaN.
    return -diff.pow(2).sum(dim=2).clamp_min(1e-12).sqrt()


@torch.no_grad()
def class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class feature sums (K, d) and counts (K,) of one batch (summed over batches, and ranks)."""
    sums = torch.zeros(num_classes, features.shape[1], device=features.device, dtype=torch.float32)
    sums.index_add_(0, labels, features.float())
    counts = torch.bincount(labels, minlength=num_classes).float()
    return sums, counts


def prototypes_from_sums(
    sums: torch.Tensor, counts: torch.Tensor, previous: torch.Tensor | None, momentum: float
) -> torch.Tensor:
    """Class means, blended with the previous prototypes: (1 - momentum) new + momentum previous.

    A class with no sample has no mean; it keeps its previous prototype (zero at the start),
    where the released script would divide by zero.
    """
    means = sums / counts.clamp_min(1).unsqueeze(1)
    if previous is None:
        return means
    means = torch.where(counts.unsqueeze(1) > 0, means, previous)
    return (1 - momentum) * means + momentum * previous


def pmr_weights(prototype_ratios: torch.Tensor, alpha: float) -> torch.Tensor:
    """(M,) weights of the prototypical losses: alpha for a modality behind (rho' < 1), else 0."""
    return torch.where(
        prototype_ratios < 1, torch.full_like(prototype_ratios, alpha), torch.zeros_like(prototype_ratios)
    )


def pmr_loss(proto_logits: Sequence[torch.Tensor], labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_m w_m CE(u_m, y): the rebalancing term added to the joint loss."""
    return (weights.detach() * torch.stack([F.cross_entropy(u, labels) for u in proto_logits])).sum()
