"""The modulation API for any training loop (README: "Using the modulation in your own loop").

    modulator = Modulator.for_model(model, ModulationConfig(modulation="OGM_GE", alpha=0.5))
    ...
    out = model(inputs, feature_hook=modulator.feature_hook(labels, epoch))   # OPM (None otherwise)
    loss = ...; loss.backward()
    modulator.modulate_gradients(out, labels, epoch)                          # OGM / OGM-GE
    optimizer.step()

Methods with a loss term of their own (UNIMODAL_AUX, MMPARETO, PMR) need one more call, whose
result the loop adds to its loss before backward(), and PMR one per epoch:

    modulator.begin_epoch(model, loader, preset, epoch)                      # PMR's prototypes
    loss = loss + modulator.auxiliary_loss(out, labels, epoch, loss)         # before backward()

With gradient accumulation, `modulator.accumulate(out, labels)` after each micro-batch and
`modulator.modulate_gradients(epoch=epoch)` once before the step: the coefficients then come
from the scores summed over the step's micro-batches. The model must satisfy the contract of
`contract.py` (checked when the Modulator is built). Scores, ratios and coefficients stay on the
device; `modulator.stats` holds the latest ones for logging, the only place they are read on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from itertools import islice
from typing import Any

import torch
from torch import nn

from ..distributed import all_reduce_sum, is_distributed, shared_randomness
from ..utils import unwrap_model
from .ablations import constant_coefficients, uniform_drop_probabilities, unimodal_cross_entropy
from .contract import check_labels, check_model, check_output
from .mmpareto import integrate_gradients
from .ogm import OGM_FORMS, OGM_PARAMS, modulate_gradients_, ogm_coefficients, ogm_parameters
from .opm import OPM_GRADS, drop_probabilities, opm_feature_dropout
from .pmr import PROTOTYPE_FRACTION, class_sums, pmr_loss, pmr_weights, prototype_logits, prototypes_from_sums
from .scores import RATIO_REFS, ReduceFn, discrepancy_ratios, scores_with_grad, unimodal_scores


@dataclass(frozen=True)
class Method:
    """What a method does in a step: to the encoders' gradients, to the features, to the loss."""

    gradients: str | None = None  # "ogm" (k from the ratio), "const" (a fixed k), "mmpareto"
    noise: bool = False  # OGM-GE's Gaussian noise on the modulated gradients
    dropout: str | None = None  # "opm" (q from the ratio), "uniform" (a fixed q)
    loss: str | None = None  # "unimodal" (CE of each z_m), "pmr" (prototypical CE of the lagging modality)

    @property
    def scales_ogm_groups(self) -> bool:
        return self.gradients in ("ogm", "const")


METHODS: dict[str, Method] = {
    "none": Method(),
    "OGM": Method(gradients="ogm"),
    "OGM_GE": Method(gradients="ogm", noise=True),
    "OPM": Method(dropout="opm"),
    "OGM_OPM": Method(gradients="ogm", dropout="opm"),
    "OGM_GE_OPM": Method(gradients="ogm", noise=True, dropout="opm"),  # the journal code's combined run
    # Ablations without the on-the-fly discrepancy (ablations.py).
    "OGM_CONST": Method(gradients="const"),
    "DROPOUT_UNIFORM": Method(dropout="uniform"),
    "UNIMODAL_AUX": Method(loss="unimodal"),
    # Published alternatives (mmpareto.py, pmr.py).
    "MMPARETO": Method(gradients="mmpareto", loss="unimodal"),
    "PMR": Method(loss="pmr"),
}


