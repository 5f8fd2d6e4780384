"""Models: ResNet18 encoders and fusion heads, built from a DatasetInfo."""
from ..data.spec import DatasetInfo
from .av_model import FeatureHook, MultimodalClassifier, UnimodalClassifier
from .encoders import ENCODERS, FEATURE_DIM
from .fusion import FUSIONS, auxiliary_loss


def build_model(info: DatasetInfo, fusion: str = "concat", modality: str = "both"):
    """The joint model, or with `modality` naming one stream, that stream's unimodal reference."""
    if modality == "both":
        return MultimodalClassifier(info, fusion=fusion)
    return UnimodalClassifier(info, modality)


__all__ = ["ENCODERS", "FEATURE_DIM", "FUSIONS", "FeatureHook", "MultimodalClassifier", "UnimodalClassifier", "auxiliary_loss", "build_model"]
