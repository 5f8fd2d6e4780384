"""Faithful to the official runs (docs/fidelity.md).

* every recipe in configs/ resolves to the values published for it, and the CREMA-D and
  Kinetics-Sounds defaults are the T-PAMI 2024 recipes (the numbers below are typed in from
  the papers, the official code and the authors' statements, not read from the project);
* the official initialisation is applied;
* z_m and the scores are float32 under bf16 autocast;
* one training step in official mode equals an implementation written here from the
  published description (fused logits, scores, k, q, theta, every parameter's gradient,
  with and without the official OPM gradient);
* the CREMA-D official split (744 test clips, val carved from the train list) and the
  official whole-frame crop.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from onthefly import runner
from onthefly.config import resolve_config
from onthefly.data.raw.cremad import CLASSES, read_official_lists
from onthefly.data.raw.splits import assign_splits
from onthefly.data.registry import get_dataset_entry
from onthefly.data.spec import DatasetInfo, ModalitySpec
from onthefly.engine import compute_loss
from onthefly.errors import UserError
from onthefly.models import build_model
from onthefly.modulation import ModulationConfig, Modulator

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- recipes

# OGM-GE_CVPR2022: main.py lines 34-43 (epochs, window 0-50), README line 151 (alpha 0.8 for CREMA-D);
# dataset/CramedDataset.py line 88 (the first listed frame); main.py line 265 (no drop_last).
CVPR2022_CREMAD = dict(
    optimizer="sgd",
    lr=1e-3,
    momentum=0.9,
    weight_decay=1e-4,
    batch_size=64,
    epochs=100,
    scheduler="step",
    lr_step=70,
    lr_gamma=0.1,
    alpha=0.8,
    modulation_starts=0,
    modulation_ends=50,
    num_frames=1,
    frame_crop="official",
    frame_pick="official",
)
# BML_TPAMI2024: code/main.py line 91 (warm-up in epochs 0-5, whatever the dataset), line 154
# (modulation_ends limits OGM only: OPM to the last epoch).
TPAMI2024_CREMAD = dict(
    optimizer="adamw",
    lr=1e-3,
    batch_size=32,
    epochs=100,
    scheduler="step",
    lr_step=20,
    lr_gamma=0.1,
    alpha=2.6,
    modulation_starts=0,
    modulation_ends=80,
    warmup_epochs=6,
    num_frames=1,
    frame_crop="official",
    frame_pick="official",
)
# code/dataset/KS.py line 134 (first, middle, last frame), spatial_transforms.py lines 230-283 (crops).
TPAMI2024_KS = dict(
    optimizer="adamw",
    lr=5e-5,
    weight_decay=0.01,
    batch_size=32,
    epochs=100,
    scheduler="step",
    lr_step=40,
    lr_gamma=0.1,
    warmup_epochs=6,
    alpha=0.8,
    q_base=0.5,
    lam=0.5,
    p_exe=0.7,
    num_frames=3,
    crop_size=112,
    frame_crop="official",
    frame_pick="official",
)
OPTIMISATION = (
    "optimizer",
    "lr",
    "weight_decay",
    "momentum",
    "batch_size",
    "epochs",
    "scheduler",
    "lr_step",
    "lr_gamma",
    "num_frames",
    "crop_size",
    "frame_crop",
    "frame_pick",
    "drop_last",
)
# Both official training loaders keep the last incomplete batch (OGM-GE main.py line 265,
# BML code/main.py line 254): every recipe file says drop_last false.
LOADER = {"drop_last": False}


def _only(values: dict, keys) -> dict:
    return {k: v for k, v in values.items() if k in keys}


RECIPES = {
    "cremad_cvpr2022_ogm_ge.yaml": ("cremad", {**CVPR2022_CREMAD, **LOADER, "modulation": "OGM_GE"}),
    "cremad_cvpr2022_baseline.yaml": (
        "cremad",
        {**_only(CVPR2022_CREMAD, OPTIMISATION), **LOADER, "modulation": "none"},
    ),
    # The journal code's OGM run has the GE noise on (its --modulation defaults to OGM_GE).
    "cremad_tpami2024_ogm.yaml": ("cremad", {**TPAMI2024_CREMAD, **LOADER, "modulation": "OGM_GE"}),
    # OPM runs on every epoch after the warm-up in the journal code (no end of window).
    "cremad_tpami2024_opm.yaml": (
        "cremad",
        {**TPAMI2024_CREMAD, **LOADER, "modulation": "OPM", "modulation_ends": 99, "opm_grad": "official"},
    ),
    "cremad_tpami2024_baseline.yaml": (
        "cremad",
        {**_only(TPAMI2024_CREMAD, OPTIMISATION), **LOADER, "modulation": "none"},
    ),
    "ks_tpami2024_ogm.yaml": (
        "kinetics_sounds",
        {**TPAMI2024_KS, **LOADER, "modulation": "OGM_GE", "modulation_ends": 60},
    ),
    "ks_tpami2024_opm.yaml": (
        "kinetics_sounds",
        {**TPAMI2024_KS, **LOADER, "modulation": "OPM", "modulation_ends": 99, "opm_grad": "official"},
    ),
    "ks_tpami2024_baseline.yaml": (
        "kinetics_sounds",
        {**_only(TPAMI2024_KS, OPTIMISATION), **LOADER, "modulation": "none"},
    ),
}


def test_every_recipe_file_is_tested():
    recipes = [*(REPO / "configs").glob("*_cvpr2022_*.yaml"), *(REPO / "configs").glob("*_tpami2024_*.yaml")]
    assert sorted(p.name for p in recipes) == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_resolves_to_the_published_values(name, tmp_path):
    dataset, expected = RECIPES[name]
    cfg = resolve_config(["--config", str(REPO / "configs" / name), "--data", str(tmp_path)])
    assert cfg.dataset == dataset
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.init == "official" and cfg.fusion == "concat"
    text = (REPO / "configs" / name).read_text()
    assert text.startswith("#") and "GeWu-Lab/" in text  # states its source


@pytest.mark.parametrize("dataset, recipe", [("cremad", TPAMI2024_CREMAD), ("kinetics_sounds", TPAMI2024_KS)])
def test_dataset_defaults_are_the_tpami_recipe(dataset, recipe, tmp_path):
    cfg = resolve_config(["--dataset", dataset, "--data", str(tmp_path)])
    assert {k: getattr(cfg, k) for k in recipe} == recipe


def test_avdigits_defaults_stay_fast():
    cfg = resolve_config([])
    assert cfg.epochs <= 10 and (cfg.optimizer, cfg.lr, cfg.scheduler, cfg.alpha) == ("sgd", 0.01, "cosine", 0.5)
    assert (cfg.warmup_epochs, cfg.modulation_ends, cfg.opm_grad) == (0, 10**9, "clean")


def _script_then_train(tmp_path: Path, capsys, name: str, *args: str) -> str:
    """scripts/<name> ARGS with a stand-in PYTHON that records the command the script builds, then
    that command's train.py run in this process (no interpreter to start): what train.py prints."""
    record, python = tmp_path / f"{name}.argv", tmp_path / "python"
    python.write_text(f"#!/usr/bin/env bash\nprintf '%s\\0' \"$@\" > {record}\n")
    python.chmod(0o755)
    subprocess.run(
        ["bash", str(REPO / "scripts" / name), *args], env={**os.environ, "PYTHON": str(python)}, check=True, timeout=60
    )
    script, *argv = record.read_text().split("\0")[:-1]
    assert script == "code/train.py"
    capsys.readouterr()
    assert runner.main(argv) == 0
    return capsys.readouterr().out


