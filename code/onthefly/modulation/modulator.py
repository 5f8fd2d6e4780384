"""The modulation API for any training loop (README: "Using the modulation in your own loop").

    modulator = Modulator.for_model(model, ModulationConfig(modulation="OGM_GE", alpha=0.5))
    ...
    out = model(inputs, feature_hook=modulator.feature_hook(labels, epoch))   # OPM (None otherwise)
    loss = ...; loss.backward()
    modulator.modulate_gradients(out, labels, epoch)                          # OGM / OGM-GE
    optimizer.step()

With gradient accumulation, `modulator.accumulate(out, labels)` after each micro-batch and
`modulator.modulate_gradients(epoch=epoch)` once before the step: the coefficients then come
from the scores summed over the step's micro-batches. The model must satisfy the contract of
`contract.py` (checked when the Modulator is built). Scores, ratios and coefficients stay on the
device; `modulator.stats` holds the latest ones for logging, the only place they are read on the host.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import torch
from torch import nn

from ..distributed import all_reduce_sum, is_distributed, shared_randomness
from ..utils import unwrap_model
from .contract import check_labels, check_model, check_output
from .ogm import OGM_FORMS, OGM_PARAMS, modulate_gradients_, ogm_coefficients, ogm_parameters
from .opm import OPM_GRADS, drop_probabilities, opm_feature_dropout
from .scores import RATIO_REFS, ReduceFn, discrepancy_ratios, scores_with_grad, unimodal_scores

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


# A field's annotation (a string under `from __future__ import annotations`) -> the values it takes.
_KINDS: dict[str, type | tuple[type, ...]] = {"float": (int, float), "int": int, "str": str}
_KIND_WORDS = {"float": "a number", "int": "an integer", "str": "a string"}


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
    ogm_params: str = _setting("matrices", "encoder gradients OGM scales: matrices (every weight with ndim >= 2; on "
                               "ResNet = conv), conv (4-D weights only, the released code's), all", choices=OGM_PARAMS)
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
    ratio_ref: str = _setting("mean_others", "M > 2: rho_m = s_m / (mean | min | sum of the other modalities' scores); "
                              "all equal s_a / s_b at M = 2 (docs/modalities.md)", choices=RATIO_REFS)

    def __post_init__(self) -> None:
        problem = self.check(asdict(self))
        if problem:
            raise ValueError(problem)

    @staticmethod
    def check(values: dict[str, Any], prefix: str = "") -> str | None:
        """The first problem with these settings (one line, each named `prefix + field`), or None."""
        for f in fields(ModulationConfig):
            value, meta, name = values[f.name], f.metadata, prefix + f.name
            kind = _KINDS[f.type]
            if not isinstance(value, kind) or isinstance(value, bool):
                return f"{name} must be {_KIND_WORDS[f.type]} (got {value!r}, a {type(value).__name__})"
            if kind is not str and not math.isfinite(value):
                return f"{name} must be a finite number (got {value})"
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
    """OGM / OGM-GE / OPM for a model of M >= 2 modalities (`contract.ModulatedModel`).

    Built with `for_model` (or `from_config`, from any object with ModulationConfig's fields),
    which checks the model's contract; the constructor takes the pieces directly. Refused at
    construction, each with one clear error: OGM or OPM on a model with one modality (there is
    no other to compare with), an OGM parameter set that selects nothing of an encoder.
    On a one-modality model (a unimodal reference run) only "none" is allowed, and it measures
    nothing by design: there is no ratio, so `stats` stays empty.
    """

    def __init__(
        self,
        config: ModulationConfig,
        encoder_parameters: tuple[list[nn.Parameter], ...],
        reduce_fn: ReduceFn | None = None,
        modality_names: tuple[str, ...] | None = None,
        head: nn.Module | None = None,
        noise_seed: int | None = None,
    ):
        self.config = config
        self.use_ogm, self.gaussian_noise, self.use_opm = METHODS[config.modulation]
        # Names for errors and logging; stats tensors are indexed in this (the model's) modality order.
        self.modality_names = tuple(modality_names or (str(i) for i in range(len(encoder_parameters))))
        if len(self.modality_names) != len(encoder_parameters):
            raise ValueError(f"{len(encoder_parameters)} encoder parameter groups for {len(self.modality_names)} "
                             f"modality names {self.modality_names}")
        self.num_modalities = len(self.modality_names)
        if self.num_modalities < 2 and (self.use_ogm or self.use_opm):
            raise ValueError(f"modulation {config.modulation} balances modalities against each other; this model has "
                             f"one ({', '.join(self.modality_names)}): use modulation none")
        self.groups = [ogm_parameters(ps, config.ogm_params) for ps in encoder_parameters]
        if self.use_ogm:
            empty = [n for n, g in zip(self.modality_names, self.groups) if not g]
            if empty:
                raise ValueError(f"ogm_params {config.ogm_params!r} selects no trainable parameter of the "
                                 f"{', '.join(empty)} encoder: OGM would change nothing there; choose another "
                                 f"of {', '.join(OGM_PARAMS)}")
        # A one-modality model has no discrepancy: with "none" there is nothing to measure.
        self.measures = self.num_modalities >= 2
        # Under DDP the scores are summed over ranks so every rank sees the global batch.
        self.reduce_fn = reduce_fn
        # OGM-GE noise under DDP: with a seed, every rank draws the same noise (see for_ddp).
        self.noise_seed = noise_seed
        self._noise_draws = 0
        self.stats: dict[str, torch.Tensor] = {}
        # The fusion head, for --opm_grad official (scores that carry gradient to the encoders).
        self.head = head
        if self.use_opm and config.opm_grad == "official" and head is None:
            raise ValueError("--opm_grad official needs the fusion head (pass head=model.head)")
        self._pending_scores: torch.Tensor | None = None  # sums of accumulate() since the last step
        self._labels_checked = False

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        config: ModulationConfig | None = None,
        reduce_fn: ReduceFn | None = None,
        noise_seed: int | None = None,
    ) -> "Modulator":
        """A Modulator for `model` (DDP-wrapped or not) after checking its contract (contract.py)."""
        config = config or ModulationConfig()
        inner = unwrap_model(model)
        check_model(inner, needs_feature_logits=METHODS[config.modulation][2] and config.opm_grad == "official")
        return cls(config, tuple(inner.encoder_parameters()), reduce_fn, tuple(inner.modality_names),
                   getattr(inner, "head", None), noise_seed)

    @classmethod
    def for_ddp(cls, model: nn.Module, config: ModulationConfig | None = None, seed: int = 0) -> "Modulator":
        """`for_model` set up for the running process group: scores summed over ranks (every rank
        sees the global batch's ratio) and OGM-GE's noise drawn alike on every rank (it is added to
        gradients DDP has already averaged; different draws would make the replicas drift).
        `seed` must be the same on every rank. In a single process this is `for_model`."""
        distributed = is_distributed()
        return cls.for_model(model, config, all_reduce_sum if distributed else None, seed if distributed else None)

    @classmethod
    def from_config(cls, cfg: Any, model: nn.Module, reduce_fn: ReduceFn | None = None) -> "Modulator":
        """`for_model` with the settings read from `cfg`'s attributes of ModulationConfig's field names."""
        config = ModulationConfig(**{f.name: getattr(cfg, f.name) for f in fields(ModulationConfig) if hasattr(cfg, f.name)})
        return cls.for_model(model, config, reduce_fn)

    def _check(self, out: Any, labels: torch.Tensor, keys: tuple[str, ...]) -> None:
        """The output's contract (metadata only) and, once, the labels' range (one host read)."""
        check_output(out, self.num_modalities, keys)
        if not self._labels_checked:
            check_labels(labels, out["unimodal_logits"][0].shape[1])
            self._labels_checked = True

    def _ratios(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores summed over ranks -> rho_m; both recorded in `stats`."""
        if self.reduce_fn is not None:
            scores = self.reduce_fn(scores)
        ratios = discrepancy_ratios(scores, self.config.ratio_ref)
        self.stats["score"], self.stats["ratio"] = scores, ratios
        return ratios

    def measure(self, unimodal_logits, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores s_m (summed over ranks) and ratios rho_m for this batch; recorded in `stats`."""
        ratios = self._ratios(unimodal_scores(unimodal_logits, labels))
        return self.stats["score"], ratios

    def accumulate(self, out: dict, labels: torch.Tensor) -> None:
        """Gradient accumulation: add this micro-batch's scores s_m to the optimiser step's sums.

        Call after each micro-batch's forward; then `modulate_gradients(epoch=epoch)` (no `out`,
        no `labels`) uses the sums, so k comes from every sample of the step, as with one big
        batch. OPM acts inside each micro-batch's forward and uses that micro-batch's ratio."""
        if not self.measures:
            return
        self._check(out, labels, ("unimodal_logits",))
        scores = unimodal_scores(out["unimodal_logits"], labels)
        self._pending_scores = scores if self._pending_scores is None else self._pending_scores + scores

    def feature_hook(self, labels: torch.Tensor, epoch: int) -> Callable | None:
        """OPM's feed-forward hook for this step, or None when OPM is off or outside its window."""
        if not (self.use_opm and self.config.active(epoch, opm=True)):
            return None

        def hook(out: dict):
            self._check(out, labels, ("features", "unimodal_logits"))
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
        return discrepancy_ratios(scores, self.config.ratio_ref)

    def modulate_gradients(self, out: dict | None = None, labels: torch.Tensor | None = None, epoch: int = 0) -> None:
        """Call between backward() and step(). Measures the discrepancy (for logging, every
        method) and, for OGM / OGM-GE inside the window, rescales the encoders' gradients.
        After `accumulate` calls, pass neither `out` nor `labels`: the step's sums are used."""
        if not self.measures:  # a one-modality model with "none" (see the class docstring)
            return
        active, opm_active = self.config.active(epoch), self.config.active(epoch, opm=True)
        pending, self._pending_scores = self._pending_scores, None
        if pending is not None:
            if out is not None or labels is not None:
                raise ValueError("accumulate() was called this step: call modulate_gradients(epoch=...) without "
                                 "out and labels (the accumulated scores are used)")
            self._ratios(pending)
        elif out is None or labels is None:
            raise ValueError("modulate_gradients needs the step's out and labels (or accumulate() calls before it)")
        elif not (self.use_opm and opm_active):  # otherwise the OPM hook measured this very batch
            self._check(out, labels, ("unimodal_logits",))
            self.measure(out["unimodal_logits"], labels)
        if self.use_opm and not opm_active:
            self.stats["drop_prob"] = torch.zeros_like(self.stats["ratio"])
        if self.use_ogm:
            self._require_gradients()
            if active:
                k = ogm_coefficients(self.stats["ratio"], self.config.alpha, self.config.ogm_form)
                draw = self._shared_noise() if self.gaussian_noise else nullcontext()
                with draw:
                    modulate_gradients_(self.groups, k, gaussian_noise=self.gaussian_noise)
            else:
                k = torch.ones_like(self.stats["ratio"])
            self.stats["coeff"] = k

    def _require_gradients(self) -> None:
        """OGM before backward() would scale nothing while `stats` showed a coefficient."""
        bare = [n for n, g in zip(self.modality_names, self.groups) if all(p.grad is None for p in g)]
        if bare:
            raise RuntimeError(f"modulate_gradients: the {', '.join(bare)} encoder has no gradient; call it after "
                               "loss.backward() and before optimizer.step() and zero_grad()")

    def _shared_noise(self):
        """With a noise seed (for_ddp), the same OGM-GE draw on every rank; otherwise this rank's stream."""
        if self.noise_seed is None:
            return nullcontext()
        self._noise_draws += 1
        device = self.groups[0][0].device
        return shared_randomness(self.noise_seed * 1_000_003 + self._noise_draws, device)
