"""Three modalities, each with its own encoder, fused by the package's concat head.

    python examples/three_modalities.py --steps 50 --ratio_ref mean_others

With M > 2 modalities the discrepancy ratio compares each modality with the others:
rho_m = s_m / (mean | min | sum of the other modalities' scores), chosen by `ratio_ref`
(docs/modalities.md). OGM scales every modality with rho_m > 1; OPM drops them with q_m.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from onthefly.models.fusion import ConcatFusion
from onthefly.modulation import RATIO_REFS, ModulationConfig, Modulator


class ThreeStreams(nn.Module):
    def __init__(self, in_dims: dict[str, int], num_classes: int, width: int = 16):
        super().__init__()
        self.modality_names = tuple(in_dims)
        self.encoders = nn.ModuleDict(
            {n: nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width)) for n, d in in_dims.items()}
        )
        # z_m = h_m W_m^T + b / M: the shares add up to the fused logits
        self.head = ConcatFusion(width, num_classes, num_modalities=len(in_dims))

    def encoder_parameters(self):
        return tuple(list(self.encoders[n].parameters()) for n in self.modality_names)

    def forward(self, inputs, feature_hook=None):
        features = tuple(self.encoders[n](inputs[n]) for n in self.modality_names)
        out = {"features": features, "unimodal_logits": self.head.unimodal_logits(*features), "sample_weight": None}
        if feature_hook is not None:
            features, out["sample_weight"] = feature_hook(out)
        out["logits"] = self.head(*features)
        return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--modulation", default="OGM_OPM")
    p.add_argument("--ratio_ref", default="mean_others", choices=RATIO_REFS)
    args = p.parse_args()
    torch.manual_seed(0)
    n, classes = 300, 5
    labels = torch.randint(0, classes, (n,))
    signal = F.one_hot(labels, classes).float()
    data = {
        name: signal @ torch.randn(classes, 6) * strength + torch.randn(n, 6)  # strong, medium, weak
        for name, strength in (("audio", 2.0), ("visual", 0.8), ("text", 0.3))
    }
    model = ThreeStreams({k: 6 for k in data}, classes)
    config = ModulationConfig(modulation=args.modulation, alpha=0.5, ratio_ref=args.ratio_ref)
    modulator = Modulator.for_model(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _step in range(args.steps):
        idx = torch.randint(0, n, (30,))
        inputs, y = {k: v[idx] for k, v in data.items()}, labels[idx]
        out = model(inputs, feature_hook=modulator.feature_hook(y, epoch=0))
        loss = F.cross_entropy(out["logits"], y, reduction="none")
        weight = out["sample_weight"]
        loss = loss.mean() if weight is None else (loss * weight).sum() / weight.sum().clamp_min(1)
        optimizer.zero_grad()
        loss.backward()
        modulator.modulate_gradients(out, y, epoch=0)
        optimizer.step()
    for key, values in modulator.stats.items():
        print(key, dict(zip(model.modality_names, (round(v, 3) for v in values.tolist()))))


if __name__ == "__main__":
    main()
