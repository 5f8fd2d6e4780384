"""What a model must provide to be modulated, checked when a `Modulator` is built.

Any `nn.Module` qualifies (no base class to inherit) when it has:

  modality_names         a sequence of M distinct names, the order of everything per modality
  encoder_parameters()   M sequences of the encoders' parameters, in that order (what OGM scales)
  forward(inputs, feature_hook=None) -> dict with
      "unimodal_logits"  M tensors z_m (B, K), float32; the Modulator reads them without gradient
      "features"         M tensors h_m (B, d_m) before fusion (OPM drops and rescales them)
      "sample_weight"    (B,) or None, set by the feature hook; your loss weights samples with it
    and, when `feature_hook` is given, calls `features, sample_weight = feature_hook(out)` on the
    dict holding "features" and "unimodal_logits", then fuses the returned features (OPM).
  head.feature_logits(*features) -> M tensors z_m with gradient to the features: only for
      --opm_grad official (the released code's theta path, modulation/opm.py).

`check_model` reads only Python attributes; `check_output` only tensor metadata (dtype, shape)
and, once, the first batch's labels (one host read, at the first step).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

FeatureHook = Callable[[dict], tuple[tuple[torch.Tensor, ...], "torch.Tensor | None"]]


@runtime_checkable
class ModulatedModel(Protocol):
    """The interface a model satisfies to be modulated (see the module docstring)."""

    modality_names: Sequence[str]

    def encoder_parameters(self) -> Sequence[Sequence[nn.Parameter]]: ...

    def __call__(self, inputs: Any, feature_hook: FeatureHook | None = None) -> Mapping[str, Any]: ...


class ContractError(TypeError):
    """A model (or its output) lacks a piece of the modulation contract; the message names it."""


def _accepts_feature_hook(model: nn.Module) -> bool:
    if not callable(getattr(model, "forward", None)):
        return False
    params = inspect.signature(model.forward).parameters
    return "feature_hook" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def check_model(model: nn.Module, needs_feature_logits: bool = False) -> None:
    """Raise one ContractError naming every missing piece of the contract, or return."""
    name = type(model).__name__
    missing = []
    names = getattr(model, "modality_names", None)
    if names is None:
        missing.append("the attribute modality_names (a sequence of M distinct modality names)")
    elif isinstance(names, str) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        missing.append(f"modality_names as M distinct strings (got {names!r})")
    if not callable(getattr(model, "encoder_parameters", None)):
        missing.append("the method encoder_parameters() (one sequence of parameters per modality)")
    elif names is not None and len(model.encoder_parameters()) != len(names):
        missing.append(
            f"encoder_parameters() with one group per modality ({len(names)}: {', '.join(names)}); "
            f"it returned {len(model.encoder_parameters())}"
        )
    if not _accepts_feature_hook(model):
        missing.append("forward(inputs, feature_hook=None): the feature_hook argument (onthefly.modulation.contract)")
    if needs_feature_logits and not callable(getattr(getattr(model, "head", None), "feature_logits", None)):
        missing.append("head.feature_logits(*features) (needed by opm_grad official)")
    if missing:
        raise ContractError(f"{name} cannot be modulated: it lacks " + "; ".join(missing))


def check_output(out: Any, num_modalities: int, keys: tuple[str, ...]) -> None:
    """The model output carries `keys` with one float32 z_m per modality (metadata only)."""
    if not isinstance(out, Mapping):
        raise ContractError(f"the model output must be a dict with {', '.join(keys)}; got {type(out).__name__}")
    absent = [k for k in keys if k not in out]
    if absent:
        raise ContractError(f"the model output lacks {', '.join(absent)} (it has {', '.join(map(str, out))})")
    for key in keys:
        if key != "sample_weight" and len(out[key]) != num_modalities:
            raise ContractError(
                f"the model output's {key} has {len(out[key])} entries, one per modality expected ({num_modalities})"
            )
    bad = [m for m, z in enumerate(out["unimodal_logits"]) if z.dtype != torch.float32 or z.dim() != 2]
    if bad:
        z = out["unimodal_logits"][bad[0]]
        raise ContractError(f"unimodal_logits[{bad[0]}] must be float32 (B, K) logits; got {z.dtype} {tuple(z.shape)}")


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Integer class indices in [0, num_classes): one host read, so call it once (a dataset, a first batch)."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
        raise ValueError(
            f"labels must be a 1-D integer tensor of class indices; got {labels.dtype} {tuple(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must be class indices in [0, {num_classes}); got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
