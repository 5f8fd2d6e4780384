"""ResNet18 encoders for spectrograms and frame clips (torchvision's ResNet18, no pretrained weights)."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18

FEATURE_DIM = 512  # ResNet18's penultimate width


def _resnet18_trunk(in_channels: int) -> nn.Module:
    net = resnet18(weights=None)
    if in_channels != 3:
        # Same stem geometry as torchvision's, only the input width changes.
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()  # the trunk ends at global average pooling: (N, 512)
    return net


class SpectrogramEncoder(nn.Module):
    """(B, C, F, T) spectrogram -> (B, 512)."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.net = _resnet18_trunk(in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FrameEncoder(nn.Module):
    """(B, C, T, H, W) clip -> (B, 512).

    Frames are folded into the batch, encoded independently, and the 512-d features are
    averaged over time (ResNet's own pooling already averaged over space). Averaging pooled
    features equals pooling over (T, H, W) jointly because every frame has the same size.
    """

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.net = _resnet18_trunk(in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, H, W)
        feats = self.net(frames)  # (B*T, 512)
        return feats.view(b, t, -1).mean(dim=1)  # (B, 512)


ENCODERS: dict[str, type[nn.Module]] = {
    "spectrogram": SpectrogramEncoder,
    "frames": FrameEncoder,
}
