"""OGM, OGM-GE and OPM as small functions, plus `Modulator`, which a training loop calls twice a step."""
from .modulator import METHODS, ModulationConfig, Modulator, modulation_defaults
from .ogm import modulate_gradients_, ogm_coefficients, ogm_parameters
from .opm import opm_drop_probabilities, opm_feature_dropout
from .scores import discrepancy_ratios, unimodal_scores

__all__ = [
    "METHODS",
    "ModulationConfig",
    "Modulator",
    "discrepancy_ratios",
    "modulate_gradients_",
    "ogm_coefficients",
    "ogm_parameters",
    "opm_drop_probabilities",
    "opm_feature_dropout",
    "modulation_defaults",
    "unimodal_scores",
]
