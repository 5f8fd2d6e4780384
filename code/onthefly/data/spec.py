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
    modalities: tuple[ModalitySpec, ModalitySpec]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def modality_names(self) -> tuple[str, str]:
        return tuple(m.name for m in self.modalities)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetInfo":
        mods = tuple(
            ModalitySpec(**{**m, "shape": tuple(m["shape"]), "mean": tuple(m["mean"]), "std": tuple(m["std"])})
            for m in d["modalities"]
        )
        return cls(
            name=d["name"],
            num_classes=int(d["num_classes"]),
            class_names=tuple(d["class_names"]),
            modalities=mods,  # type: ignore[arg-type]
            extra=dict(d.get("extra", {})),
        )
