"""M-encoder classifier whose forward returns everything modulation and metrics need.

Both classes satisfy `onthefly.modulation.ModulatedModel`, the contract the Modulator checks.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..data.spec import DatasetInfo
from ..modulation.contract import FeatureHook
from .encoders import ENCODERS, RESNET18_WIDTH, feature_dim
from .fusion import FUSIONS

# A feature hook (modulation/contract.py) receives the model output so far (features and
# unimodal logits, before fusion) and returns the features to fuse plus a per-sample loss
# weight (B,), or None for "all samples count". OPM is such a hook.


def build_encoder(kind: str, in_channels: int, width: int = RESNET18_WIDTH) -> nn.Module:
    """ENCODERS[kind]; `width` is passed only when it is not ResNet18's, so an encoder registered
    with `__init__(self, in_channels)` (docs/modalities.md) keeps working at the default."""
    if width == RESNET18_WIDTH:
        return ENCODERS[kind](in_channels=in_channels)
    return ENCODERS[kind](in_channels=in_channels, width=width)


class MultimodalClassifier(nn.Module):
    """One encoder per modality (M >= 2) plus a fusion head.

    forward(batch) returns a dict:
      "logits":          (B, K) fused logits
      "features":        tuple of M (B, 512) encoder outputs, in modality order (before any OPM drop)
      "unimodal_logits": tuple of M (B, K) z_m (see fusion.py for how each head defines them)
      "sample_weight":   (B,) loss weight per sample, or None (OPM drops samples with no modality)
    """

    def __init__(self, info: DatasetInfo, fusion: str = "concat", width: int = RESNET18_WIDTH):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose one of {sorted(FUSIONS)}")
        if len(info.modalities) < 2:
            raise ValueError(f"a joint model needs two or more modalities; {info.name} has {list(info.modality_names)}")
        self.modality_names = info.modality_names
        self.encoders = nn.ModuleDict({m.name: build_encoder(m.kind, m.channels, width) for m in info.modalities})
        self.head = FUSIONS[fusion](feature_dim(width), info.num_classes, num_modalities=len(info.modalities))

    def forward(self, inputs: Mapping[str, torch.Tensor], feature_hook: FeatureHook | None = None) -> dict:
        features = tuple(self.encoders[name](inputs[name]) for name in self.modality_names)  # M x (B, 512)
        out = {
            "features": features,
            "unimodal_logits": self.head.unimodal_logits(*features),
            "sample_weight": None,
        }
        if feature_hook is not None:
            features, out["sample_weight"] = feature_hook(out)
        out["logits"] = self.head(*features)
        return out

    def encoder_parameters(self) -> tuple[list[nn.Parameter], ...]:
        """Each modality's encoder parameters, in modality order."""
        return tuple(list(self.encoders[n].parameters()) for n in self.modality_names)  # type: ignore[return-value]


class UnimodalClassifier(nn.Module):
    """One encoder with its own linear head: the "trained alone" reference for a modality.

    Its output has the same keys as MultimodalClassifier's, with one entry per tuple.
    """

    def __init__(self, info: DatasetInfo, modality: str, width: int = RESNET18_WIDTH):
        super().__init__()
        specs = {m.name: m for m in info.modalities}
        if modality not in specs:
            raise ValueError(f"unknown modality {modality!r}; this dataset has {sorted(specs)}")
        self.modality_names = (modality,)
        spec = specs[modality]
        self.encoders = nn.ModuleDict({modality: build_encoder(spec.kind, spec.channels, width)})
        self.head = nn.Linear(feature_dim(width), info.num_classes)
        self.head.has_auxiliary_classifiers = False

    def forward(self, inputs: Mapping[str, torch.Tensor], feature_hook: FeatureHook | None = None) -> dict:
        (name,) = self.modality_names
        h = self.encoders[name](inputs[name])
        logits = self.head(h)
        return {"features": (h,), "unimodal_logits": (logits.detach(),), "sample_weight": None, "logits": logits}

    def encoder_parameters(self) -> tuple[list[nn.Parameter], ...]:
        """The one encoder's parameters (a one-tuple: one modality)."""
        return (list(self.encoders[self.modality_names[0]].parameters()),)
