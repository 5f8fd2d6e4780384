"""PMR of the official code against ours: prototypes and one training step per epoch, identical states.

    python bench/diff_pmr.py /path/to/Modal-Imbalance-PMR [--epochs 3] [--batch 8] [--momentum 0.2]

The official checkout (github.com/fanyunfeng-bit/Modal-Imbalance-PMR) stays outside this
repository; it is copied to a temporary folder and its `main_Prototype_grad.py` imported from
there. Its dataset modules need data files (one, dataset/dataset.py, is not in the repository),
and no step reads a dataset, so they are replaced by empty stand-ins. The released backbone has
compression layers after its second stage that fix the input sizes, so the batches have CREMA-D's
(257 x 299 spectrograms, 224 x 224 frames); our side uses the same modules. Per epoch:
  1. our copy is set to the official model's weights, BatchNorm statistics and momentum;
  2. the official `calculate_prototype` and our `Modulator.begin_epoch` compute the prototypes
     from the same 20-batch loader (both use its first 20 // 10 = 2 batches);
  3. the official `train_epoch` runs one step on a one-batch list, and ours the same batch
     through `engine.compute_loss` + `Modulator.auxiliary_loss` (PMR), SGD on both sides.
Printed: the prototype difference, which modality got the prototypical loss on our side, and
the gradient and weight differences after the step.
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
from onthefly.models.fusion import ConcatFusion  # noqa: E402
from onthefly.modulation import ModulationConfig, Modulator  # noqa: E402

NUM_CLASSES = 6  # CREMA-D, as the official script sizes its head
DATASET_MODULES = ("CGMNIST", "CramedDataset", "AVEDataset", "dataset", "VGGSoundDataset")


def import_official(checkout: Path, scratch: Path) -> types.ModuleType:
    """The official main_Prototype_grad.py, imported from a copy of the checkout in `scratch`."""
    if not (checkout / "main_Prototype_grad.py").is_file():
        raise SystemExit(
            f"{checkout}: no main_Prototype_grad.py (expected a checkout of fanyunfeng-bit/Modal-Imbalance-PMR)"
        )
    shutil.copytree(checkout, scratch / "pmr", ignore=shutil.ignore_patterns(".git", "data"))
    sys.path.insert(0, str(scratch / "pmr"))
    for name in DATASET_MODULES:  # classes the script imports by name; a training step uses none
        stand_in = types.ModuleType(f"dataset.{name}")
        for cls in ("CGMNISTDataset", "CramedDataset", "AVEDataset", "AVDataset", "VGGSound"):
            setattr(stand_in, cls, None)
        sys.modules[f"dataset.{name}"] = stand_in
    import main_Prototype_grad  # noqa: E402  (the official script)

    return main_Prototype_grad


class Ours(nn.Module):
    """The official AVClassifier's encoders and concat layer under this project's modulation contract."""

    modality_names = ("audio", "visual")

    def __init__(self, official: nn.Module):
        super().__init__()
        # Registered in the official order (fusion layer first), so parameters, buffers and the
        # optimiser's state line up one to one.
        self.head = ConcatFusion(512, NUM_CLASSES)
        self.head.fc = official.fusion_module.fc_out
        self.audio_net, self.visual_net = official.audio_net, official.visual_net

    def encode(self, audio, visual):
        # The official forward's pooling, written out (the script adds the audio channel axis).
        a, v = self.audio_net(audio.unsqueeze(1)), self.visual_net(visual)
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
    """The same weights, BatchNorm statistics and momentum on both sides (ours its own copies)."""
    for a, b in zip([*official.parameters(), *official.buffers()], [*ours.parameters(), *ours.buffers()]):
        b.copy_(a)
    opt_ours.load_state_dict(copy.deepcopy(opt_official.state_dict()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("official", type=Path, help="a checkout of fanyunfeng-bit/Modal-Imbalance-PMR")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help=f"at least {NUM_CLASSES}, so every batch has every class")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--momentum", type=float, default=0.2, help="the script's --momentum_coef (its default 0.2)")
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    if args.batch < NUM_CLASSES:
        p.error(f"--batch must be >= {NUM_CLASSES}")
    with tempfile.TemporaryDirectory(prefix="official_pmr_") as scratch:
        script = import_official(args.official.resolve(), Path(scratch))
        from models.basic_model import AVClassifier  # the official model (from the scratch copy)
        from utils.utils import weight_init

        official_args = types.SimpleNamespace(
            dataset="CREMAD",
            fusion_method="concat",
            modulation="Proto",
            modulation_starts=0,
            modulation_ends=100,
            alpha=args.alpha,
            embed_dim=512,
            momentum_coef=args.momentum,
            optimizer="SGD",
        )
        torch.manual_seed(0)
        official = AVClassifier(official_args)
        official.apply(weight_init)  # as the script's main()
        ours = Ours(copy.deepcopy(official))
        opt_official = torch.optim.SGD(official.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.StepLR(opt_official, 70, 0.1)  # the script's; stepped after each epoch
        opt_ours = torch.optim.SGD(ours.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
        modulator = Modulator.for_model(
            ours, ModulationConfig(modulation="PMR", pmr_alpha=args.alpha, pmr_momentum=args.momentum)
        )
        names = dict(zip([n for n, _ in official.named_parameters()], ours.parameters()))
        assert all(names[n].shape == p.shape for n, p in official.named_parameters())
        g = torch.Generator().manual_seed(1)

        def batch():
            # CREMA-D's input sizes: the released backbone's compression layers need them. Every class
            # in every batch: the script divides by each class's count (0 gives a NaN prototype).
            labels = (torch.arange(args.batch) % NUM_CLASSES)[torch.randperm(args.batch, generator=g)]
            return (
                torch.randn(args.batch, 257, 299, generator=g),
                torch.randn(args.batch, 3, 1, 224, 224, generator=g),
                labels,
            )

        loader = [batch() for _ in range(20)]
        device = torch.device("cpu")
        protos = None
        for epoch in range(args.epochs):
            sync(official, ours, opt_official, opt_ours)
            if protos is None:  # before the first epoch
                protos = script.calculate_prototype(official_args, official, loader, device, 0)
            else:  # the script's update after epoch (epoch - 1)
                protos = script.calculate_prototype(official_args, official, loader, device, epoch - 1, *protos)
            modulator.begin_epoch(ours, loader, lambda b: ({"audio": b[0], "visual": b[1]}, b[2]), epoch)
            assert all(p.isfinite().all() for p in protos), "official prototypes not finite"
            proto_diff = max((a - b).abs().max().item() for a, b in zip(protos, modulator.prototypes))

            spec, image, labels = batch()
            script.train_epoch(
                official_args, epoch, official, device, [(spec, image, labels)], opt_official, scheduler, *protos
            )
            out = ours({"audio": spec, "visual": image})
            loss = compute_loss(out, labels, ours.head)
            loss = loss + modulator.auxiliary_loss(out, labels, epoch, loss)
            opt_ours.zero_grad()
            loss.backward()
            modulator.modulate_gradients(out, labels, epoch)
            opt_ours.step()
            grad_diff = max((po.grad - names[n].grad).abs().max().item() for n, po in official.named_parameters())
            grad_scale = max(po.grad.abs().max().item() for po in official.parameters())
            weight_diff = max((po - names[n]).abs().max().item() for n, po in official.named_parameters())
            weights = modulator.stats["pmr_weight"].tolist()
            print(
                f"epoch {epoch}: max |prototype diff| {proto_diff:.3e}; prototypical-loss weight audio {weights[0]:g} "
                f"visual {weights[1]:g}; max |grad diff| {grad_diff:.3e} (largest |grad| {grad_scale:.3e}); "
                f"max |weight diff| {weight_diff:.3e}"
            )


if __name__ == "__main__":
    main()
