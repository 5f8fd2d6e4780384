"""Move a collated batch to the device and finish its preprocessing there.

Frames travel as uint8 (4x less to copy than float32) and are normalised on the device.
"""

from __future__ import annotations

import torch

from .spec import DatasetInfo


class DevicePreset:
    def __init__(self, info: DatasetInfo, device: torch.device, channels_last: bool = False):
        self.device = device
        self.modalities = info.modalities
        self.channels_last = channels_last and device.type == "cuda"
        self.stats = {
            m.name: (
                torch.tensor(m.mean, device=device).view(1, -1, 1, 1, 1) * 255,
                torch.tensor(m.std, device=device).view(1, -1, 1, 1, 1) * 255,
            )
            for m in info.modalities
            if m.kind == "frames"
        }

    def __call__(self, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs = {}
        for m in self.modalities:
            x = batch[m.name].to(self.device, non_blocking=True)
            if m.kind == "frames":  # (B, C, T, H, W) uint8 -> normalised float
                mean, std = self.stats[m.name]
                x = (x.float() - mean) / std
            elif self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            inputs[m.name] = x
        return inputs, batch["label"].to(self.device, non_blocking=True)
