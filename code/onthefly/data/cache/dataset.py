"""One split of a cache as a torch Dataset: array slices and copies per sample, no decoding."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ...errors import UserError
from .format import FLOW_HALF, FRAME_CROPS, FRAME_PICKS, SPLITS, stored_frame_size
from .reader import CacheReader


def first_frames(count: int, t: int) -> list[int]:
    """CREMA-D's official frame: the official loader opens the first file os.listdir returns, in
    training and evaluation. Directory order is not defined, so here: the first stored frame
    (time 0), and the next ones when more frames are asked for."""
    return [min(k, count - 1) for k in range(t)]


def first_middle_last(count: int, t: int) -> list[int]:
    """Kinetics-Sounds' official frames: first, middle ((n - 1) // 2) and last; t evenly spaced
    frames from the first to the last in general."""
    if t == 1:
        return [0]
    return [int(k * (count - 1) / (t - 1)) for k in range(t)]


Crop = tuple[int, int, int, int, bool]  # top, left, height, width of the region; horizontal flip


@dataclass(frozen=True)
class OfficialFrames:
    """A dataset's official frame choice and crop. Training: torchvision's RandomResizedCrop
    (area `scale`, aspect 3/4-4/3) and a flip with probability 1/2, one draw per clip shared by
    every frame and every frames modality; evaluation: the whole frame squeezed to size x size
    (`eval_squeeze`), or Resize(size) of the short side then CenterCrop(size). Bilinear with
    antialiasing, uint8 out; random draws use torch's generator, which the loader seeds per sample."""

    pick: Callable[[int, int], list[int]]
    scale: tuple[float, float]
    eval_squeeze: bool
    pick_words: str
    crop_words: str

    def draw(self, frames: torch.Tensor) -> Crop:
        from torchvision.transforms import RandomResizedCrop

        top, left, h, w = RandomResizedCrop.get_params(frames, scale=self.scale, ratio=(3 / 4, 4 / 3))
        return top, left, h, w, bool(torch.rand(()) < 0.5)

    def apply(self, clip: torch.Tensor, size: int, crop: Crop | None) -> torch.Tensor:
        """(C, T, H, W) uint8 -> (C, T, size, size): the drawn region (its flip is the caller's, as
        flow needs more than a mirror), or with `crop` None the evaluation transform."""
        from torchvision.transforms import functional as TF

        if crop is None:
            if self.eval_squeeze:
                return TF.resize(clip, [size, size], antialias=True)
            return TF.center_crop(TF.resize(clip, size, antialias=True), [size, size])
        top, left, h, w, _ = crop
        return TF.resized_crop(clip, top, left, h, w, [size, size], antialias=True)


OFFICIAL_FRAMES: dict[str, OfficialFrames] = {
    # OGM-GE_CVPR2022 dataset/CramedDataset.py: RandomResizedCrop(224) + flip, Resize((224, 224))
    "cremad": OfficialFrames(
        first_frames,
        (0.08, 1.0),
        True,
        "the first stored frame, training and evaluation",
        "RandomResizedCrop(area 0.08-1) of the whole frame + flip; evaluation: whole frame resized",
    ),
    # BML_TPAMI2024 code/dataset/KS.py and spatial_transforms.py
    "kinetics_sounds": OfficialFrames(
        first_middle_last,
        (0.25, 1.0),
        False,
        "first, middle and last stored frames, training and evaluation",
        "RandomResizedCrop(area 0.25-1) + flip shared by the frames; evaluation: Resize + CenterCrop",
    ),
}


def pick_frames(count: int, t: int, train: bool, rng: random.Random | None = None) -> list[int]:
    """Indices of `t` frames out of `count` stored ones.

    Evaluation: evenly spread (centre of each of t equal segments), deterministic.
    Training: a random sorted choice without repetition when count >= t, else with repetition.
    """
    if count <= 0:
        raise ValueError("clip without frames")
    if not train:
        return [min(count - 1, int((k + 0.5) * count / t)) for k in range(t)]
    r = rng or random
    if count >= t:
        return sorted(r.sample(range(count), t))
    return sorted(r.randrange(count) for _ in range(t))


