"""Gradient accumulation and mixed precision (bf16 autocast; on CPU here, same code on CUDA).

    python examples/accumulation_amp.py --steps 20 --micro_batches 4

The coefficient k of an optimiser step must come from every sample of that step: call
`modulator.accumulate(out, labels)` after each micro-batch and `modulator.modulate_gradients(epoch=...)`
once before `optimizer.step()`; the scores s_m are summed over the micro-batches. OPM acts in the
forward pass, so it uses each micro-batch's own ratio. z_m stay float32 under autocast: the package's
fusion heads compute them outside it (a bf16 product near a tie can flip the dominant modality).
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from onthefly.models.fusion import SumFusion
from onthefly.modulation import ModulationConfig, Modulator


class TwoMLPs(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, width: int = 32):
        super().__init__()
        self.modality_names = ("a", "b")
        self.encoders = nn.ModuleDict(
            {
                n: nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, width))
                for n in self.modality_names
            }
        )
        self.head = SumFusion(width, num_classes, num_modalities=2)  # z_m = W_m h_m + b_m

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
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--micro_batches", type=int, default=4)
    p.add_argument("--micro_batch_size", type=int, default=16)
    args = p.parse_args()
    torch.manual_seed(0)
    n, classes = 512, 3
    labels = torch.randint(0, classes, (n,))
    signal = F.one_hot(labels, classes).float() @ torch.randn(classes, 10)
    data = {"a": signal * 1.5 + torch.randn(n, 10), "b": signal * 0.4 + torch.randn(n, 10)}
    model = TwoMLPs(10, classes)
    modulator = Modulator.for_model(model, ModulationConfig(modulation="OGM_OPM", alpha=0.5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _step in range(args.steps):
        optimizer.zero_grad()
        for _ in range(args.micro_batches):
            idx = torch.randint(0, n, (args.micro_batch_size,))
            inputs, y = {k: v[idx] for k, v in data.items()}, labels[idx]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(inputs, feature_hook=modulator.feature_hook(y, epoch=0))
                loss = F.cross_entropy(out["logits"].float(), y, reduction="none")
            weight = out["sample_weight"]
            loss = loss.mean() if weight is None else (loss * weight).sum() / weight.sum().clamp_min(1)
            (loss / args.micro_batches).backward()
            modulator.accumulate(out, y)  # s_m of this micro-batch, added to the step's sums
        modulator.modulate_gradients(epoch=0)  # k from the step's sums, then scale the gradients
        optimizer.step()
    stats = {k: [round(v, 3) for v in t.tolist()] for k, t in modulator.stats.items()}
    print(f"loss {loss.item():.3f}", stats)


if __name__ == "__main__":
    main()
