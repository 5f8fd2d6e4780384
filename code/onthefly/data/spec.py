"""What a dataset tells the rest of the code: its modalities, classes and input shapes.

Nothing outside `onthefly.data` knows a dataset by name; models, modulation and metrics
read a `DatasetInfo`, so class counts and input sizes are never hard-coded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModalitySpec:
    """One input stream.

    kind:
      "spectrogram": a float tensor (C, F, T) per sample, fed to a 2-D ResNet as an image.
      "frames":      a uint8 tensor (C, T, H, W) per sample; frames are folded into the
                     batch and the encoder averages features over time and space.
    """

    name: str
    kind: str
    channels: int
    shape: tuple[int, ...]  # per-sample shape as the loader yields it
    mean: tuple[float, ...] = ()  # per-channel normalisation for uint8 frames (on [0, 1])
    std: tuple[float, ...] = ()


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    class_names: tuple[str, ...]
    modalities: tuple[ModalitySpec, ...]  # M >= 1 streams (a joint model needs M >= 2)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [m.name for m in self.modalities]
        if not names:
            raise ValueError(f"dataset {self.name!r}: no modality")
        if len(set(names)) != len(names):
            raise ValueError(f"dataset {self.name!r}: modality names repeat: {names}")

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modalities)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetInfo:
        mods = tuple(
            ModalitySpec(**{**m, "shape": tuple(m["shape"]), "mean": tuple(m["mean"]), "std": tuple(m["std"])})
            for m in d["modalities"]
        )
        return cls(
            name=d["name"],
            num_classes=int(d["num_classes"]),
            class_names=tuple(d["class_names"]),
            modalities=mods,
            extra=dict(d.get("extra", {})),
        )
