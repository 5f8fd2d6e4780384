"""Fusion heads: (h_a, h_b) -> fused logits, plus each modality's unimodal logits z_m.

The paper measures each modality's confidence from its *share* of the fused output:
  concat:  out = W [h_a; h_b] + b   =>  z_a = h_a W_a^T + b/2,  z_b = h_b W_b^T + b/2
  sum:     out = (W_a h_a + b_a) + (W_b h_b + b_b)  =>  z_m = W_m h_m + b_m
FiLM and gated fusion do not split into per-modality terms. For them z_m comes from one
auxiliary linear classifier per modality, trained with its own cross-entropy on *detached*
features, so it observes each encoder without sending any gradient to the encoders or to
the fusion head. The engine adds that auxiliary loss (see `auxiliary_loss`).

z_m are always computed without gradient through the encoders: they only feed the scores
of Eq. (scores) and the per-modality accuracy. They are computed in float32 outside autocast
(matmul included): the scores are the method's control signal, and a bf16 product near a tie
can flip which modality counts as dominant. `feature_logits` is the same computation with the
head's parameters held fixed but gradient kept to the features: the official OPM code builds
theta from such scores (see modulation/opm.py, --opm_grad official).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _weights(layer: nn.Linear, detach: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weight and bias in float32, optionally detached."""
    weight, bias = (layer.weight.detach(), layer.bias.detach()) if detach else (layer.weight, layer.bias)
    return weight.float(), bias.float()


class FusionHead(nn.Module):
    #: True when z_m come from auxiliary classifiers that need their own loss term.
    has_auxiliary_classifiers = False

    def forward(self, h_a: torch.Tensor, h_b: torch.Tensor) -> torch.Tensor:  # (B, K)
        raise NotImplementedError

    def shares(self, h_a: torch.Tensor, h_b: torch.Tensor, detach_head: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Each modality's logits z_m from (float32) features; `detach_head` holds the head fixed."""
        raise NotImplementedError

    def unimodal_logits(self, h_a: torch.Tensor, h_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z_m in float32, no gradient to the encoders (nor to the head, unless it has auxiliary classifiers)."""
        with torch.autocast(h_a.device.type, enabled=False), torch.set_grad_enabled(
            torch.is_grad_enabled() and self.has_auxiliary_classifiers
        ):
            return self.shares(h_a.detach().float(), h_b.detach().float(), detach_head=False)

    def feature_logits(self, h_a: torch.Tensor, h_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z_m in float32 as a function of the features (gradient reaches the encoders, never the head)."""
        with torch.autocast(h_a.device.type, enabled=False):
            return self.shares(h_a.float(), h_b.float(), detach_head=True)


class ConcatFusion(FusionHead):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(2 * dim, num_classes)
        self.dim = dim

    def forward(self, h_a, h_b):
        return self.fc(torch.cat([h_a, h_b], dim=1))

    def shares(self, h_a, h_b, detach_head):
        weight, bias = _weights(self.fc, detach_head)
        half_bias = bias / 2
        w_a, w_b = weight[:, : self.dim], weight[:, self.dim :]
        return h_a @ w_a.T + half_bias, h_b @ w_b.T + half_bias  # (B, K) each


class SumFusion(FusionHead):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc_a = nn.Linear(dim, num_classes)
        self.fc_b = nn.Linear(dim, num_classes)

    def forward(self, h_a, h_b):
        return self.fc_a(h_a) + self.fc_b(h_b)

    def shares(self, h_a, h_b, detach_head):
        # Each branch's full bias: z_a + z_b is the output. (The official evaluation prints
        # per-modality accuracy with bias / 2 for this head; see docs/fidelity.md.)
        return F.linear(h_a, *_weights(self.fc_a, detach_head)), F.linear(h_b, *_weights(self.fc_b, detach_head))


class _AuxiliaryProbeMixin(FusionHead):
    has_auxiliary_classifiers = True

    def _init_aux(self, dim: int, num_classes: int) -> None:
        self.aux_a = nn.Linear(dim, num_classes)
        self.aux_b = nn.Linear(dim, num_classes)

    def shares(self, h_a, h_b, detach_head):
        # From unimodal_logits the inputs are detached: gradient reaches the auxiliary classifiers only.
        return F.linear(h_a, *_weights(self.aux_a, detach_head)), F.linear(h_b, *_weights(self.aux_b, detach_head))


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