class CachedClips(Dataset):
    """One split of a cache (its first `limit` clips when given). Items: {<modality>: tensor,
    "label": int, "index": position within the split, as for every dataset (data/registry.py)}.

    spectrogram modality -> float32 (1, F, T); frames modality -> uint8 (C, T, crop, crop).
    Training: random frames, one random crop and one flip shared by every frame and every
    frames modality of the clip (the flow u channel changes sign under the flip).
    Evaluation: evenly spread frames, centre crop, no flip. `frame_pick` / `frame_crop`
    "official": the dataset's official rule instead (OFFICIAL_FRAMES), shared the same way.
    """

    def __init__(
        self,
        path: str,
        split: str,
        num_frames: int,
        crop_size: int,
        train: bool,
        verify: bool = True,
        limit: int | None = None,
        frame_crop: str = "fixed",
        frame_pick: str = "spread",
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if frame_crop not in FRAME_CROPS:
            raise UserError(f"--frame_crop: unknown {frame_crop!r}; choose one of {', '.join(FRAME_CROPS)}")
        if frame_pick not in FRAME_PICKS:
            raise UserError(f"--frame_pick: unknown {frame_pick!r}; choose one of {', '.join(FRAME_PICKS)}")
        reader = CacheReader(path, verify=verify)
        dataset = reader.meta["dataset"]
        for option, value in (("--frame_crop", frame_crop), ("--frame_pick", frame_pick)):
            if value == "official" and dataset not in OFFICIAL_FRAMES:
                raise UserError(
                    f"{option} official: no official frame rule is known for {dataset} "
                    f"(known: {', '.join(OFFICIAL_FRAMES)})"
                )
        self.official = OFFICIAL_FRAMES.get(dataset)
        self.path = path
        self.split = split
        self.train = train
        self.num_frames = int(num_frames)
        self.crop_size = int(crop_size)
        self.meta = reader.meta
        self.records = reader.records
        self.modalities = [rec["name"] for rec in reader.meta["arrays"]]
        rows = np.array([i for i, s in enumerate(reader.index["splits"]) if s == split], dtype=np.int64)
        if rows.size == 0:
            raise UserError(f"--data {path}: the {split} split is empty; preprocess again with other split fractions")
        self.rows = rows[:limit]
        self.labels = np.asarray(reader.index["labels"], dtype=np.int64)[self.rows]
        self.clip_ids = [reader.index["clip_ids"][i] for i in self.rows]
        self.offsets = {
            name: np.asarray(reader.index["offsets"][name], dtype=np.int64)
            for name, rec in self.records.items()
            if rec["kind"] == "frames"
        }
        height, width = stored_frame_size(reader.meta["params"])
        if self.crop_size > min(height, width):
            raise UserError(f"crop size {self.crop_size} is larger than the cached frames ({height}x{width}) in {path}")
        if frame_crop == "official" and dataset == "cremad" and height == width:
            raise UserError(
                f"--frame_crop official crops the whole frame, but {path} stores centre squares; "
                "preprocess CREMA-D again (whole frames are the default now) or pass --frame_crop fixed"
            )
        self.frame_crop = frame_crop
        self.frame_pick = frame_pick
        self._arrays: dict[str, np.ndarray] | None = reader.arrays

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = None  # each DataLoader worker maps the files itself
        return state

    def _maps(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {
                name: np.load(os.path.join(self.path, rec["file"]), mmap_mode="r") for name, rec in self.records.items()
            }
        return self._arrays

    def __getitem__(self, i: int) -> dict[str, Any]:
        arrays = self._maps()
        row = int(self.rows[i])
        item: dict[str, Any] = {"label": int(self.labels[i]), "index": int(i)}
        picks = None
        crop = self.crop_size
        y0 = x0 = 0
        flip = False
        drawn: Crop | None = None  # the official crop's one draw, shared by every frames modality
        for name in self.modalities:
            arr = arrays[name]
            if self.records[name]["kind"] == "spectrogram":
                spec = torch.from_numpy(np.array(arr[row])).float()  # torch converts half fast
                # Damage the sampled fingerprint of a large file can miss: a sum of log magnitudes
                # is finite exactly when every value is (and costs a tenth of an isfinite on half).
                if not torch.isfinite(spec.sum()):
                    raise UserError(
                        f"{os.path.join(self.path, self.records[name]['file'])}: NaN or infinite values "
                        f"for clip {self.clip_ids[i]}; check the cache with python code/preprocess.py "
                        f"--verify {self.path}"
                    )
                item[name] = spec
                continue
            off = self.offsets[name]
            start, stop = int(off[row]), int(off[row + 1])
            if picks is None:  # the same frames, crop and flip for every frames modality
                picks = self._pick(stop - start)
                height, width = arr.shape[-2:]
                if self.train:
                    y0 = random.randint(0, height - crop)
                    x0 = random.randint(0, width - crop)
                    flip = random.random() < 0.5
                else:
                    y0, x0 = (height - crop) // 2, (width - crop) // 2
            if self.frame_crop == "official":
                whole = torch.from_numpy(np.array(self._frames(arr, start, picks).transpose(1, 0, 2, 3)))  # a copy
                if self.train and drawn is None:
                    drawn = self.official.draw(whole)
                out = self.official.apply(whole, crop, drawn)
                flip = drawn is not None and drawn[4]
            else:
                clip = self._frames(arr, start, picks)[:, :, y0 : y0 + crop, x0 : x0 + crop]
                out = torch.from_numpy(np.ascontiguousarray(clip.transpose(1, 0, 2, 3)))  # (C, T, H, W)
            if flip:
                out = out.flip(-1)
                if name == "flow":  # u changes sign under a horizontal flip
                    out[0] = 2 * FLOW_HALF - out[0]
            item[name] = out
        return item

    def _pick(self, count: int) -> list[int]:
        if self.frame_pick == "official":
            return self.official.pick(count, self.num_frames)
        return pick_frames(count, self.num_frames, self.train)

    def describe_frames(self) -> str:
        """The frame rule in words (logged when training starts)."""
        pick = (
            f"official ({self.official.pick_words})"
            if self.frame_pick == "official"
            else "spread (random in training, evenly spread in evaluation)"
        )
        crop = (
            f"official ({self.official.crop_words})"
            if self.frame_crop == "official"
            else "fixed (a random crop and flip in training, the centre crop in evaluation)"
        )
        return f"frame rule: {self.num_frames} frame(s) of {self.crop_size} px; pick {pick}; crop {crop}"

    @staticmethod
    def _frames(arr: np.ndarray, start: int, picks: list[int]) -> np.ndarray:
        """Rows start + picks of a frames array (T, C, H, W): one slice when they are consecutive."""
        first = start + picks[0]
        if picks == list(range(picks[0], picks[0] + len(picks))):
            return arr[first : first + len(picks)]
        return arr[[start + p for p in picks]]
