"""ResNet18 encoders for spectrograms and frame clips (torchvision's ResNet18, no pretrained weights),
or the same layout narrower (`--encoder_width`, for a CPU benchmark)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock, conv1x1

FEATURE_DIM = 512  # ResNet18's penultimate width
RESNET18_WIDTH = 64  # channels of ResNet18's stem and first stage; the stages double it (64 ... 512)


def feature_dim(width: int = RESNET18_WIDTH) -> int:
    """An encoder's output size: 8 x the first stage's width (512 for ResNet18)."""
    return 8 * width


def _narrow_resnet18(in_channels: int, width: int) -> nn.Module:
    """ResNet18's layout (stem, 4 stages of 2 BasicBlocks, global pooling) with `width` channels
    in place of 64: stages width, 2, 4, 8 x width. Quarter width costs ~1/16 of the convolutions."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    ]
    inplanes = width
    for stage in range(4):
        planes, stride = width * 2**stage, 1 if stage == 0 else 2
        downsample = None
        if stride != 1 or inplanes != planes:
            downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers += [BasicBlock(inplanes, planes, stride, downsample), BasicBlock(planes, planes)]
        inplanes = planes
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (N, 8 * width)


def _resnet18_trunk(in_channels: int, width: int = RESNET18_WIDTH) -> nn.Module:
    if width != RESNET18_WIDTH:
        return _narrow_resnet18(in_channels, width)
    net = resnet18(weights=None)
    if in_channels != 3:
        # Same stem geometry as torchvision's, only the input width changes.
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()  # the trunk ends at global average pooling: (N, 512)
    return net


class SpectrogramEncoder(nn.Module):
    """(B, C, F, T) spectrogram -> (B, 8 * width) (512 at ResNet18's width)."""

    def __init__(self, in_channels: int = 1, width: int = RESNET18_WIDTH):
        super().__init__()
        self.net = _resnet18_trunk(in_channels, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FrameEncoder(nn.Module):
    """(B, C, T, H, W) clip -> (B, 512).

    Frames are folded into the batch, encoded independently, and the 512-d features are
    averaged over time (ResNet's own pooling already averaged over space). Averaging pooled
    features equals pooling over (T, H, W) jointly because every frame has the same size.
    """

    def __init__(self, in_channels: int = 3, width: int = RESNET18_WIDTH):
        super().__init__()
        self.net = _resnet18_trunk(in_channels, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, H, W)
        feats = self.net(frames)  # (B*T, 512)
        return feats.view(b, t, -1).mean(dim=1)  # (B, 512)


ENCODERS: dict[str, type[nn.Module]] = {
    "spectrogram": SpectrogramEncoder,
    "frames": FrameEncoder,
}
