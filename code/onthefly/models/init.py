"""Weight initialisation.

The official OGM-GE / T-PAMI code applies one function to every module of the model:
Kaiming-normal (fan_out, ReLU gain) for convolutions, Xavier-normal weights with zero bias for
linear layers, and weight 1 / bias 0 for BatchNorm. torchvision's ResNet18 already initialises
its convolutions and BatchNorm that way; what differs from PyTorch's defaults is every linear
layer (the fusion head above all), whose default is Kaiming-uniform with a uniform bias.
"""

from __future__ import annotations

import torch
from torch import nn

INITS = ("official", "torch")


@torch.no_grad()
def _official_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_weights(model: nn.Module, scheme: str = "official") -> nn.Module:
    """Initialise `model` in place with `scheme` ("official" or "torch") and return it."""
    if scheme not in INITS:
        raise ValueError(f"unknown initialisation {scheme!r}; choose one of {INITS}")
    if scheme == "official":
        model.apply(_official_init)
    return model
