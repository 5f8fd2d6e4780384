"""Missing-modality evaluation.

"Modality m is missing" means: the tensor fed to m's encoder is all zeros. The zeroing is
applied *after* the device preset, i.e. to the normalised input the encoder sees, so for
frames it stands for the per-channel dataset-mean image (mean imputation), and for
AV-Digits' MFCCs (standardised per coefficient) the mean coefficients -- the same value the
dataset already uses for padding frames. Zeroing the raw uint8 frames instead would feed a
black image, far outside the training distribution after normalisation.

This is not the same as zeroing the encoder's *feature*: in eval mode BatchNorm and biases
still turn a zero input into a non-zero feature, and the fusion head sees that feature.
"""
from __future__ import annotations

from typing import Callable

import torch


class ZeroModality:
    """Wraps a device preset: the batch is prepared as usual, then `name`'s tensor is zeroed."""

    def __init__(self, preset: Callable, name: str):
        self.preset = preset
        self.name = name

    def __call__(self, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs, labels = self.preset(batch)
        if self.name not in inputs:
            raise KeyError(f"cannot zero modality {self.name!r}: the batch has {sorted(inputs)}")
        inputs = dict(inputs)
        inputs[self.name] = torch.zeros_like(inputs[self.name])
        return inputs, labels
