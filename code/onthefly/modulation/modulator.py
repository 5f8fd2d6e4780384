"""The two-line modulation API for any training loop.

    modulator = Modulator.from_config(cfg, model)
    ...
    out = model(inputs, feature_hook=modulator.feature_hook(labels, epoch))   # OPM (None otherwise)
    loss = ...; loss.backward()
    modulator.modulate_gradients(out, labels, epoch)                          # OGM / OGM-GE
    optimizer.step()

Scores, ratios and coefficients stay on the device; `modulator.stats` holds the latest ones
for logging, which is the only place they are read on the host.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import torch
from torch import nn

from .ogm import OGM_FORMS, OGM_PARAMS, modulate_gradients_, ogm_coefficients, ogm_parameters
from .opm import OPM_GRADS, drop_probabilities, opm_feature_dropout
from .scores import ReduceFn, discrepancy_ratios, scores_with_grad, unimodal_scores
from ..utils import unwrap_model

# method -> (uses OGM, adds GE noise, uses OPM)
METHODS: dict[str, tuple[bool, bool, bool]] = {
    "none": (False, False, False),
    "OGM": (True, False, False),
    "OGM_GE": (True, True, False),
    "OPM": (False, False, True),
    "OGM_OPM": (True, False, True),
    "OGM_GE_OPM": (True, True, True),  # the journal code's combined run
}


def _setting(default: Any, help: str, choices: tuple | None = None, low: float | None = None, high: float | None = None):
    """A ModulationConfig field: its default, allowed values and the --help text of its option."""
    return field(default=default, metadata={"help": help, "choices": choices, "low": low, "high": high})


@dataclass
class ModulationConfig:
    """Every modulation setting, with its default and allowed values: the one place they live.

    The command line (one option per field, same name), YAML files, the per-dataset defaults
    and the benchmarks read them from here; `modulation_defaults()` returns the defaults.
    """

    modulation: str = _setting("none", "the method", choices=tuple(METHODS))
    alpha: float = _setting(0.1, "OGM strength alpha in k = 1 - tanh(alpha rho)", low=0.0)
    ogm_form: str = _setting("official", "official: k = 1 - tanh(alpha rho); continuous: 1 - tanh(alpha (rho - 1))",
                             choices=OGM_FORMS)
    ogm_params: str = _setting("conv", "scale conv weights' gradients (official) or all encoder parameters'",
                               choices=OGM_PARAMS)
    q_base: float = _setting(0.5, "OPM base drop probability q_base", low=0.0, high=1.0)
    lam: float = _setting(0.5, "OPM: growth lambda of the drop probability with the discrepancy", low=0.0)
    p_exe: float = _setting(0.7, "OPM: probability that a batch is modulated at all", low=0.0, high=1.0)
    modulation_starts: int = _setting(0, "first epoch (0-based, inclusive) with modulation", low=0)
    modulation_ends: int = _setting(10**9, "last epoch (0-based, inclusive) with modulation", low=0)
    warmup_epochs: int = _setting(0, "epochs of plain joint training before any modulation", low=0)
    # The journal code ends only OGM at modulation_ends and runs OPM to the last epoch: "OGM until
    # E1, OPM until E2" is modulation_ends E1, opm_ends E2.
    opm_ends: int = _setting(-1, "last epoch (0-based, inclusive) with OPM (-1: modulation_ends)", low=-1)
    opm_grad: str = _setting("clean", "OPM's gradient: clean (none through q), or official (the released code's theta-as-gradient)",
                             choices=OPM_GRADS)

    def __post_init__(self) -> None:
        problem = self.check(asdict(self))
        if problem:
            raise ValueError(problem)

    @staticmethod
    def check(values: dict[str, Any], prefix: str = "") -> str | None:
        """The first problem with these settings (one line, each named `prefix + field`), or None."""
        for f in fields(ModulationConfig):
            value, meta, name = values[f.name], f.metadata, prefix + f.name
            if meta["choices"] is not None and value not in meta["choices"]:
                return f"{name}: unknown {value!r}; choose one of: {', '.join(meta['choices'])}"
            low, high = meta["low"], meta["high"]
            if (low is not None and value < low) or (high is not None and value > high):
                need = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
                return f"{name} must be {need} (got {value})"
        first = max(values["modulation_starts"], values["warmup_epochs"])
        if first > values["modulation_ends"]:  # the window would be empty: modulation never runs
            which = "modulation_starts" if values["modulation_starts"] >= values["warmup_epochs"] else "warmup_epochs"
            return (f"{prefix}{which} ({first}) must be <= {prefix}modulation_ends ({values['modulation_ends']}): "
                    "modulation would never run")
        if 0 <= values["opm_ends"] < first:
            return f"{prefix}opm_ends ({values['opm_ends']}) must be >= {first} or -1: OPM would never run"
        return None

    def active(self, epoch: int, opm: bool = False) -> bool:
        """Modulate in epochs [max(starts, warmup_epochs), ends], both ends inclusive, 0-based;
        for OPM `ends` is opm_ends when set."""
        last = self.opm_ends if opm and self.opm_ends >= 0 else self.modulation_ends
        return max(self.modulation_starts, self.warmup_epochs) <= epoch <= last


def modulation_defaults() -> dict[str, Any]:
    """{setting: default} of every modulation setting, read from ModulationConfig's fields."""
    return {f.name: f.default for f in fields(ModulationConfig)}


