"""Your own model: an MLP over a feature vector, a 1-D conv over a sequence, your own fusion.

    python examples/own_model.py --steps 50

The model satisfies onthefly.modulation.ModulatedModel: modality_names, encoder_parameters(),
forward(inputs, feature_hook=None) returning features, unimodal_logits (float32, no gradient)
and sample_weight. The fusion here is a weighted sum of per-modality linear heads, so each
modality's share z_m of the fused logits is its own head's output.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from onthefly.modulation import ModulationConfig, Modulator, check_labels


class OwnModel(nn.Module):
    def __init__(self, vec_dim: int, seq_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.modality_names = ("vector", "sequence")
        self.encoders = nn.ModuleDict(
            {
                "vector": nn.Sequential(nn.Linear(vec_dim, width), nn.ReLU(), nn.Linear(width, width)),
                "sequence": nn.Sequential(
                    nn.Conv1d(seq_channels, width, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten()
                ),  # (B, C, T) -> (B, width)
            }
        )
        self.heads = nn.ModuleList(nn.Linear(width, num_classes) for _ in self.modality_names)
        self.mix = nn.Parameter(torch.ones(len(self.modality_names)))  # the fusion's own weights

    def encoder_parameters(self):
        return tuple(list(self.encoders[n].parameters()) for n in self.modality_names)

    def forward(self, inputs, feature_hook=None):
        features = tuple(self.encoders[n](inputs[n]) for n in self.modality_names)
        with torch.no_grad():  # z_m: each modality's share of the fused logits, float32, no gradient
            z = tuple((w * head(h)).float() for w, head, h in zip(self.mix, self.heads, features))
        out = {"features": features, "unimodal_logits": z, "sample_weight": None}
        if feature_hook is not None:  # OPM drops and rescales features here
            features, out["sample_weight"] = feature_hook(out)
        out["logits"] = sum(w * head(h) for w, head, h in zip(self.mix, self.heads, features))
        return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--modulation", default="OGM_GE_OPM")
    args = p.parse_args()
    torch.manual_seed(0)
    n, classes = 256, 4
    labels = torch.randint(0, classes, (n,))
    data = {
        "vector": F.one_hot(labels, classes).float() @ torch.randn(classes, 8) + 0.3 * torch.randn(n, 8),
        "sequence": labels.view(-1, 1, 1).float() * 0.2 + torch.randn(n, 3, 20),
    }  # the weaker modality
    check_labels(labels, classes)  # once, on the whole dataset
    model = OwnModel(8, 3, classes)
    modulator = Modulator.for_model(model, ModulationConfig(modulation=args.modulation, alpha=0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _step in range(args.steps):
        idx = torch.randint(0, n, (32,))
        inputs, y = {k: v[idx] for k, v in data.items()}, labels[idx]
        out = model(inputs, feature_hook=modulator.feature_hook(y, epoch=0))
        loss = F.cross_entropy(out["logits"], y, reduction="none")
        weight = out["sample_weight"]  # OPM: samples with every modality dropped count 0
        loss = loss.mean() if weight is None else (loss * weight).sum() / weight.sum().clamp_min(1)
        optimizer.zero_grad()
        loss.backward()
        modulator.modulate_gradients(out, y, epoch=0)
        optimizer.step()
    stats = {k: [round(v, 3) for v in t.tolist()] for k, t in modulator.stats.items()}
    print(f"loss {loss.item():.3f}", stats)


if __name__ == "__main__":
    main()