def _setting(
    default: Any, help: str, choices: tuple | None = None, low: float | None = None, high: float | None = None
):
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
    ogm_form: str = _setting(
        "official", "official: k = 1 - tanh(alpha rho); continuous: 1 - tanh(alpha (rho - 1))", choices=OGM_FORMS
    )
    ogm_params: str = _setting(
        "matrices",
        "encoder gradients OGM scales: matrices (every weight with ndim >= 2; on "
        "ResNet = conv), conv (4-D weights only, the released code's), all",
        choices=OGM_PARAMS,
    )
    q_base: float = _setting(0.5, "OPM base drop probability q_base", low=0.0, high=1.0)
    lam: float = _setting(0.5, "OPM: growth lambda of the drop probability with the discrepancy", low=0.0)
    p_exe: float = _setting(0.7, "OPM: probability that a batch is modulated at all", low=0.0, high=1.0)
    modulation_starts: int = _setting(0, "first epoch (0-based, inclusive) with modulation", low=0)
    modulation_ends: int = _setting(10**9, "last epoch (0-based, inclusive) with modulation", low=0)
    warmup_epochs: int = _setting(0, "epochs of plain joint training before any modulation", low=0)
    # The journal code ends only OGM at modulation_ends and runs OPM to the last epoch: "OGM until
    # E1, OPM until E2" is modulation_ends E1, opm_ends E2.
    opm_ends: int = _setting(-1, "last epoch (0-based, inclusive) with OPM (-1: modulation_ends)", low=-1)
    opm_grad: str = _setting(
        "clean",
        "OPM's gradient: clean (none through q), or official (the released code's theta-as-gradient)",
        choices=OPM_GRADS,
    )
    ratio_ref: str = _setting(
        "mean_others",
        "M > 2: rho_m = s_m / (mean | min | sum of the other modalities' scores); "
        "all equal s_a / s_b at M = 2 (docs/modalities.md)",
        choices=RATIO_REFS,
    )
    const_dominant: str = _setting(
        "", "OGM_CONST: the modality whose gradients are always scaled (e.g. the one that is best trained alone)"
    )
    const_k: float = _setting(
        0.5, "OGM_CONST: the constant coefficient k on that modality's gradients", low=0.0, high=1.0
    )
    drop_prob: float = _setting(
        0.3,
        "DROPOUT_UNIFORM: every modality's drop probability (p_exe still gates each batch, as in OPM); must be < 1",
        low=0.0,
        high=1.0,
    )
    aux_weight: float = _setting(
        1.0, "UNIMODAL_AUX: weight of the unimodal cross-entropies added to the joint loss", low=0.0
    )
    pareto_gamma: float = _setting(
        1.5, "MMPARETO: magnitude factor gamma of the integrated gradient (1.5 as released)", low=0.0
    )
    pmr_alpha: float = _setting(1.0, "PMR: weight alpha of the lagging modality's prototypical cross-entropy", low=0.0)
    pmr_momentum: float = _setting(
        0.0,
        "PMR: weight of the previous prototypes when they are recomputed each epoch "
        "(0, the released scripts' value, keeps a resumed run exact)",
        low=0.0,
        high=1.0,
    )

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
        if values["modulation"] == "OGM_CONST" and not values["const_dominant"]:
            return f"{prefix}modulation OGM_CONST needs {prefix}const_dominant: the modality whose gradients it scales"
        if values["drop_prob"] >= 1:
            return (
                f"{prefix}drop_prob must be < 1: dropping every modality of every sample leaves nothing (got "
                f"{values['drop_prob']})"
            )
        first = max(values["modulation_starts"], values["warmup_epochs"])
        if first > values["modulation_ends"]:  # the window would be empty: modulation never runs
            which = "modulation_starts" if values["modulation_starts"] >= values["warmup_epochs"] else "warmup_epochs"
            return (
                f"{prefix}{which} ({first}) must be <= {prefix}modulation_ends ({values['modulation_ends']}): "
                "modulation would never run"
            )
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
    """Every method of METHODS for a model of M >= 2 modalities (`contract.ModulatedModel`).

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
        self.method = METHODS[config.modulation]
        self.use_ogm, self.gaussian_noise = self.method.scales_ogm_groups, self.method.noise
        self.use_opm = self.method.dropout is not None
        # Names for errors and logging; stats tensors are indexed in this (the model's) modality order.
        self.modality_names = tuple(modality_names or (str(i) for i in range(len(encoder_parameters))))
        if len(self.modality_names) != len(encoder_parameters):
            raise ValueError(
                f"{len(encoder_parameters)} encoder parameter groups for {len(self.modality_names)} "
                f"modality names {self.modality_names}"
            )
        self.num_modalities = len(self.modality_names)
        if self.num_modalities < 2 and self.method != METHODS["none"]:
            raise ValueError(
                f"modulation {config.modulation} balances modalities against each other; this model has "
                f"one ({', '.join(self.modality_names)}): use modulation none"
            )
        self.groups = [ogm_parameters(ps, config.ogm_params) for ps in encoder_parameters]
        if self.use_ogm:
            empty = [n for n, g in zip(self.modality_names, self.groups) if not g]
            if empty:
                raise ValueError(
                    f"ogm_params {config.ogm_params!r} selects no trainable parameter of the "
                    f"{', '.join(empty)} encoder: OGM would change nothing there; choose another "
                    f"of {', '.join(OGM_PARAMS)}"
                )
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
        if self.method.dropout == "opm" and config.opm_grad == "official" and head is None:
            raise ValueError("--opm_grad official needs the fusion head (pass head=model.head)")
        self._pending_scores: torch.Tensor | None = None  # sums of accumulate() since the last step
        self._labels_checked = False
        self._check_method_needs(encoder_parameters)

    def _check_method_needs(self, encoder_parameters: tuple[list[nn.Parameter], ...]) -> None:
        """What the ablations and the published alternatives need, refused at construction."""
        config, method = self.config, self.method
        if method.gradients == "const":
            if config.const_dominant not in self.modality_names:
                raise ValueError(
                    f"const_dominant {config.const_dominant!r} is not a modality of this model "
                    f"({', '.join(self.modality_names)})"
                )
            self.const_index = self.modality_names.index(config.const_dominant)
        if method.loss == "unimodal" and (self.head is None or getattr(self.head, "has_auxiliary_classifiers", True)):
            raise ValueError(
                f"{config.modulation} trains each modality's share z_m of the fusion head; it needs a "
                "head whose z_m are shares of the fused output (concat or sum fusion), passed as head="
            )
        if method.gradients == "mmpareto":
            if self.reduce_fn is not None:
                raise ValueError(
                    "MMPARETO takes each loss's gradient with torch.autograd.grad, which DDP does not "
                    "synchronise: run it in one process"
                )
            self.encoders = [[p for p in ps if p.requires_grad] for ps in encoder_parameters]
            self._pareto_grads: list[tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None
        self.prototypes: list[torch.Tensor] | None = None  # PMR: (K, d_m) per modality

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        config: ModulationConfig | None = None,
        reduce_fn: ReduceFn | None = None,
        noise_seed: int | None = None,
    ) -> Modulator:
        """A Modulator for `model` (DDP-wrapped or not) after checking its contract (contract.py)."""
        config = config or ModulationConfig()
        inner = unwrap_model(model)
        official_opm = METHODS[config.modulation].dropout == "opm" and config.opm_grad == "official"
        check_model(inner, needs_feature_logits=official_opm)
        return cls(
            config,
            tuple(inner.encoder_parameters()),
            reduce_fn,
            tuple(inner.modality_names),
            getattr(inner, "head", None),
            noise_seed,
        )

    @classmethod
    def for_ddp(cls, model: nn.Module, config: ModulationConfig | None = None, seed: int = 0) -> Modulator:
        """`for_model` set up for the running process group: scores summed over ranks (every rank
        sees the global batch's ratio) and OGM-GE's noise drawn alike on every rank (it is added to
        gradients DDP has already averaged; different draws would make the replicas drift).
        `seed` must be the same on every rank. In a single process this is `for_model`."""
        distributed = is_distributed()
        return cls.for_model(model, config, all_reduce_sum if distributed else None, seed if distributed else None)

    @classmethod
    def from_config(cls, cfg: Any, model: nn.Module, reduce_fn: ReduceFn | None = None) -> Modulator:
        """`for_model` with the settings read from `cfg`'s attributes of ModulationConfig's field names."""
        config = ModulationConfig(
            **{f.name: getattr(cfg, f.name) for f in fields(ModulationConfig) if hasattr(cfg, f.name)}
        )
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
        if self.method.gradients == "mmpareto":
            raise ValueError(
                "MMPARETO integrates the gradients of one batch's losses: gradient accumulation is not supported"
            )
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
            if self.method.dropout == "uniform":
                q = uniform_drop_probabilities(self.num_modalities, self.config.drop_prob, ratios.device)
            elif self.config.opm_grad == "official":
                q = drop_probabilities(
                    self._ratios_with_grad(out["features"], labels), self.config.q_base, self.config.lam
                )
            else:
                q = drop_probabilities(ratios, self.config.q_base, self.config.lam)
            features, sample_weight, keep = opm_feature_dropout(
                out["features"], q, self.config.p_exe, self.config.opm_grad
            )
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
                raise ValueError(
                    "accumulate() was called this step: call modulate_gradients(epoch=...) without "
                    "out and labels (the accumulated scores are used)"
                )
            self._ratios(pending)
        elif out is None or labels is None:
            raise ValueError("modulate_gradients needs the step's out and labels (or accumulate() calls before it)")
        elif not (self.use_opm and opm_active):  # otherwise the OPM hook measured this very batch
            self._check(out, labels, ("unimodal_logits",))
            self.measure(out["unimodal_logits"], labels)
        if self.use_opm and not opm_active:
            self.stats["drop_prob"] = torch.zeros_like(self.stats["ratio"])
        if self.method.gradients == "mmpareto":
            self._integrate_pareto(active)
        if self.use_ogm:
            self._require_gradients()
            if active and self.method.gradients == "const":
                k = constant_coefficients(
                    self.num_modalities, self.const_index, self.config.const_k, self.stats["ratio"].device
                )
                modulate_gradients_(self.groups, k)
            elif active:
                k = ogm_coefficients(self.stats["ratio"], self.config.alpha, self.config.ogm_form)
                draw = self._shared_noise() if self.gaussian_noise else nullcontext()
                with draw:
                    modulate_gradients_(self.groups, k, gaussian_noise=self.gaussian_noise)
            else:
                k = torch.ones_like(self.stats["ratio"])
            self.stats["coeff"] = k

    def auxiliary_loss(self, out: dict, labels: torch.Tensor, epoch: int, joint_loss: torch.Tensor) -> torch.Tensor:
        """The method's own loss term (0 for the others); add it to the loss before backward().

        UNIMODAL_AUX and MMPARETO: aux_weight x sum_m CE(z_m, y) (MMPARETO: weight 1, as released),
        with z_m the head's shares computed with gradient to the encoders and the head. MMPARETO
        also takes here, from the still-alive graph, the gradient of the joint loss and of each
        unimodal loss with respect to each encoder (`modulate_gradients` integrates them).
        PMR: alpha x the prototypical cross-entropy of each lagging modality (pmr.py).
        """
        if self.method.loss is None or not self.config.active(epoch):
            return joint_loss.new_zeros(())
        self._check(out, labels, ("features", "unimodal_logits"))
        if self.method.loss == "pmr":
            return self._pmr_loss(out["features"], labels)
        with torch.autocast(labels.device.type, enabled=False):
            shares = self.head.shares(tuple(h.float() for h in out["features"]), detach_head=False)
        unimodal = [torch.nn.functional.cross_entropy(z, labels) for z in shares]
        if self.method.gradients == "mmpareto":
            self._pareto_grads = [
                (self._grads(joint_loss, ps), self._grads(loss, ps)) for ps, loss in zip(self.encoders, unimodal)
            ]
            return torch.stack(unimodal).sum()
        return self.config.aux_weight * unimodal_cross_entropy(shares, labels)

    @staticmethod
    def _grads(loss: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    def _integrate_pareto(self, active: bool) -> None:
        """MMPareto: each encoder's gradient <- the integration of its joint and unimodal gradients."""
        pending, self._pareto_grads = self._pareto_grads, None
        if not active:
            return
        if pending is None:
            raise RuntimeError(
                "MMPARETO: call auxiliary_loss(out, labels, epoch, loss) before backward(); its "
                "gradients are what modulate_gradients integrates"
            )
        joint_weights = []
        for params, (g_mm, g_uni) in zip(self.encoders, pending):
            grads, weights = integrate_gradients(g_mm, g_uni, self.config.pareto_gamma)
            for p, g in zip(params, grads):
                p.grad = g.to(p.dtype)
            joint_weights.append(weights[0])
        self.stats["pareto_w_joint"] = torch.stack(joint_weights).float()  # 0.5: no conflict in that encoder

    def _pmr_loss(self, features: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        if self.prototypes is None:
            raise RuntimeError(
                "PMR: call begin_epoch(model, loader, preset, epoch) before the epoch's first step; "
                "it computes the class prototypes"
            )
        logits = [prototype_logits(h, p.to(h.device)) for h, p in zip(features, self.prototypes)]
        scores = unimodal_scores(logits, labels)
        if self.reduce_fn is not None:
            scores = self.reduce_fn(scores)
        ratios = discrepancy_ratios(scores, self.config.ratio_ref)
        weights = pmr_weights(ratios, self.config.pmr_alpha)
        self.stats["proto_ratio"], self.stats["pmr_weight"] = ratios, weights
        return pmr_loss(logits, labels, weights)

    @torch.no_grad()
    def begin_epoch(self, model: nn.Module, loader: Iterable, preset: Callable, epoch: int) -> None:
        """PMR: recompute the class prototypes from the first tenth of `loader`'s batches, in
        evaluation mode, blended from epoch 2 on with the previous ones by pmr_momentum (the
        released script does this before the first epoch and after every epoch). Nothing to do
        for the other methods."""
        if self.method.loss != "pmr":
            return
        was_training = model.training
        model.eval()
        sums = counts = None
        for batch in islice(loader, max(1, len(loader) // PROTOTYPE_FRACTION)):
            inputs, labels = preset(batch)
            out = model(inputs)
            num_classes = out["unimodal_logits"][0].shape[1]
            parts = [class_sums(h, labels, num_classes) for h in out["features"]]
            batch_sums, batch_counts = [s for s, _ in parts], parts[0][1]
            sums = batch_sums if sums is None else [a + b for a, b in zip(sums, batch_sums)]
            counts = batch_counts if counts is None else counts + batch_counts
        model.train(was_training)
        if self.reduce_fn is not None:
            sums, counts = [self.reduce_fn(s) for s in sums], self.reduce_fn(counts)
        # As released: the prototypes of epochs 0 and 1 are fresh class means, blending starts at epoch 2
        # (the script's update after epoch e blends only for e >= 1).
        blend = epoch >= 2 and self.config.pmr_momentum > 0
        if blend and self.prototypes is None:
            raise RuntimeError(
                f"PMR with pmr_momentum {self.config.pmr_momentum} at epoch {epoch} blends the "
                "previous epoch's prototypes, which this Modulator does not have (a resumed run: "
                "restore them with load_state_dict from the checkpoint's modulator state, or use "
                "pmr_momentum 0)"
            )
        previous = self.prototypes if blend else [None] * self.num_modalities
        self.prototypes = [prototypes_from_sums(s, counts, p, self.config.pmr_momentum) for s, p in zip(sums, previous)]

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep for an exact resume: PMR's prototypes (nothing for the others)."""
        return {"prototypes": None if self.prototypes is None else [p.detach().cpu() for p in self.prototypes]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        prototypes = state.get("prototypes")
        if prototypes is not None and len(prototypes) != self.num_modalities:
            raise ValueError(f"{len(prototypes)} prototype sets for {self.num_modalities} modalities")
        self.prototypes = None if prototypes is None else list(prototypes)  # moved to the features' device in use

    def _require_gradients(self) -> None:
        """OGM before backward() would scale nothing while `stats` showed a coefficient."""
        bare = [n for n, g in zip(self.modality_names, self.groups) if all(p.grad is None for p in g)]
        if bare:
            raise RuntimeError(
                f"modulate_gradients: the {', '.join(bare)} encoder has no gradient; call it after "
                "loss.backward() and before optimizer.step() and zero_grad()"
            )

    def _shared_noise(self):
        """With a noise seed (for_ddp), the same OGM-GE draw on every rank; otherwise this rank's stream."""
        if self.noise_seed is None:
            return nullcontext()
        self._noise_draws += 1
        device = self.groups[0][0].device
        return shared_randomness(self.noise_seed * 1_000_003 + self._noise_draws, device)
