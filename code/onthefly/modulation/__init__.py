"""OGM, OGM-GE, OPM, the ablations and MMPareto / PMR as small functions, and `Modulator` for a training loop."""

from .contract import ContractError, FeatureHook, ModulatedModel, check_labels, check_model
from .modulator import METHODS, ModulationConfig, Modulator, modulation_defaults
from .ogm import OGM_PARAMS, modulate_gradients_, ogm_coefficients, ogm_parameters
from .opm import opm_drop_probabilities, opm_feature_dropout
from .scores import RATIO_REFS, discrepancy_ratios, unimodal_scores

__all__ = [
    "METHODS",
    "OGM_PARAMS",
    "RATIO_REFS",
    "ContractError",
    "FeatureHook",
    "ModulatedModel",
    "ModulationConfig",
    "Modulator",
    "check_labels",
    "check_model",
    "discrepancy_ratios",
    "modulate_gradients_",
    "ogm_coefficients",
    "ogm_parameters",
    "opm_drop_probabilities",
    "opm_feature_dropout",
    "modulation_defaults",
    "unimodal_scores",
]
