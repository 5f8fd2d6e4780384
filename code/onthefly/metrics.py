"""Classification metrics: fused accuracy, macro-F1, mAP and per-modality accuracy from z_m."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import average_precision_score, f1_score


def mean_average_precision(probs: np.ndarray, labels: np.ndarray) -> float:
    """One-vs-rest average precision, averaged over the classes that occur in `labels`."""
    present = np.unique(labels)
    onehot = labels[:, None] == present[None, :]
    return float(average_precision_score(onehot, probs[:, present], average="macro"))


def classification_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    unimodal_logits: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Metrics of fused logits (N, K) against labels (N,), plus `acc_<modality>` for each z_m.

    Macro-F1 and mAP average over the classes that occur in `labels`."""
    y = labels.cpu().numpy()
    probs = logits.float().softmax(dim=1).cpu().numpy()
    pred = probs.argmax(axis=1)
    out = {
        "acc": float((pred == y).mean()),
        # over the classes present in the split, as mAP: an absent class has no F1 to average
        "macro_f1": float(f1_score(y, pred, average="macro", labels=np.unique(y), zero_division=0)),
        "mAP": mean_average_precision(probs, y),
    }
    for name, z in (unimodal_logits or {}).items():
        out[f"acc_{name}"] = float((z.argmax(dim=1).cpu().numpy() == y).mean())
    return out
