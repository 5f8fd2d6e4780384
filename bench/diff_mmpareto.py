"""One MMPareto training step of the official code against ours, on identical weights and batches.

    python bench/diff_mmpareto.py /path/to/MMPareto_ICML2024 [--steps 4] [--batch 8]

The official checkout (github.com/GeWu-Lab/MMPareto_ICML2024) stays outside this repository;
its `code/` folder is copied to a temporary folder and imported from there. Its dataset module
needs torchaudio and the CREMA-D files, neither used by a training step, so it is replaced by an
empty stand-in. The official `train_epoch` runs on a one-batch list per step; our side is the
official model's copy wrapped in this project's modulation contract (its separate unimodal heads
as z_m), trained by `Modulator` (MMPARETO) and `engine.compute_loss`. Both use SGD (momentum 0.9,
weight decay 1e-4, the official optimiser). Before every step our copy is set to the official
model's weights, BatchNorm statistics and momentum, so each step is compared from identical
states. Printed: per step, our joint-loss weight of each encoder (0.5 = no conflict) and the
largest gradient and weight differences after the step.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

from onthefly.engine import compute_loss  # noqa: E402
from onthefly.models.fusion import FusionHead  # noqa: E402
from onthefly.modulation import ModulationConfig, Modulator  # noqa: E402

NUM_CLASSES = 6  # the official model's CREMA-D head


def import_official(checkout: Path, scratch: Path) -> types.ModuleType:
    """The official MMPareto.py, imported from a copy of its code/ folder in `scratch`."""
    code = checkout / "code"
    if not (code / "MMPareto.py").is_file():
        raise SystemExit(f"{checkout}: no code/MMPareto.py (expected a checkout of GeWu-Lab/MMPareto_ICML2024)")
    shutil.copytree(code, scratch / "code")
    sys.path.insert(0, str(scratch / "code"))
    stand_in = types.ModuleType("dataset.av_dataset")
    stand_in.AVDataset_CD = None  # a training step reads no dataset
    sys.modules["dataset.av_dataset"] = stand_in
    import MMPareto  # noqa: E402  (the official script)

    return MMPareto


class SeparateHeads(FusionHead):
    """The official heads seen through our head API: fused = head([a; v]), z_m = head_m(h_m)."""

    def __init__(self, official: nn.Module):
        super().__init__()
        self.head, self.head_audio, self.head_video = official.head, official.head_audio, official.head_video

    def forward(self, a, v):
        return self.head(torch.cat([a, v], dim=1))

    def shares(self, features, detach_head):
        heads = (self.head_audio, self.head_video)
        return tuple(
            nn.functional.linear(h, *((fc.weight.detach(), fc.bias.detach()) if detach_head else (fc.weight, fc.bias)))
            for h, fc in zip(features, heads)
        )


class Ours(nn.Module):
    """The official AVClassifier's modules under this project's modulation contract."""

    modality_names = ("audio", "visual")

    def __init__(self, official: nn.Module):
        super().__init__()
        self.audio_net, self.visual_net = official.audio_net, official.visual_net
        self.head = SeparateHeads(official)

    def encode(self, audio, visual):
        # The official forward's pooling, written out (CREMA-D: no frame permute).
        a, v = self.audio_net(audio), self.visual_net(visual)
        _, c, h, w = v.size()
        v = v.view(a.size(0), -1, c, h, w).permute(0, 2, 1, 3, 4)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(a, 1), 1), torch.flatten(
            nn.functional.adaptive_avg_pool3d(v, 1), 1
        )

    def forward(self, inputs, feature_hook=None):
        features = self.encode(inputs["audio"], inputs["visual"])
        out = {"features": features, "unimodal_logits": self.head.unimodal_logits(*features), "sample_weight": None}
        out["logits"] = self.head(*features)
        return out

    def encoder_parameters(self):
        return list(self.audio_net.parameters()), list(self.visual_net.parameters())


@torch.no_grad()
def sync(official: nn.Module, ours: nn.Module, opt_official, opt_ours) -> None:
    """Every step starts from the same weights, BatchNorm statistics and momentum on both sides:
    the comparison is of one step each time (free-running, the two trajectories drift apart
    through float rounding, which the small BatchNorm batches of this check amplify)."""
    for a, b in zip([*official.parameters(), *official.buffers()], [*ours.parameters(), *ours.buffers()]):
        b.copy_(a)
    opt_ours.load_state_dict(copy.deepcopy(opt_official.state_dict()))  # its own buffers, not shared ones


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("official", type=Path, help="a checkout of GeWu-Lab/MMPareto_ICML2024")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.002, help="the official default learning rate")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="official_mmpareto_") as scratch:
        official_script = import_official(args.official.resolve(), Path(scratch))
        from models.models import AVClassifier  # the official model (from the scratch copy)

        torch.manual_seed(0)
        official = AVClassifier(types.SimpleNamespace(dataset="CREMAD"))
        ours = Ours(copy.deepcopy(official))
        opt_official = torch.optim.SGD(official.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
        opt_ours = torch.optim.SGD(ours.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
        modulator = Modulator.for_model(ours, ModulationConfig(modulation="MMPARETO"))
        names = dict(zip([n for n, _ in official.named_parameters()], ours.parameters()))
        g = torch.Generator().manual_seed(1)
        worst = 0.0
        for step in range(args.steps):
            sync(official, ours, opt_official, opt_ours)
            audio = torch.randn(args.batch, 1, 64, 48, generator=g)
            visual = torch.randn(args.batch, 1, 3, 48, 48, generator=g)  # (B, T, C, H, W), as the official loader
            labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=g)
            official_script.train_epoch(
                None, 0, official, torch.device("cpu"), [(audio, visual, labels)], opt_official, None
            )
            out = ours({"audio": audio, "visual": visual})
            loss = compute_loss(out, labels, ours.head)
            loss = loss + modulator.auxiliary_loss(out, labels, 0, loss)
            opt_ours.zero_grad()
            loss.backward()
            modulator.modulate_gradients(out, labels, 0)
            opt_ours.step()
            grad_diff = max((po.grad - names[n].grad).abs().max().item() for n, po in official.named_parameters())
            grad_scale = max(po.grad.abs().max().item() for po in official.parameters())
            weight_diff = max((po - names[n]).abs().max().item() for n, po in official.named_parameters())
            w = modulator.stats["pareto_w_joint"].tolist()
            worst = max(worst, grad_diff / grad_scale)
            print(
                f"step {step}: joint-loss weight audio {w[0]:.4f} visual {w[1]:.4f} (0.5000 = no conflict); "
                f"max |grad diff| {grad_diff:.3e} (largest |grad| {grad_scale:.3e}); "
                f"max |weight diff| {weight_diff:.3e}"
            )
        print(f"largest gradient difference relative to the largest gradient, over {args.steps} steps: {worst:.3e}")


if __name__ == "__main__":
    main()
