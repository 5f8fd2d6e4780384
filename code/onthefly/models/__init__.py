"""Models: ResNet18 encoders and fusion heads, built from a DatasetInfo."""

from ..data.spec import DatasetInfo
from .av_model import FeatureHook, MultimodalClassifier, UnimodalClassifier
from .encoders import ENCODERS, FEATURE_DIM, RESNET18_WIDTH
from .fusion import FUSIONS, auxiliary_loss
from .init import INITS, init_weights


def build_model(
    info: DatasetInfo,
    fusion: str = "concat",
    modality: str = "both",
    init: str = "official",
    width: int = RESNET18_WIDTH,
):
    """The joint model over all of `info`'s modalities ("both" is its historical name; M >= 2),
    or with `modality` naming one stream, that stream's unimodal reference.

    `init`: "official" re-initialises every layer as the official code does (see models/init.py);
    "torch" keeps PyTorch's and torchvision's defaults. `width`: the encoders' first-stage
    channels (64: ResNet18; less: the same layout narrower, encoders.py).
    """
    if modality == "both":
        model = MultimodalClassifier(info, fusion=fusion, width=width)
    else:
        model = UnimodalClassifier(info, modality, width=width)
    return init_weights(model, init)


__all__ = [
    "ENCODERS",
    "FEATURE_DIM",
    "FUSIONS",
    "FeatureHook",
    "INITS",
    "MultimodalClassifier",
    "UnimodalClassifier",
    "auxiliary_loss",
    "build_model",
    "init_weights",
]
