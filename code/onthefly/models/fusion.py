"""Fusion heads: features (h_1, ..., h_M) -> fused logits, plus each modality's unimodal logits z_m.

The paper measures each modality's confidence from its *share* of the fused output:
  concat:  out = W [h_1; ...; h_M] + b   =>  z_m = h_m W_m^T + b / M
  sum:     out = sum_m (W_m h_m + b_m)   =>  z_m = W_m h_m + b_m
In both, sum_m z_m is the fused output; at M = 2 the concat shares are the paper's
z_a = h_a W_a^T + b/2, z_v = h_v W_v^T + b/2 (the bias is split evenly: it belongs to no modality).
FiLM and gated fusion are defined for two modalities (the first conditions the second) and
refuse more. They do not split into per-modality terms: z_m comes from one auxiliary linear
classifier per modality, trained with its own cross-entropy on *detached* features, so it
observes each encoder without sending any gradient to the encoders or to the fusion head.
The engine adds that auxiliary loss (see `auxiliary_loss`).

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
    """Base of the heads: `forward(*features)` and the shares z_m, one per modality, in order."""

    #: True when z_m come from auxiliary classifiers that need their own loss term.
    has_auxiliary_classifiers = False

    def forward(self, *features: torch.Tensor) -> torch.Tensor:  # M tensors (B, d) -> (B, K)
        raise NotImplementedError

    def shares(self, features: tuple[torch.Tensor, ...], detach_head: bool) -> tuple[torch.Tensor, ...]:
        """Each modality's logits z_m from (float32) features; `detach_head` holds the head fixed."""
        raise NotImplementedError

    def unimodal_logits(self, *features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """z_m in float32, no gradient to the encoders (nor to the head, unless it has auxiliary classifiers)."""
        with (
            torch.autocast(features[0].device.type, enabled=False),
            torch.set_grad_enabled(torch.is_grad_enabled() and self.has_auxiliary_classifiers),
        ):
            return self.shares(tuple(h.detach().float() for h in features), detach_head=False)

    def feature_logits(self, *features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """z_m in float32 as a function of the features (gradient reaches the encoders, never the head)."""
        with torch.autocast(features[0].device.type, enabled=False):
            return self.shares(tuple(h.float() for h in features), detach_head=True)


class ConcatFusion(FusionHead):
    def __init__(self, dim: int, num_classes: int, num_modalities: int = 2):
        super().__init__()
        self.fc = nn.Linear(num_modalities * dim, num_classes)
        self.dim = dim
        self.num_modalities = num_modalities

    def forward(self, *features):
        return self.fc(torch.cat(features, dim=1))

    def shares(self, features, detach_head):
        weight, bias = _weights(self.fc, detach_head)
        bias_share = bias / self.num_modalities
        blocks = weight.split(self.dim, dim=1)  # W_m: (K, d) each
        return tuple(h @ w.T + bias_share for h, w in zip(features, blocks))  # (B, K) each


class SumFusion(FusionHead):
    def __init__(self, dim: int, num_classes: int, num_modalities: int = 2):
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(num_modalities))

    def forward(self, *features):
        return sum(fc(h) for fc, h in zip(self.branches, features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Two-modality checkpoints written before the head took M branches name them fc_a and fc_b.
        for old, new in (("fc_a.", "branches.0."), ("fc_b.", "branches.1.")):
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old) :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def shares(self, features, detach_head):
        # Each branch's full bias: sum_m z_m is the output. (The official evaluation prints
        # per-modality accuracy with bias / 2 for this head; see docs/fidelity.md.)
        return tuple(F.linear(h, *_weights(fc, detach_head)) for fc, h in zip(self.branches, features))


class _AuxiliaryProbeMixin(FusionHead):
    has_auxiliary_classifiers = True

    def _init_aux(self, dim: int, num_classes: int, num_modalities: int) -> None:
        if num_modalities != 2:
            raise ValueError(
                f"{type(self).__name__} is defined for two modalities (the first conditions the "
                f"second), not {num_modalities}; use fusion concat or sum"
            )
        self.aux_a = nn.Linear(dim, num_classes)
        self.aux_b = nn.Linear(dim, num_classes)

    def shares(self, features, detach_head):
        # From unimodal_logits the inputs are detached: gradient reaches the auxiliary classifiers only.
        h_a, h_b = features
        return F.linear(h_a, *_weights(self.aux_a, detach_head)), F.linear(h_b, *_weights(self.aux_b, detach_head))


class FiLMFusion(_AuxiliaryProbeMixin):
    """Feature-wise linear modulation (Perez et al. 2018): h_a predicts a scale and shift for h_b.

    The first modality conditions the second, as in the official OGM-GE code (audio -> visual).
    """

    def __init__(self, dim: int, num_classes: int, num_modalities: int = 2):
        super().__init__()
        self.film = nn.Linear(dim, 2 * dim)
        self.fc = nn.Linear(dim, num_classes)
        self._init_aux(dim, num_classes, num_modalities)

    def forward(self, h_a, h_b):
        gamma, beta = self.film(h_a).chunk(2, dim=1)
        return self.fc(gamma * h_b + beta)


class GatedFusion(_AuxiliaryProbeMixin):
    """Gated fusion (Kiela et al. 2018): a sigmoid gate computed from h_a selects features of h_b."""

    def __init__(self, dim: int, num_classes: int, num_modalities: int = 2, hidden: int = 512):
        super().__init__()
        self.proj_a = nn.Linear(dim, hidden)
        self.proj_b = nn.Linear(dim, hidden)
        self.fc = nn.Linear(hidden, num_classes)
        self._init_aux(dim, num_classes, num_modalities)

    def forward(self, h_a, h_b):
        gate = torch.sigmoid(self.proj_a(h_a))
        return self.fc(gate * self.proj_b(h_b))


FUSIONS: dict[str, type[FusionHead]] = {
    "concat": ConcatFusion,
    "sum": SumFusion,
    "film": FiLMFusion,
    "gated": GatedFusion,
}


def auxiliary_loss(head: nn.Module, unimodal_logits: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the auxiliary classifiers (zero for heads that decompose)."""
    if not getattr(head, "has_auxiliary_classifiers", False):
        return unimodal_logits[0].new_zeros(())
    return sum(F.cross_entropy(z.float(), labels) for z in unimodal_logits)