def test_scripts_run_the_recipe_and_print_config(tmp_path, capsys):
    """A recipe's method is not overridden by the script; --print_config prints YAML and exits 0."""
    recipe = str(REPO / "configs" / "cremad_tpami2024_opm.yaml")
    shown = _script_then_train(
        tmp_path, capsys, "train_ogm.sh", "--config", recipe, "--data", str(tmp_path), "--print_config"
    )
    printed = yaml.safe_load(shown)
    assert printed["modulation"] == "OPM" and printed["lr_step"] == 20 and printed["batch_size"] == 32
    plain = yaml.safe_load(_script_then_train(tmp_path, capsys, "train_ogm.sh", "--print_config"))
    assert plain["modulation"] == "OGM_GE" and plain["dataset"] == "avdigits"
    # the printed configuration is itself a valid recipe file
    again = tmp_path / "again.yaml"
    again.write_text(shown)
    cfg = resolve_config(["--config", str(again)])
    assert {k: getattr(cfg, k) for k in printed} == printed


# --------------------------------------------------------------------------- model and scores

NUM_CLASSES = 5


def tiny_info() -> DatasetInfo:
    return DatasetInfo(
        name="tiny",
        num_classes=NUM_CLASSES,
        class_names=tuple("abcde"),
        modalities=(
            ModalitySpec("audio", "spectrogram", 1, (1, 16, 16)),
            ModalitySpec("visual", "frames", 3, (3, 2, 16, 16), mean=(0.5,) * 3, std=(0.25,) * 3),
        ),
    )


