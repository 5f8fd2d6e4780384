"""The reference training step, written from the published description of the official
OGM-GE code (see the facts listed in BENCHMARKS.md), used as the speed baseline.

Everything here is deliberately as the official step does it:
  * float32, no autocast, NCHW; the model wrapped in nn.DataParallel on CUDA;
  * unimodal logits from the concat head's share, computed with gradient tracking;
  * scores by a Python loop over the batch, one indexing op per sample;
  * `if ratio > 1:` on a device tensor (a host sync) to pick the dominant modality;
  * a loop over named parameters, modulating the 4-D (conv) gradients of each encoder,
    OGM-GE with `grad.std().item()` (a host sync per parameter);
  * three `loss.item()` calls per step.

The network itself is the project's (the same ResNet18 encoders and concat head, with the
same weights), so a comparison measures the training step, not a different architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

OFFICIAL_METHODS = ("none", "OGM", "OGM_GE")  # the official code's Normal / OGM / OGM_GE


class OfficialStyleNet(nn.Module):
    """forward(audio, visual) -> (a, v, out), the official model's interface, over our modules."""

    def __init__(self, encoders: nn.ModuleDict, head: nn.Module, modality_names: Sequence[str]):
        super().__init__()
        self.encoders = encoders
        self.head = head
        self.modality_names = tuple(modality_names)

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor):
        name_a, name_b = self.modality_names
        a = self.encoders[name_a](x_a)
        b = self.encoders[name_b](x_b)
        return a, b, self.head(a, b)


def wrap_official(model: nn.Module, device: torch.device) -> nn.Module:
    """Our MultimodalClassifier (concat head) seen through the official interface, on `device`."""
    if not hasattr(model.head, "fc") or getattr(model.head, "dim", None) is None:
        raise ValueError("the official-style step needs the concat fusion head")
    net = OfficialStyleNet(model.encoders, model.head, model.modality_names).to(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        net = nn.DataParallel(net, device_ids=[index])
    return net


def official_optimizer(net: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)


def _inner(net: nn.Module) -> OfficialStyleNet:
    return net.module if isinstance(net, nn.DataParallel) else net  # type: ignore[return-value]


def official_forward_backward(net: nn.Module, x_a, x_b, label, criterion=None):
    """Forward, the three losses, backward. Returns (out_a, out_b, loss, loss_a, loss_b)."""
    criterion = criterion or nn.CrossEntropyLoss()
    a, b, out = net(x_a, x_b)
    head = _inner(net).head
    d = head.dim
    weight, bias = head.fc.weight, head.fc.bias
    out_b = torch.mm(b, torch.transpose(weight[:, d:], 0, 1)) + bias / 2
    out_a = torch.mm(a, torch.transpose(weight[:, :d], 0, 1)) + bias / 2
    loss = criterion(out, label)
    loss_b = criterion(out_b, label)
    loss_a = criterion(out_a, label)
    loss.backward()
    return out_a, out_b, loss, loss_a, loss_b


def official_coefficients(out_a: torch.Tensor, out_b: torch.Tensor, label: torch.Tensor, alpha: float):
    """(coeff_a, coeff_b) as the official step computes them: per-sample loop, host branch.

    The softmax is taken once per modality, then indexed sample by sample.
    """
    prob_a = F.softmax(out_a, dim=1)
    prob_b = F.softmax(out_b, dim=1)
    score_b = sum([prob_b[i][label[i]] for i in range(out_b.size(0))])
    score_a = sum([prob_a[i][label[i]] for i in range(out_a.size(0))])
    ratio_b = score_b / score_a
    ratio_a = 1 / ratio_b
    if ratio_b > 1:  # host sync
        coeff_b = 1 - torch.tanh(alpha * F.relu(ratio_b))
        coeff_a = 1
    else:
        coeff_a = 1 - torch.tanh(alpha * F.relu(ratio_a))
        coeff_b = 1
    return coeff_a, coeff_b


def official_modulate(net: nn.Module, coeff_a, coeff_b, method: str) -> None:
    """The official loop over named parameters: 4-D gradients of each encoder, in place."""
    name_a, name_b = _inner(net).modality_names
    for name, parms in net.named_parameters():
        if parms.grad is None:
            continue
        parts = str(name).split(".")
        if parts[0] == "module":  # nn.DataParallel's prefix
            parts = parts[1:]
        if parts[0] != "encoders" or len(parms.grad.size()) != 4:
            continue
        layer = parts[1]  # encoders.<modality>.…
        coeff = coeff_a if layer == name_a else coeff_b if layer == name_b else None
        if coeff is None:
            continue
        if method == "OGM_GE":
            parms.grad = parms.grad * coeff + torch.zeros_like(parms.grad).normal_(0, parms.grad.std().item() + 1e-8)
        elif method == "OGM":
            parms.grad *= coeff


def official_step(net, optimizer, batch, method: str, alpha: float, criterion=None) -> tuple[float, float, float]:
    """One official-style training step; returns the three logged loss values (host floats)."""
    x_a, x_b, label = batch
    optimizer.zero_grad()
    out_a, out_b, loss, loss_a, loss_b = official_forward_backward(net, x_a, x_b, label, criterion)
    if method != "none":
        coeff_a, coeff_b = official_coefficients(out_a, out_b, label, alpha)
        official_modulate(net, coeff_a, coeff_b, method)
    optimizer.step()
    return loss.item(), loss_a.item(), loss_b.item()
