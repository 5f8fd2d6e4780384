"""Fixtures shared by the test modules.

`onthefly` is imported as installed by the README's set-up (requirements.txt installs it,
editable); without installing, run pytest with PYTHONPATH=code.
"""

from __future__ import annotations

import contextlib
import runpy
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from onthefly.data.spec import DatasetInfo, ModalitySpec
from onthefly.models.encoders import ENCODERS, RESNET18_WIDTH, FrameEncoder, SpectrogramEncoder, feature_dim

REPO = Path(__file__).resolve().parents[1]

# `--dist loadfile` hands whole files to the two workers in collection order; starting with
# the longest (measured) keeps their totals close: longest-processing-time-first scheduling.
LONGEST_FILES_FIRST = (
    "test_fault_tolerance.py",
    "test_launchers.py",
    "test_fidelity.py",
    "test_datasets_raw.py",
    "test_fast_path.py",
    "test_sweep.py",
    "test_ddp.py",
    "test_core_models.py",
    "test_examples.py",
    "test_imports.py",
    "test_three_modalities.py",
    "test_core_train.py",
    "test_core_modulation.py",
    "test_datasets_cache.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other files keep their order


# --------------------------------------------------------------------------- tiny encoders


def _tiny_trunk(in_channels: int, width: int = RESNET18_WIDTH) -> nn.Module:
    """One strided conv, BatchNorm, pooling and a linear map to the encoders' feature size.

    The layer names follow ResNet's (conv1, bn1) so code that reaches for the stem finds it.
    """
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_channels, 8, kernel_size=3, stride=2, padding=1, bias=False),
            bn1=nn.BatchNorm2d(8),
            relu=nn.ReLU(inplace=True),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(8, feature_dim(width)),
        )
    )


class TinySpectrogramEncoder(SpectrogramEncoder):
    """SpectrogramEncoder's forward on a tiny trunk."""

    def __init__(self, in_channels: int = 1, width: int = RESNET18_WIDTH):
        nn.Module.__init__(self)  # not SpectrogramEncoder.__init__: it would build a ResNet18 first
        self.net = _tiny_trunk(in_channels, width)


class TinyFrameEncoder(FrameEncoder):
    """FrameEncoder's forward (frames folded into the batch, features averaged) on a tiny trunk."""

    def __init__(self, in_channels: int = 3, width: int = RESNET18_WIDTH):
        nn.Module.__init__(self)  # not FrameEncoder.__init__: it would build a ResNet18 first
        self.net = _tiny_trunk(in_channels, width)


TINY_ENCODERS = {"spectrogram": TinySpectrogramEncoder, "frames": TinyFrameEncoder}


@contextlib.contextmanager
def swap_in_tiny_encoders() -> Iterator[None]:
    """Within the block, build_model makes tiny encoders. The fixtures below are the way in for
    tests; a training process of its own gets it with runpy.run_path (test_fault_tolerance.py)."""
    with pytest.MonkeyPatch.context() as patch:
        for kind, encoder in TINY_ENCODERS.items():
            patch.setitem(ENCODERS, kind, encoder)
        yield


@pytest.fixture
def tiny_encoders() -> Iterator[dict]:
    """Within the test, build_model makes tiny encoders instead of ResNet18s (~8k parameters
    instead of ~11M each), for tests of plumbing only: the runner, checkpoints, DDP, the data
    path. The formula and end-to-end tests keep the real ResNet18. Yields the registry in force."""
    with swap_in_tiny_encoders():
        yield dict(ENCODERS)


@pytest.fixture(scope="session")
def tiny_encoders_within() -> Callable[[], contextlib.AbstractContextManager]:
    """The swap of `tiny_encoders` as a context manager, for module-scoped fixtures; tests
    that load what such a fixture trained request `tiny_encoders` too."""
    return swap_in_tiny_encoders


# --------------------------------------------------------------------------- tiny model inputs


@pytest.fixture
def tiny_info() -> Callable[..., DatasetInfo]:
    """DatasetInfo of a small audio-visual problem: 16 x 16 spectrograms, 2-frame 16 x 16 clips."""

    def make(num_classes: int = 3) -> DatasetInfo:
        return DatasetInfo(
            name="tiny",
            num_classes=num_classes,
            class_names=tuple(map(str, range(num_classes))),
            modalities=(
                ModalitySpec("audio", "spectrogram", 1, (1, 16, 16)),
                ModalitySpec("visual", "frames", 3, (3, 2, 16, 16), mean=(0.5,) * 3, std=(0.25,) * 3),
            ),
        )

    return make


@pytest.fixture
def tiny_batch() -> Callable[..., tuple[dict, torch.Tensor]]:
    """A seeded random batch (inputs, labels) for `tiny_info`'s shapes."""

    def make(batch: int = 4, num_classes: int = 3, seed: int = 0) -> tuple[dict, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return (
            {
                "audio": torch.randn(batch, 1, 16, 16, generator=g),
                "visual": torch.randn(batch, 3, 2, 16, 16, generator=g),
            },
            torch.randint(0, num_classes, (batch,), generator=g),
        )

    return make


# --------------------------------------------------------------------------- the benchmark report


@pytest.fixture
def no_report_figures(monkeypatch) -> None:
    """The benchmark report without its figures: drawing them is ~90% of a protocol run on
    stand-in programs. For tests of the protocol's runs, selections and numbers; the tests of the
    figures and of the report's whole text draw them."""
    from onthefly.analysis import benchmark_report

    monkeypatch.setattr(benchmark_report, "_figures", lambda *args: [])


# --------------------------------------------------------------------------- entry points


@pytest.fixture
def run_script(monkeypatch, capsys) -> Callable[..., tuple[int, str]]:
    """Run code/<script> as `python code/<script> ARGS...` would, in this process (no new
    interpreter to start): returns its exit status and what it wrote to stderr."""

    def run(script: str, *args: str) -> tuple[int, str]:
        path = REPO / "code" / script
        monkeypatch.setattr(sys, "argv", [str(path), *args])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(path), run_name="__main__")
        return exit_.value.code, capsys.readouterr().err

    return run