def tiny_batch(batch: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "audio": torch.randn(batch, 1, 16, 16, generator=g),
        "visual": torch.randn(batch, 3, 2, 16, 16, generator=g),
    }
    return inputs, torch.randint(0, NUM_CLASSES, (batch,), generator=g)


def test_official_initialisation_is_applied():
    torch.manual_seed(0)
    model = build_model(tiny_info(), "concat", init="official")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all((m.bias == 0).all() for m in linears)
    w = model.head.fc.weight  # (5, 1024): Xavier-normal std = sqrt(2 / (fan_in + fan_out))
    assert abs(w.std().item() / math.sqrt(2 / (1024 + NUM_CLASSES)) - 1) < 0.05
    assert abs(w.mean().item()) < 0.01
    conv = model.encoders["visual"].net.layer4[0].conv1.weight  # (512, 256, 3, 3): Kaiming fan_out, ReLU
    assert abs(conv.std().item() / math.sqrt(2 / (512 * 9)) - 1) < 0.02
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all((m.weight == 1).all() and (m.bias == 0).all() for m in bns)
    torch.manual_seed(0)
    default = build_model(tiny_info(), "concat", init="torch")
    assert (default.head.fc.bias != 0).any()  # PyTorch's uniform bias: the option really differs


@pytest.mark.parametrize("fusion", ["concat", "sum", "film"])
def test_unimodal_logits_are_float32_under_bf16_autocast(fusion):
    torch.manual_seed(0)
    head = build_model(tiny_info(), fusion).head
    h_a, h_b = torch.randn(16, 512), torch.randn(16, 512)
    labels = torch.randint(0, NUM_CLASSES, (16,))
    expected = [z.double() for z in head.unimodal_logits(h_a, h_b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head.unimodal_logits(h_a, h_b)
        fused = head(h_a, h_b)
    assert fused.dtype == torch.bfloat16  # autocast is really on
    for z, e in zip(got, expected):
        assert z.dtype == torch.float32
        assert torch.allclose(z.double(), e, atol=1e-5, rtol=0)
    s_fp32 = [F.softmax(e, 1).gather(1, labels[:, None]).sum() for e in expected]
    from onthefly.modulation import unimodal_scores

    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = unimodal_scores(head.unimodal_logits(h_a, h_b), labels)
    assert torch.allclose(s.double(), torch.stack(s_fp32), atol=1e-5)


# --------------------------------------------------------------------------- one official step

ALPHA, Q_BASE, LAM = 0.8, 0.5, 0.5


def _reference_forward(model, inputs):
    """Encoders, then the concat head's per-modality shares, written out from the description."""
    h_a = model.encoders["audio"](inputs["audio"])
    h_v = model.encoders["visual"](inputs["visual"])
    w, b = model.head.fc.weight.detach(), model.head.fc.bias.detach()
    return h_a, h_v, h_a @ w[:, :512].T + b / 2, h_v @ w[:, 512:].T + b / 2


def _loop_score(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum over samples of softmax(z)[i][y_i], one sample at a time (as the released code)."""
    p = F.softmax(logits.float(), dim=1)
    return sum(p[i][int(labels[i])] for i in range(len(labels)))


class _ThetaAsGradient(torch.autograd.Function):
    """x / (1 - theta); backward: (g / (1 - theta), theta): the released code's rescaling."""

    @staticmethod
    def forward(ctx, x, theta):
        ctx.save_for_backward(theta)
        return x / (1 - theta.item())

    @staticmethod
    def backward(ctx, g):
        (theta,) = ctx.saved_tensors
        return g / (1 - theta.item()), theta


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got: dict, want: dict) -> None:
    """Equal to float32 precision: relative to each gradient's norm (the two sum in other orders)."""
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] - want[name]).norm() <= 1e-5 * want[name].norm() + 1e-8, name


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    ours = build_model(tiny_info(), "concat", init="official")
    ours.train()
    return ours, copy.deepcopy(ours)


