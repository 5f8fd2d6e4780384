"""train_one_epoch and evaluate: the one training loop every modulation method shares."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .distributed import all_gather_objects, all_reduce_min, all_reduce_sum, is_main_process, shared_randomness
from .metrics import classification_metrics
from .models import auxiliary_loss
from .modulation import Modulator
from .utils import unwrap_model


class NonFiniteError(RuntimeError):
    """The loss or a gradient (kind "step"), at an epoch's end the weights ("weights"), or the
    model's outputs on an evaluation split ("outputs") became NaN/Inf, or every batch of an
    epoch was skipped ("all skipped"). Carries where; the caller words what to do about it."""

    def __init__(self, kind: str, epoch: int, step: int | None = None, global_step: int | None = None):
        self.kind, self.epoch, self.step, self.global_step = kind, epoch, step, global_step
        where = {
            "step": f"non-finite loss or gradient at epoch {epoch}, step {step} of the epoch "
            f"(global step {global_step}; epochs and steps count from 0)",
            "weights": f"the weights became non-finite during epoch {epoch} (an update overflowed)",
            "all skipped": f"every batch of epoch {epoch} had a non-finite loss or gradient and was skipped",
            "outputs": f"the model's outputs became non-finite after epoch {epoch} (its weights grew too large)",
        }[kind]
        super().__init__(f"{where}; nothing was saved from this epoch.")


# Modulation statistics averaged over an epoch (on the device; read once at its end), and the
# name of their epoch-record key: train_<name>_<modality>.
EPOCH_MEANS = {"coeff": "k", "drop_prob": "q"}


@dataclass
class TrainState:
    """Counters that survive across epochs (and in checkpoints)."""

    epoch: int = 0
    global_step: int = 0
    best: dict[str, Any] = field(default_factory=dict)


def compute_loss(out: dict, labels: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    """Cross-entropy of the fused logits (OPM's dropped-out samples weighted 0) + auxiliary z_m loss."""
    per_sample = F.cross_entropy(out["logits"].float(), labels, reduction="none")  # (B,)
    weight = out["sample_weight"]
    if weight is None:
        loss = per_sample.mean()
    else:
        loss = (per_sample * weight).sum() / weight.sum().clamp_min(1.0)
    return loss + auxiliary_loss(head, out["unimodal_logits"], labels)


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One device bool: every element of every tensor is finite (a norm is NaN/Inf otherwise)."""
    return torch.stack(torch._foreach_norm(tensors)).isfinite().all() if tensors else torch.tensor(True)


def _weights_finite(model: torch.nn.Module) -> bool:
    """Parameters and floating-point buffers (BatchNorm statistics) all finite: one host read.
    Element-wise, not via norms: a huge but finite weight has an infinite norm."""
    tensors = [t.detach() for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all())


def train_one_epoch(
    model: torch.nn.Module,
    modulator: Modulator,
    optimizer: torch.optim.Optimizer,
    loader,
    preset: Callable,
    state: TrainState,
    cfg,
    autocast_dtype: torch.dtype | None,
    writer=None,
) -> dict[str, float]:
    """One pass over `loader`. Nothing is read on the host except every `cfg.log_every` steps
    and once at the end. Returns the epoch's mean loss and accuracy, and the epoch means of
    OGM's k_m and OPM's q_m where the method computes them (EPOCH_MEANS). Raises NonFiniteError."""
    model.train()
    head = unwrap_model(model).head
    params = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device
    totals = torch.zeros(2, device=device)  # loss sum, correct
    seen = 0
    no_step = torch.iinfo(torch.long).max
    first_bad = torch.full((), no_step, dtype=torch.long, device=device)  # first non-finite step (stop policy)
    skipped = 0
    modulation_sums: dict[str, torch.Tensor] = {}
    modulation_steps = 0
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    epoch = state.epoch
    modulator.begin_epoch(model, loader, preset, epoch)  # PMR's class prototypes (nothing for the others)
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not is_main_process(), leave=False, dynamic_ncols=True)

    for step, batch in enumerate(bar):
        inputs, labels = preset(batch)
        with autocast:
            out = model(inputs, feature_hook=modulator.feature_hook(labels, epoch))
            loss = compute_loss(out, labels, head)
            loss = loss + modulator.auxiliary_loss(out, labels, epoch, loss)  # UNIMODAL_AUX, MMPARETO, PMR
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # OGM-GE's noise is added to gradients DDP has already averaged: every rank draws the same.
        with (
            shared_randomness(getattr(cfg, "seed", 0) * 1_000_003 + state.global_step, device)
            if modulator.gaussian_noise
            else nullcontext()
        ):
            modulator.modulate_gradients(out, labels, epoch)

        finite = loss.detach().isfinite() & _all_finite([p.grad for p in params if p.grad is not None])
        if cfg.nonfinite == "skip":
            # A host sync (and under DDP an all-reduce) per step: the price of the opt-in skip
            # policy. Every rank skips the same steps, so the model replicas stay identical.
            if bool(all_reduce_sum((~finite).float()) > 0):
                skipped += 1
                if is_main_process():
                    print(
                        f"warning: skipped a batch with a non-finite loss or gradient (epoch {epoch}, step {step})",
                        file=sys.stderr,
                        flush=True,
                    )
                state.global_step += 1
                continue
        else:
            first_bad = torch.where(finite, first_bad, first_bad.clamp_max(step))
        optimizer.step()

        totals += torch.stack([loss.detach() * len(labels), (out["logits"].argmax(1) == labels).sum()])
        seen += len(labels)
        present = [key for key in EPOCH_MEANS if key in modulator.stats]
        for key in present:  # summed in place: no new tensor per step
            if key in modulation_sums:
                modulation_sums[key].add_(modulator.stats[key])
            else:
                modulation_sums[key] = modulator.stats[key].detach().clone()
        modulation_steps += bool(present)
        state.global_step += 1
        if step % cfg.log_every == 0 or step == len(loader) - 1:
            bad = int(all_reduce_min(first_bad))  # the earliest on any rank
            if bad != no_step:  # this step is global step state.global_step - 1 (0-based)
                raise NonFiniteError("step", epoch, bad, state.global_step - 1 - step + bad)
            _log_step(bar, writer, modulator, loss, totals[0] / seen, optimizer, state.global_step)

    loss_sum, correct = all_reduce_sum(totals).tolist()
    n = int(all_reduce_sum(torch.tensor(float(seen), device=device)).item())
    if n == 0:
        raise NonFiniteError("all skipped", epoch)
    # An update from finite gradients can still overflow the weights (a huge --lr); on an
    # epoch's last step no later loss would show it, and validation would run on NaN.
    if not _weights_finite(model):
        raise NonFiniteError("weights", epoch)
    stats = {"loss": loss_sum / n, "acc": correct / n}
    if cfg.nonfinite == "skip":
        stats["skipped"] = skipped
    for key, total in modulation_sums.items():  # identical on every rank: the scores are all-reduced
        for name, mean in zip(modulator.modality_names, (total / modulation_steps).tolist()):
            stats[f"{EPOCH_MEANS[key]}_{name}"] = mean
    return stats


def _log_step(
    bar, writer, modulator: Modulator, loss: torch.Tensor, epoch_loss: torch.Tensor, optimizer, step: int
) -> None:
    """At a log step: TensorBoard's per-step scalars (step/..., modulation/...; x = optimizer steps
    done) and the progress bar's loss, this rank's mean over the epoch so far (updated only here:
    reading it every step would stall the device)."""
    loss, epoch_loss = torch.stack([loss.detach().float(), epoch_loss.float()]).tolist()
    scalars = {"step/loss": loss, "step/lr": optimizer.param_groups[0]["lr"]}
    for key, value in modulator.stats.items():
        for name, v in zip(modulator.modality_names, value.tolist()):
            scalars[f"modulation/{key}_{name}"] = v
    bar.set_postfix({"epoch loss": f"{epoch_loss:.3f}"}, refresh=False)
    if writer is not None:
        for k, v in scalars.items():
            writer.add_scalar(k, v, step)


@torch.no_grad()
def predict(
    model: torch.nn.Module, loader, preset: Callable, autocast_dtype: torch.dtype | None, desc: str = "eval"
) -> dict[str, torch.Tensor]:
    """Logits, unimodal logits, labels and dataset indices for every sample of `loader` (on CPU).

    Under DDP each rank predicts its shard and the shards are gathered, so every sample is
    counted exactly once (shards must not overlap: see data.loaders.eval_sampler).
    """
    model.eval()
    inner = unwrap_model(model)
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    parts: dict[str, list[torch.Tensor]] = {"logits": [], "labels": [], "index": []}
    parts.update({f"logits_{n}": [] for n in inner.modality_names})
    for batch in tqdm(loader, desc=desc, disable=not is_main_process(), leave=False, dynamic_ncols=True):
        inputs, labels = preset(batch)
        with autocast:
            out = model(inputs)
        parts["logits"].append(out["logits"].float())
        parts["labels"].append(labels)
        parts["index"].append(batch["index"])
        for n, z in zip(inner.modality_names, out["unimodal_logits"]):
            parts[f"logits_{n}"].append(z.float())
    local = {k: torch.cat(v).cpu() for k, v in parts.items()}
    shards = all_gather_objects(local)
    return {k: torch.cat([s[k] for s in shards]) for k in local}


def evaluate(
    model: torch.nn.Module,
    loader,
    preset: Callable,
    autocast_dtype: torch.dtype | None,
    desc: str = "eval",
    epoch: int | None = None,
) -> dict[str, float]:
    """Fused accuracy, macro-F1, mAP and per-modality accuracy (from z_m) on `loader`.
    Raises NonFiniteError("outputs", epoch) when a logit is NaN/Inf: no metric means anything then."""
    inner = unwrap_model(model)
    pred = predict(model, loader, preset, autocast_dtype, desc)
    if not all(v.isfinite().all() for k, v in pred.items() if k.startswith("logits")):
        raise NonFiniteError("outputs", epoch)
    metrics = classification_metrics(
        pred["logits"], pred["labels"], {n: pred[f"logits_{n}"] for n in inner.modality_names}
    )
    metrics["loss"] = float(F.cross_entropy(pred["logits"], pred["labels"]))
    if not math.isfinite(metrics["loss"]):
        metrics["loss"] = float("nan")
    return metrics
