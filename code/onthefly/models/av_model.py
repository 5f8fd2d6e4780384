"""Two-encoder classifier whose forward returns everything modulation and metrics need."""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from ..data.spec import DatasetInfo
from .encoders import ENCODERS, FEATURE_DIM
from .fusion import FUSIONS

# A feature hook receives the model output so far (features and unimodal logits, before
# fusion) and returns the features to fuse plus a per-sample loss weight (B,), or None
# for "all samples count". OPM is such a hook.
FeatureHook = Callable[[dict], tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]]


class MultimodalClassifier(nn.Module):
    """Encoders for two modalities plus a fusion head.

    forward(batch) returns a dict:
      "logits":          (B, K) fused logits
      "features":        tuple of two (B, 512) encoder outputs (before any OPM drop)
      "unimodal_logits": tuple of two (B, K) z_m (see fusion.py for how each head defines them)
      "sample_weight":   (B,) loss weight per sample, or None (OPM drops samples with no modality)
    """

    def __init__(self, info: DatasetInfo, fusion: str = "concat"):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose one of {sorted(FUSIONS)}")
        self.modality_names = info.modality_names
        self.encoders = nn.ModuleDict(
            {m.name: ENCODERS[m.kind](in_channels=m.channels) for m in info.modalities}
        )
        self.head = FUSIONS[fusion](FEATURE_DIM, info.num_classes)

    def forward(self, inputs: Mapping[str, torch.Tensor], feature_hook: FeatureHook | None = None) -> dict:
        name_a, name_b = self.modality_names
        h_a = self.encoders[name_a](inputs[name_a])  # (B, 512)
        h_b = self.encoders[name_b](inputs[name_b])  # (B, 512)
        out = {
            "features": (h_a, h_b),
            "unimodal_logits": self.head.unimodal_logits(h_a, h_b),
            "sample_weight": None,
        }
        if feature_hook is not None:
            (h_a, h_b), out["sample_weight"] = feature_hook(out)
        out["logits"] = self.head(h_a, h_b)
        return out

    def encoder_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Each modality's encoder parameters, in modality order."""
        return tuple(list(self.encoders[n].parameters()) for n in self.modality_names)  # type: ignore[return-value]


class UnimodalClassifier(nn.Module):
    """One encoder with its own linear head: the "trained alone" reference for a modality.

    Its output has the same keys as MultimodalClassifier's, with one entry per tuple.
    """

    def __init__(self, info: DatasetInfo, modality: str):
        super().__init__()
        specs = {m.name: m for m in info.modalities}
        if modality not in specs:
            raise ValueError(f"unknown modality {modality!r}; this dataset has {sorted(specs)}")
        self.modality_names = (modality,)
        spec = specs[modality]
        self.encoders = nn.ModuleDict({modality: ENCODERS[spec.kind](in_channels=spec.channels)})
        self.head = nn.Linear(FEATURE_DIM, info.num_classes)
        self.head.has_auxiliary_classifiers = False

    def forward(self, inputs: Mapping[str, torch.Tensor], feature_hook: FeatureHook | None = None) -> dict:
        (name,) = self.modality_names
        h = self.encoders[name](inputs[name])
        logits = self.head(h)
        return {"features": (h,), "unimodal_logits": (logits.detach(),), "sample_weight": None, "logits": logits}

    def encoder_parameters(self) -> tuple[list[nn.Parameter], ...]:
        return (list(self.encoders[self.modality_names[0]].parameters()),)