@pytest.mark.parametrize("method", ["OGM", "OGM_GE"])
def test_official_ogm_step_matches_the_description(method):
    ours, ref = _pair()
    inputs, labels = tiny_batch()
    modulator = Modulator(ModulationConfig(modulation=method, alpha=ALPHA), ours.encoder_parameters(), head=ours.head)
    out = ours(inputs)
    compute_loss(out, labels, ours.head).backward()
    torch.manual_seed(123)  # the GE noise
    modulator.modulate_gradients(out, labels, epoch=0)

    h_a, h_v, t_a, t_v = _reference_forward(ref, inputs)
    fused = ref.head.fc(torch.cat([h_a, h_v], 1))
    F.cross_entropy(fused, labels).backward()
    s_a, s_v = _loop_score(t_a.detach(), labels), _loop_score(t_v.detach(), labels)
    r_a = (s_a / s_v).item()
    k_a = 1 - math.tanh(ALPHA * r_a) if r_a > 1 else 1.0
    k_v = 1.0 if r_a > 1 else 1 - math.tanh(ALPHA / r_a)
    torch.manual_seed(123)
    for name, p in ref.named_parameters():
        if name.startswith("encoders.") and p.grad is not None and p.grad.dim() == 4:
            k = k_a if name.startswith("encoders.audio") else k_v
            if method == "OGM_GE":
                p.grad = p.grad * k + torch.zeros_like(p.grad).normal_(0, p.grad.std().item() + 1e-8)
            else:
                p.grad *= k

    assert torch.allclose(out["logits"], fused, atol=1e-5)
    assert torch.allclose(modulator.stats["score"], torch.stack([s_a, s_v]), atol=1e-5)
    assert modulator.stats["coeff"].tolist() == pytest.approx([k_a, k_v], abs=1e-6)
    assert min(k_a, k_v) < 1  # something was modulated
    _assert_same_grads(_grads(ours), _grads(ref))


def _reference_opm_step(ref, inputs, labels, official_grad: bool, p_exe: float, seed: int):
    h_a, h_v, t_a, t_v = _reference_forward(ref, inputs)
    perf_a, perf_v = _loop_score(t_a, labels), _loop_score(t_v, labels)  # with gradient
    if not official_grad:
        perf_a, perf_v = perf_a.detach(), perf_v.detach()
    ratio_a, ratio_v = torch.tanh(F.relu(perf_a / perf_v - 1)), torch.tanh(F.relu(perf_v / perf_a - 1))
    zero = torch.zeros(())
    q = torch.stack(
        [Q_BASE * (1 + LAM * ratio_a) if ratio_a > 0 else zero, Q_BASE * (1 + LAM * ratio_v) if ratio_v > 0 else zero]
    ).clip(0.0, 1.0)
    torch.manual_seed(seed)
    executed = bool(torch.rand(()) < p_exe)
    keep = torch.rand(len(labels), 2) >= q.detach()  # the same draws, in the same order, as the project
    assert executed
    theta = (512 * q).sum() / 1024
    stacked = torch.stack([h_a, h_v]) * keep.T[:, :, None].float()
    if official_grad:
        stacked = _ThetaAsGradient.apply(stacked, theta)
    else:
        stacked = stacked / (1 - theta.detach())
    kept = keep.any(dim=1)
    fused = ref.head.fc(torch.cat([stacked[0][kept], stacked[1][kept]], 1))
    F.cross_entropy(fused, labels[kept]).backward()
    return torch.stack([perf_a, perf_v]).detach(), q.detach(), fused.detach(), kept


