"""Fusion heads: (h_a, h_b) -> fused logits, plus each modality's unimodal logits z_m.

The paper measures each modality's confidence from its *share* of the fused output:
  concat:  out = W [h_a; h_b] + b   =>  z_a = h_a W_a^T + b/2,  z_b = h_b W_b^T + b/2
  sum:     out = (W_a h_a + b_a) + (W_b h_b + b_b)  =>  z_m = W_m h_m + b_m
FiLM and gated fusion do not split into per-modality terms. For them z_m comes from one
auxiliary linear classifier per modality, trained with its own cross-entropy on *detached*
features, so it observes each encoder without sending any gradient to the encoders or to
the fusion head. The engine adds that auxiliary loss (see `auxiliary_loss`).

z_m are always computed without gradient through the encoders: they only feed the scores
of Eq. (scores) and the per-modality accuracy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FusionHead(nn.Module):
    #: True when z_m come from auxiliary classifiers that need their own loss term.
    has_auxiliary_classifiers = False

    def forward(self, h_a: torch.Tensor, h_b: torch.Tensor) -> torch.Tensor:  # (B, K)
        raise NotImplementedError

    def unimodal_logits(self, h_a: torch.Tensor, h_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class ConcatFusion(FusionHead):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(2 * dim, num_classes)
        self.dim = dim

    def forward(self, h_a, h_b):
        return self.fc(torch.cat([h_a, h_b], dim=1))

    @torch.no_grad()
    def unimodal_logits(self, h_a, h_b):
        w_a, w_b = self.fc.weight[:, : self.dim], self.fc.weight[:, self.dim :]
        half_bias = self.fc.bias / 2
        return h_a @ w_a.T + half_bias, h_b @ w_b.T + half_bias


class SumFusion(FusionHead):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc_a = nn.Linear(dim, num_classes)
        self.fc_b = nn.Linear(dim, num_classes)

    def forward(self, h_a, h_b):
        return self.fc_a(h_a) + self.fc_b(h_b)

    @torch.no_grad()
    def unimodal_logits(self, h_a, h_b):
        return self.fc_a(h_a), self.fc_b(h_b)


class _AuxiliaryProbeMixin(FusionHead):
    has_auxiliary_classifiers = True

    def _init_aux(self, dim: int, num_classes: int) -> None:
        self.aux_a = nn.Linear(dim, num_classes)
        self.aux_b = nn.Linear(dim, num_classes)

    def unimodal_logits(self, h_a, h_b):
        # Gradient reaches the auxiliary classifiers only (inputs are detached).
        return self.aux_a(h_a.detach()), self.aux_b(h_b.detach())


class FiLMFusion(_AuxiliaryProbeMixin):
    """Feature-wise linear modulation (Perez et al. 2018): h_a predicts a scale and shift for h_b.

    The first modality conditions the second, as in the official OGM-GE code (audio -> visual).
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.film = nn.Linear(dim, 2 * dim)
        self.fc = nn.Linear(dim, num_classes)
        self._init_aux(dim, num_classes)

    def forward(self, h_a, h_b):
        gamma, beta = self.film(h_a).chunk(2, dim=1)
        return self.fc(gamma * h_b + beta)


class GatedFusion(_AuxiliaryProbeMixin):
    """Gated fusion (Kiela et al. 2018): a sigmoid gate computed from h_a selects features of h_b."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 512):
        super().__init__()
        self.proj_a = nn.Linear(dim, hidden)
        self.proj_b = nn.Linear(dim, hidden)
        self.fc = nn.Linear(hidden, num_classes)
        self._init_aux(dim, num_classes)

    def forward(self, h_a, h_b):
        gate = torch.sigmoid(self.proj_a(h_a))
        return self.fc(gate * self.proj_b(h_b))


FUSIONS: dict[str, type[FusionHead]] = {
    "concat": ConcatFusion,
    "sum": SumFusion,
    "film": FiLMFusion,
    "gated": GatedFusion,
}


def auxiliary_loss(head: FusionHead, unimodal_logits: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the auxiliary classifiers (zero for heads that decompose)."""
    if not head.has_auxiliary_classifiers:
        return unimodal_logits[0].new_zeros(())
    return sum(F.cross_entropy(z.float(), labels) for z in unimodal_logits)