class Modulator:
    def __init__(
        self,
        config: ModulationConfig,
        encoder_parameters: tuple[list[nn.Parameter], ...],
        reduce_fn: ReduceFn | None = None,
        modality_names: tuple[str, ...] | None = None,
        head: nn.Module | None = None,
    ):
        self.config = config
        self.use_ogm, self.gaussian_noise, self.use_opm = METHODS[config.modulation]
        self.groups = [ogm_parameters(ps, config.ogm_params) for ps in encoder_parameters]
        # Under DDP the scores are summed over ranks so every rank sees the global batch.
        self.reduce_fn = reduce_fn
        self.stats: dict[str, torch.Tensor] = {}
        # Names for logging; stats tensors are indexed in this (the model's) modality order.
        self.modality_names = modality_names or tuple(str(i) for i in range(len(encoder_parameters)))
        # The fusion head, for --opm_grad official (scores that carry gradient to the encoders).
        self.head = head
        if self.use_opm and config.opm_grad == "official" and head is None:
            raise ValueError("--opm_grad official needs the fusion head (pass head=model.head)")

    @classmethod
    def from_config(cls, cfg: Any, model: nn.Module, reduce_fn: ReduceFn | None = None) -> "Modulator":
        config = ModulationConfig(**{f.name: getattr(cfg, f.name) for f in fields(ModulationConfig) if hasattr(cfg, f.name)})
        inner = unwrap_model(model)
        return cls(config, inner.encoder_parameters(), reduce_fn, tuple(inner.modality_names), getattr(inner, "head", None))

    def measure(self, unimodal_logits, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores s_m (summed over ranks) and ratios rho_m for this batch; recorded in `stats`."""
        scores = unimodal_scores(unimodal_logits, labels)
        if self.reduce_fn is not None:
            scores = self.reduce_fn(scores)
        ratios = discrepancy_ratios(scores)
        self.stats["score"], self.stats["ratio"] = scores, ratios
        return scores, ratios

    def feature_hook(self, labels: torch.Tensor, epoch: int) -> Callable | None:
        """OPM's feed-forward hook for this step, or None when OPM is off or outside its window."""
        if not (self.use_opm and self.config.active(epoch, opm=True)):
            return None

        def hook(out: dict):
            _, ratios = self.measure(out["unimodal_logits"], labels)
            if self.config.opm_grad == "official":
                ratios = self._ratios_with_grad(out["features"], labels)
            q = drop_probabilities(ratios, self.config.q_base, self.config.lam)
            features, sample_weight, keep = opm_feature_dropout(out["features"], q, self.config.p_exe, self.config.opm_grad)
            self.stats["drop_prob"] = q.detach()
            self.stats["kept"] = keep.float().mean(dim=0)
            return features, sample_weight

        return hook

    def _ratios_with_grad(self, features, labels: torch.Tensor) -> torch.Tensor:
        """rho from scores that keep their gradient to the encoders (the official OPM's theta path).

        Under DDP the value is the global batch's (as `measure`), the gradient flows through
        this rank's share of the sum.
        """
        scores = scores_with_grad(self.head.feature_logits(*features), labels)
        if self.reduce_fn is not None:
            scores = scores + (self.stats["score"] - scores).detach()
        return discrepancy_ratios(scores)

    def modulate_gradients(self, out: dict, labels: torch.Tensor, epoch: int) -> None:
        """Call between backward() and step(). Measures the discrepancy (for logging, every
        method) and, for OGM / OGM-GE inside the window, rescales the encoders' gradients."""
        if len(self.groups) != 2:  # a unimodal reference run: nothing to compare
            return
        active, opm_active = self.config.active(epoch), self.config.active(epoch, opm=True)
        if not (self.use_opm and opm_active):  # otherwise the OPM hook measured this very batch
            self.measure(out["unimodal_logits"], labels)
        if self.use_opm and not opm_active:
            self.stats["drop_prob"] = torch.zeros_like(self.stats["ratio"])
        if self.use_ogm:
            if active:
                k = ogm_coefficients(self.stats["ratio"], self.config.alpha, self.config.ogm_form)
                modulate_gradients_(self.groups, k, gaussian_noise=self.gaussian_noise)
            else:
                k = torch.ones_like(self.stats["ratio"])
            self.stats["coeff"] = k