@pytest.mark.parametrize("opm_grad", ["clean", "official"])
def test_official_opm_step_matches_the_description(opm_grad):
    ours, ref = _pair(seed=1)
    inputs, labels = tiny_batch(seed=1)
    config = ModulationConfig(modulation="OPM", q_base=Q_BASE, lam=LAM, p_exe=1.0, opm_grad=opm_grad)
    modulator = Modulator(config, ours.encoder_parameters(), head=ours.head)
    torch.manual_seed(7)
    out = ours(inputs, feature_hook=modulator.feature_hook(labels, epoch=0))
    compute_loss(out, labels, ours.head).backward()
    modulator.modulate_gradients(out, labels, epoch=0)

    scores, q, fused, kept = _reference_opm_step(ref, inputs, labels, opm_grad == "official", 1.0, seed=7)
    assert torch.allclose(modulator.stats["score"], scores, atol=1e-5)
    assert torch.allclose(modulator.stats["drop_prob"], q, atol=1e-6)
    assert q.max() > 0  # one modality was dropped from
    assert torch.equal(out["sample_weight"].bool(), kept)
    assert torch.allclose(out["logits"][kept], fused, atol=1e-5)
    _assert_same_grads(_grads(ours), _grads(ref))


def test_official_opm_gradient_reaches_both_encoders():
    """The theta term is a real difference: both encoders' gradients change, the head's do not."""
    grads = {}
    for opm_grad in ("clean", "official"):
        model, _ = _pair(seed=1)
        inputs, labels = tiny_batch(seed=1)
        config = ModulationConfig(modulation="OPM", q_base=Q_BASE, lam=LAM, p_exe=1.0, opm_grad=opm_grad)
        modulator = Modulator(config, model.encoder_parameters(), head=model.head)
        torch.manual_seed(7)
        out = model(inputs, feature_hook=modulator.feature_hook(labels, epoch=0))
        compute_loss(out, labels, model.head).backward()
        grads[opm_grad] = _grads(model)
    for enc in ("encoders.audio.net.layer4.1.conv2.weight", "encoders.visual.net.layer4.1.conv2.weight"):
        assert not torch.allclose(grads["clean"][enc], grads["official"][enc], rtol=1e-3, atol=1e-7), enc
    # the head sees the same features either way (up to x / (1 - theta) against x * (1 / (1 - theta)))
    assert torch.allclose(grads["clean"]["head.fc.weight"], grads["official"]["head.fc.weight"], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- CREMA-D split and frames


def test_official_lists_give_744_test_clips_and_a_carved_val():
    lists = read_official_lists()
    assert len(lists) == 7442 and Counter(lists.values()) == {"train": 6698, "test": 744}
    ids = sorted(lists)
    labels = [CLASSES.index(c.split("_")[2]) for c in ids]
    given = [lists[c] for c in ids]
    splits = assign_splits(labels, given, None, val_fraction=0.1, test_fraction=0.1, seed=0)
    test = {c for c, s in zip(ids, splits) if s == "test"}
    assert test == {c for c, s in lists.items() if s == "test"}  # untouched
    val = [i for i, s in enumerate(splits) if s == "val"]
    assert all(lists[ids[i]] == "train" for i in val)
    train_per_class = Counter(labels[i] for i, c in enumerate(ids) if lists[c] == "train")
    val_per_class = Counter(labels[i] for i in val)
    for c, n in train_per_class.items():  # stratified: 10 % of each class of the train list
        assert val_per_class[c] == round(0.1 * n)
    assert splits == assign_splits(labels, given, None, 0.1, 0.1, seed=0)
    assert splits != assign_splits(labels, given, None, 0.1, 0.1, seed=1)


@pytest.fixture(scope="module")
def listed_cremad(tmp_path_factory):
    """A tiny CREMA-D whose clips all appear in the official lists (3 train + 1 test per emotion)."""
    from test_datasets_raw import SMALL_AUDIO, SMALL_FRAMES, run, write_cv2_video, write_wav

    lists = read_official_lists()
    chosen = []
    for emo in CLASSES:
        for split, n in (("train", 3), ("test", 1)):
            chosen += sorted(c for c, s in lists.items() if s == split and c.split("_")[2] == emo)[:n]
    root = tmp_path_factory.mktemp("raw") / "CREMA-D"
    (root / "AudioWAV").mkdir(parents=True)
    (root / "VideoFlash").mkdir()
    for k, cid in enumerate(chosen):
        write_wav(root / "AudioWAV" / f"{cid}.wav", 1.5, 16000, 200 + 30 * k)
        write_cv2_video(root / "VideoFlash" / f"{cid}.flv", "FLV1", 1.0, seed=k)
    out = tmp_path_factory.mktemp("cache") / "cremad"
    assert run("cremad", root, out, *SMALL_AUDIO, *SMALL_FRAMES, official=True)["status"] == "built"
    rnd = tmp_path_factory.mktemp("cache") / "cremad_random"
    run("cremad", root, rnd, *SMALL_AUDIO, *SMALL_FRAMES, "--random_split", "--val_fraction", "0.2")
    return lists, root, out, rnd


def test_cremad_cache_uses_the_official_split_by_default(listed_cremad):
    import json

    lists, _, out, rnd = listed_cremad
    idx = json.loads((out / "index.json").read_text())
    for cid, split in zip(idx["clip_ids"], idx["splits"]):
        assert split == "test" if lists[cid] == "test" else split in ("train", "val")
    assert Counter(idx["splits"]) == {"train": 12, "val": 6, "test": 6}  # val: 1 of the 3 train clips per emotion
    other = json.loads((rnd / "index.json").read_text())["splits"]
    assert other != idx["splits"]  # --random_split: the seeded split instead


def test_official_frame_crop(listed_cremad):
    _, _, out, _ = listed_cremad
    visual = np.load(out / "visual.npy", mmap_mode="r")
    assert visual.shape[2:] == (32, 43)  # the whole 4:3 frame, short side 32
    entry = get_dataset_entry("cremad")
    from argparse import Namespace

    def build(split, **kw):
        return entry.build(Namespace(data=str(out), num_frames=1, crop_size=28, **kw), split)

    test = build("test", frame_crop="official")
    item = test[0]["visual"]
    assert item.dtype == torch.uint8 and tuple(item.shape) == (3, 1, 28, 28)
    start, stop = test.offsets["visual"][test.rows[0] : test.rows[0] + 2]
    middle = int(start) + (int(stop) - int(start)) // 2  # evaluation takes the middle frame
    frame = torch.from_numpy(np.array(visual[middle])).float()[None]  # (1, 3, 32, 43)
    resized = F.interpolate(frame, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    assert (item[:, 0].float() - resized[0].round()).abs().max() <= 1  # the whole frame, squeezed to 28 x 28
    train = build("train", frame_crop="official")
    torch.manual_seed(0)
    a = train[0]["visual"]
    torch.manual_seed(1)
    b = train[0]["visual"]
    assert tuple(a.shape) == (3, 1, 28, 28) and not torch.equal(a, b)  # random resized crops
    assert tuple(build("train", frame_crop="fixed")[0]["visual"].shape) == (3, 1, 28, 28)


def test_official_crop_refuses_centre_squares(listed_cremad, tmp_path):
    from argparse import Namespace

    from test_datasets_raw import SMALL_AUDIO, SMALL_FRAMES, run

    _, root, _, _ = listed_cremad
    square = tmp_path / "square"
    run("cremad", root, square, *SMALL_AUDIO, *SMALL_FRAMES, "--frame_aspect", "0", official=True)
    assert np.load(square / "visual.npy", mmap_mode="r").shape[2:] == (32, 32)
    with pytest.raises(UserError, match="--frame_crop"):
        get_dataset_entry("cremad").build(Namespace(data=str(square), num_frames=1, frame_crop="official"), "train")


def test_a_stray_clip_keeps_the_official_lists_and_is_counted(tmp_path):
    """The reproduction of the published-split loss: every official clip as empty files plus one
    clip in no list. The lists stay (744 test clips) and the stray clip is counted."""
    import argparse

    from onthefly.data.raw import cremad

    lists = read_official_lists()
    root = tmp_path / "CREMA-D"
    for folder, ext in (("AudioWAV", "wav"), ("VideoFlash", "flv")):
        (root / folder).mkdir(parents=True)
        for cid in [*lists, "1092_XYZ_ANG_XX"]:
            (root / folder / f"{cid}.{ext}").touch()
    (root / "AudioWAV" / "1001_IOM_SAD_XX.wav").unlink()  # a listed clip without its audio
    (root / "VideoFlash" / "1001_TSI_FEA_XX.flv").unlink()
    for name in ("1001_WSI_SAD_XX", "1001_WSI_HAP_XX"):  # listed, absent altogether
        (root / "AudioWAV" / f"{name}.wav").unlink()
        (root / "VideoFlash" / f"{name}.flv").unlink()
    found = cremad.scan(str(root), argparse.Namespace(speaker_independent=False, random_split=False))
    removed = ("1001_IOM_SAD_XX", "1001_TSI_FEA_XX", "1001_WSI_SAD_XX", "1001_WSI_HAP_XX")
    assert all(lists[c] == "train" for c in removed)
    assert Counter(j.split for j in found.jobs) == {"test": 744, "train": 6698 - 4}
    assert all(j.split == lists[j.clip_id] for j in found.jobs)
    assert found.unlisted == ["1092_XYZ_ANG_XX"] and found.listed_absent == ["1001_WSI_HAP_XX", "1001_WSI_SAD_XX"]
    assert {s[0]: s[1] for s in found.skipped} == {
        "1001_IOM_SAD_XX": "missing audio AudioWAV/1001_IOM_SAD_XX.wav",
        "1001_TSI_FEA_XX": "missing video VideoFlash/1001_TSI_FEA_XX.flv",
    }
    assert found.split_record() == {"source": "lists", "unlisted": 1, "listed_absent": 2}
    assert any("1 clip(s) in neither official list are ignored" in n for n in found.notes)
    seeded = cremad.scan(str(root), argparse.Namespace(speaker_independent=False, random_split=True))
    assert all(j.split is None for j in seeded.jobs) and not seeded.unlisted  # only on the explicit option
    assert "1092_XYZ_ANG_XX" in {j.clip_id for j in seeded.jobs}


def test_the_stray_clip_is_in_the_summary_and_meta_and_quiet_keeps_the_note(listed_cremad, tmp_path, capsys):
    import json

    from test_datasets_raw import SMALL_AUDIO, SMALL_FRAMES, run, write_cv2_video, write_wav

    _, root, _, _ = listed_cremad
    stray = tmp_path / "CREMA-D"
    shutil.copytree(root, stray)
    write_wav(stray / "AudioWAV" / "1092_XYZ_ANG_XX.wav", 1.5, 16000, 300)
    write_cv2_video(stray / "VideoFlash" / "1092_XYZ_ANG_XX.flv", "FLV1", 1.0)
    capsys.readouterr()
    summary = run("cremad", stray, tmp_path / "out", *SMALL_AUDIO, *SMALL_FRAMES, official=True)  # --quiet
    assert "1 clip(s) in neither official list are ignored (1092_XYZ_ANG_XX)" in capsys.readouterr().err
    assert summary["clips"] == 24 and summary["unlisted"] == 1 and summary["listed_absent"] == 7442 - 24
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["split"] == {"source": "lists", "unlisted": 1, "listed_absent": 7442 - 24}
    assert meta["params"]["random_split"] is False and meta["split_counts"]["test"] == 6


def test_official_frame_choice_and_kinetics_sounds_crops(listed_cremad):
    from argparse import Namespace

    from onthefly.data.cache.dataset import OFFICIAL_FRAMES, first_middle_last

    assert first_middle_last(10, 3) == [0, 4, 9] and first_middle_last(1, 3) == [0, 0, 0]  # KS.py line 134
    _, _, out, _ = listed_cremad
    visual = np.load(out / "visual.npy", mmap_mode="r")
    entry = get_dataset_entry("cremad")
    for split in ("train", "test"):
        ds = entry.build(
            Namespace(data=str(out), num_frames=1, crop_size=28, frame_crop="fixed", frame_pick="official"), split
        )
        first = int(ds.offsets["visual"][ds.rows[0]])
        centre = np.array(visual[first])[:, 2:30, 7:35]  # the first stored frame (evaluation: centre crop)
        item = ds[0]["visual"][:, 0].numpy()
        if split == "test":
            assert (item == centre).all()
        assert "pick official (the first stored frame" in ds.describe_frames()
    # Kinetics-Sounds: evaluation Resize(112) of the short side then CenterCrop; training one
    # RandomResizedCrop (area 0.25-1) shared by every frame
    rule = OFFICIAL_FRAMES["kinetics_sounds"]
    clip = torch.arange(3 * 3 * 20 * 30, dtype=torch.float32).reshape(3, 3, 20, 30).remainder(251).to(torch.uint8)
    ev = rule.apply(clip, 10, None)
    resized = F.interpolate(clip.float(), size=(10, 15), mode="bilinear", antialias=True, align_corners=False)
    assert tuple(ev.shape) == (3, 3, 10, 10) and (ev.float() - resized[..., 2:12].round()).abs().max() <= 1
    torch.manual_seed(0)
    areas = []
    for _ in range(200):
        top, left, h, w, _ = rule.draw(clip)
        areas.append(h * w / (20 * 30))
        assert 0 <= top <= 20 - h and 0 <= left <= 30 - w
    assert 0.2 < min(areas) < 0.4 and max(areas) <= 1  # area 0.25-1 (rounded to whole pixels), not 0.08-1
    same = clip[:, :1].expand(3, 3, 20, 30).contiguous()  # three identical frames
    tr = rule.apply(same, 10, rule.draw(same))
    assert tuple(tr.shape) == (3, 3, 10, 10) and torch.equal(tr[:, 0], tr[:, 1]) and torch.equal(tr[:, 1], tr[:, 2])


def test_opm_can_outlast_ogm():
    """'OGM until E1, OPM until E2' (the journal's combined run): modulation_ends E1, opm_ends E2."""
    config = ModulationConfig(modulation="OGM_GE_OPM", modulation_ends=2, opm_ends=5, warmup_epochs=1)
    assert [config.active(e) for e in range(7)] == [False, True, True, False, False, False, False]
    assert [config.active(e, opm=True) for e in range(7)] == [False, True, True, True, True, True, False]
    assert ModulationConfig(modulation="OPM", modulation_ends=2).active(3, opm=True) is False  # -1: the same window
    with pytest.raises(ValueError, match="opm_ends"):
        ModulationConfig(modulation="OPM", warmup_epochs=3, opm_ends=2)
    model = build_model(tiny_info(), "concat", init="official")
    modulator = Modulator(config, model.encoder_parameters(), head=model.head)
    labels = torch.zeros(8, dtype=torch.long)
    assert modulator.feature_hook(labels, epoch=4) is not None and modulator.feature_hook(labels, epoch=6) is None


def test_a_recipe_run_logs_its_frame_rule_and_drop_last(tiny_encoders, listed_cremad, tmp_path, capsys):
    from onthefly import runner

    _, _, out, _ = listed_cremad
    argv = [
        "--config",
        str(REPO / "configs" / "cremad_tpami2024_ogm.yaml"),
        "--data",
        str(out),
        "--epochs",
        "1",
        "--batch_size",
        "5",
        "--device",
        "cpu",
        "--num_workers",
        "0",
        "--crop_size",
        "28",
        "--output_dir",
        str(tmp_path / "runs"),
    ]
    assert runner.main(argv) == 0, capsys.readouterr().err[-2000:]
    printed = capsys.readouterr().out
    assert (
        "frame rule: 1 frame(s) of 28 px; pick official (the first stored frame, training and evaluation); "
        "crop official (RandomResizedCrop(area 0.08-1) of the whole frame" in printed
    )
    assert "drop_last off: every training clip is used each epoch" in printed
