"""Any encoders, any number of modalities: the contract, the ratio choices, OGM / OGM-GE / OPM at
M = 3 against the formulas of docs/modalities.md computed by hand in float64, and misuse.

The hand computations use numpy on the logits the model produced; the Modulator computes in
float32 on the device, hence the 1e-6 relative tolerances where the two meet.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onthefly.data.spec import DatasetInfo, ModalitySpec
from onthefly.models import build_model
from onthefly.models.encoders import FrameEncoder, SpectrogramEncoder
from onthefly.modulation import (
    RATIO_REFS,
    ContractError,
    ModulatedModel,
    ModulationConfig,
    Modulator,
    discrepancy_ratios,
    ogm_parameters,
)

NUM_CLASSES = 4
DIMS = (6, 5, 7)  # the three modalities' input widths


class MLPModel(nn.Module):
    """M MLP encoders and a sum-of-shares head: the smallest model that satisfies the contract."""

    def __init__(self, dims=DIMS, width: int = 8, dtype=torch.float64):
        super().__init__()
        self.modality_names = tuple(f"m{i}" for i in range(len(dims)))
        self.encoders = nn.ModuleDict(
            {
                n: nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width))
                for n, d in zip(self.modality_names, dims)
            }
        )
        self.heads = nn.ModuleList(nn.Linear(width, NUM_CLASSES) for _ in dims)
        self.to(dtype)

    def encoder_parameters(self):
        return tuple(list(self.encoders[n].parameters()) for n in self.modality_names)

    def forward(self, inputs, feature_hook=None):
        features = tuple(self.encoders[n](inputs[n]) for n in self.modality_names)
        with torch.no_grad():
            z = tuple(head(h).float() for head, h in zip(self.heads, features))
        out = {"features": features, "unimodal_logits": z, "sample_weight": None}
        if feature_hook is not None:
            features, out["sample_weight"] = feature_hook(out)
        out["logits"] = sum(head(h) for head, h in zip(self.heads, features))
        return out


def batch(m: int = 3, size: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inputs = {f"m{i}": torch.randn(size, DIMS[i], generator=g, dtype=torch.float64) for i in range(m)}
    return inputs, torch.randint(0, NUM_CLASSES, (size,), generator=g)


def scores_by_hand(out, labels) -> np.ndarray:
    """s_m = sum_i softmax(z_m)_i[y_i], float64 from the logits."""
    y = labels.numpy()
    s = []
    for z in out["unimodal_logits"]:
        z = z.double().numpy()
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        s.append(p[np.arange(len(y)), y].sum())
    return np.array(s)


def ratios_by_hand(s: np.ndarray, ref: str) -> np.ndarray:
    others = [np.delete(s, m) for m in range(len(s))]
    reference = {"mean_others": np.mean, "min_others": np.min, "sum_others": np.sum}[ref]
    return np.array([s[m] / reference(o) for m, o in enumerate(others)])


def forward_backward(model, inputs, labels, modulator=None, epoch: int = 0):
    model.zero_grad(set_to_none=True)
    out = model(inputs, feature_hook=modulator.feature_hook(labels, epoch) if modulator else None)
    F.cross_entropy(out["logits"], labels).backward()
    return out


# --------------------------------------------------------------------------- ratios


@pytest.mark.parametrize("ref", RATIO_REFS)
def test_every_ratio_choice_is_the_papers_ratio_at_two_modalities(ref):
    scores = torch.tensor([3.7, 1.9], dtype=torch.float64)
    assert discrepancy_ratios(scores, ref).tolist() == [3.7 / 1.9, 1.9 / 3.7]  # exactly, not approximately
    single = torch.tensor([0.3, 2.1])  # float32 as in training: bit-identical to s / s.flip(0)
    assert torch.equal(discrepancy_ratios(single, ref), single / single.flip(0))


@pytest.mark.parametrize("ref", RATIO_REFS)
def test_three_modality_ratios_follow_their_definition(ref):
    s = np.array([3.0, 2.0, 1.0])
    expected = {"mean_others": [2.0, 1.0, 0.4], "min_others": [3.0, 2.0, 0.5], "sum_others": [1.0, 0.5, 0.2]}[ref]
    got = discrepancy_ratios(torch.tensor(s, dtype=torch.float64), ref).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-15)
    np.testing.assert_allclose(got, ratios_by_hand(s, ref), rtol=1e-15)  # the docs' table is the formula


# --------------------------------------------------------------------------- OGM on MLP encoders


def test_ogm_scales_the_dominant_mlp_encoder_by_exactly_k():
    torch.manual_seed(0)
    model = MLPModel(dims=DIMS[:2])
    inputs, labels = batch(m=2)
    alpha = 0.7
    modulator = Modulator.for_model(model, ModulationConfig(modulation="OGM", alpha=alpha))
    out = forward_backward(model, inputs, labels)
    before = [[p.grad.clone() for p in g] for g in model.encoder_parameters()]
    modulator.modulate_gradients(out, labels, epoch=0)

    s = scores_by_hand(out, labels)
    rho = s / s[::-1]
    k_hand = np.where(rho > 1, 1 - np.tanh(alpha * rho), 1.0)
    k = modulator.stats["coeff"].double().numpy()
    np.testing.assert_allclose(k, k_hand, rtol=1e-6)
    assert (k < 1).sum() == 1  # one dominant encoder
    for m, params in enumerate(model.encoder_parameters()):
        for p, g0 in zip(params, before[m]):
            if p.ndim >= 2:  # the default set: every weight matrix
                assert torch.equal(p.grad, g0 * k[m]), (m, p.shape)  # float64 gradient, exactly k times
            else:
                assert torch.equal(p.grad, g0)


@pytest.mark.parametrize("encoder", [SpectrogramEncoder, FrameEncoder])
def test_default_ogm_set_is_the_official_conv_set_on_resnet18(encoder):
    params = list(encoder().parameters())
    matrices, conv = ogm_parameters(params, "matrices"), ogm_parameters(params, "conv")
    assert [id(p) for p in matrices] == [id(p) for p in conv] and len(conv) == 20  # ResNet18's 20 conv kernels
    assert ModulationConfig().ogm_params == "matrices"


# --------------------------------------------------------------------------- three modalities by hand


@pytest.mark.parametrize("ref", RATIO_REFS)
@pytest.mark.parametrize("form", ["official", "continuous"])
def test_three_modality_ogm_follows_the_formula(ref, form):
    torch.manual_seed(1)
    model = MLPModel()
    inputs, labels = batch(seed=2)
    alpha = 0.9
    modulator = Modulator.for_model(
        model, ModulationConfig(modulation="OGM", alpha=alpha, ratio_ref=ref, ogm_form=form, ogm_params="all")
    )
    out = forward_backward(model, inputs, labels)
    before = [[p.grad.clone() for p in g] for g in model.encoder_parameters()]
    modulator.modulate_gradients(out, labels, epoch=0)

    rho = ratios_by_hand(scores_by_hand(out, labels), ref)
    x = rho if form == "official" else rho - 1
    k_hand = np.where(rho > 1, 1 - np.tanh(alpha * x), 1.0)
    np.testing.assert_allclose(modulator.stats["ratio"].double().numpy(), rho, rtol=1e-6)
    k = modulator.stats["coeff"].double()
    np.testing.assert_allclose(k.numpy(), k_hand, rtol=1e-6)
    for m, params in enumerate(model.encoder_parameters()):
        for p, g0 in zip(params, before[m]):
            torch.testing.assert_close(p.grad, g0 * k_hand[m], rtol=1e-6, atol=0)


@pytest.mark.parametrize("ref", RATIO_REFS)
def test_three_modality_ogm_ge_adds_noise_of_each_gradients_std(ref):
    torch.manual_seed(1)
    model = MLPModel()
    inputs, labels = batch(seed=3)
    alpha = 0.5
    modulator = Modulator.for_model(model, ModulationConfig(modulation="OGM_GE", alpha=alpha, ratio_ref=ref))
    out = forward_backward(model, inputs, labels)
    groups = [ogm_parameters(g, "matrices") for g in model.encoder_parameters()]
    before = [[p.grad.clone() for p in g] for g in groups]
    torch.manual_seed(123)
    modulator.modulate_gradients(out, labels, epoch=0)

    rho = ratios_by_hand(scores_by_hand(out, labels), ref)
    k_hand = np.where(rho > 1, 1 - np.tanh(alpha * rho), 1.0)
    flat = [(m, g) for m, gs in enumerate(before) for g in gs]
    torch.manual_seed(123)  # the same draws, in the documented order: every selected gradient, modality by modality
    noise = [torch.randn_like(g) for _, g in flat]
    got = [p.grad for g in groups for p in g]
    for (m, g), n, g_new in zip(flat, noise, got, strict=True):
        expected = g * k_hand[m] + n * (g.std() + 1e-8)
        torch.testing.assert_close(g_new, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("ref", RATIO_REFS)
def test_three_modality_opm_drops_with_the_formulas_q_and_rescales_by_theta(ref):
    torch.manual_seed(1)
    model = MLPModel()
    inputs, labels = batch(size=40, seed=4)
    q_base, lam = 0.6, 0.8
    config = ModulationConfig(modulation="OPM", q_base=q_base, lam=lam, p_exe=1.0, ratio_ref=ref)
    modulator = Modulator.for_model(model, config)
    seen = {}
    hook = modulator.feature_hook(labels, epoch=0)

    def spy(out):
        seen["features"] = out["features"]
        seen["returned"] = hook(out)
        return seen["returned"]

    torch.manual_seed(7)
    out = model(inputs, feature_hook=spy)

    rho = ratios_by_hand(scores_by_hand(out, labels), ref)
    q = np.where(rho > 1, np.clip(q_base * (1 + lam * np.tanh(rho - 1)), 0, 1), 0.0)
    np.testing.assert_allclose(modulator.stats["drop_prob"].double().numpy(), q, rtol=1e-6)
    torch.manual_seed(7)  # replay the hook's draws: the execution draw, then one (B, M) keep draw
    assert float(torch.rand(())) < 1.0
    keep = torch.rand(len(labels), 3) >= torch.tensor(q, dtype=torch.float32)
    dims = [h.shape[1] for h in seen["features"]]
    theta = sum(d * qm for d, qm in zip(dims, q)) / sum(dims)
    features, weight = seen["returned"]
    for m, (h, got) in enumerate(zip(seen["features"], features)):
        expected = h.detach() * keep[:, m : m + 1].double() / (1 - theta)
        torch.testing.assert_close(got.detach(), expected, rtol=1e-6, atol=1e-12)
    assert torch.equal(weight, keep.any(dim=1).float())


# --------------------------------------------------------------------------- the real model at M = 3


def three_modality_info() -> DatasetInfo:
    return DatasetInfo(
        name="tiny3",
        num_classes=NUM_CLASSES,
        class_names=tuple("abcd"),
        modalities=(
            ModalitySpec("audio", "spectrogram", 1, (1, 16, 16)),
            ModalitySpec("visual", "frames", 3, (3, 2, 16, 16), mean=(0.5,) * 3, std=(0.25,) * 3),
            ModalitySpec("flow", "frames", 2, (2, 2, 16, 16), mean=(0.5,) * 2, std=(0.25,) * 2),
        ),
    )


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_three_modality_model_shares_add_up_to_the_output(tiny_encoders, fusion):
    torch.manual_seed(0)
    model = build_model(three_modality_info(), fusion).eval()
    g = torch.Generator().manual_seed(0)
    inputs = {
        "audio": torch.randn(5, 1, 16, 16, generator=g),
        "visual": torch.randn(5, 3, 2, 16, 16, generator=g),
        "flow": torch.randn(5, 2, 2, 16, 16, generator=g),
    }
    out = model(inputs)
    assert len(out["features"]) == len(out["unimodal_logits"]) == 3
    torch.testing.assert_close(sum(out["unimodal_logits"]), out["logits"], rtol=1e-5, atol=1e-5)
    assert isinstance(model, ModulatedModel)


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_film_and_gated_refuse_three_modalities(tiny_encoders, fusion):
    with pytest.raises(ValueError, match="two modalities"):
        build_model(three_modality_info(), fusion)


# --------------------------------------------------------------------------- gradient accumulation


def test_accumulated_scores_give_the_big_batchs_coefficient():
    torch.manual_seed(0)
    model = MLPModel()
    inputs, labels = batch(size=8, seed=5)
    config = ModulationConfig(modulation="OGM", alpha=0.8)
    whole = Modulator.for_model(model, config)
    out = forward_backward(model, inputs, labels)
    whole.modulate_gradients(out, labels, epoch=0)

    accumulating = Modulator.for_model(model, config)
    model.zero_grad(set_to_none=True)
    for half in (slice(0, 4), slice(4, 8)):
        part = model({k: v[half] for k, v in inputs.items()})
        (F.cross_entropy(part["logits"], labels[half]) / 2).backward()
        accumulating.accumulate(part, labels[half])
    before = [[p.grad.clone() for p in g] for g in model.encoder_parameters()]
    accumulating.modulate_gradients(epoch=0)
    torch.testing.assert_close(accumulating.stats["score"], whole.stats["score"], rtol=1e-6, atol=0)
    k = accumulating.stats["coeff"]
    torch.testing.assert_close(k, whole.stats["coeff"], rtol=1e-6, atol=0)
    for m, params in enumerate(model.encoder_parameters()):
        for p, g0 in zip(params, before[m]):
            if p.ndim >= 2:
                assert torch.equal(p.grad, g0 * k[m].double())
    with pytest.raises(ValueError, match="out and labels"):
        accumulating.modulate_gradients(epoch=0)  # the sums were used: nothing pending now


def test_accumulate_then_out_and_labels_is_refused():
    model = MLPModel()
    inputs, labels = batch()
    modulator = Modulator.for_model(model, ModulationConfig(modulation="OGM"))
    out = forward_backward(model, inputs, labels)
    modulator.accumulate(out, labels)
    with pytest.raises(ValueError, match="accumulate"):
        modulator.modulate_gradients(out, labels, epoch=0)


# --------------------------------------------------------------------------- misuse: one clear error


class NoContract(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(3, 3)

    def forward(self, inputs):
        return {}


def test_a_model_without_the_contract_names_every_missing_piece():
    with pytest.raises(ContractError) as err:
        Modulator.for_model(NoContract(), ModulationConfig(modulation="OGM"))
    message = str(err.value)
    assert message.count("\n") == 0
    for piece in ("modality_names", "encoder_parameters()", "feature_hook"):
        assert piece in message


def test_official_opm_gradient_needs_feature_logits():
    with pytest.raises(ContractError, match="head.feature_logits"):
        Modulator.for_model(MLPModel(), ModulationConfig(modulation="OPM", opm_grad="official"))


def test_an_output_without_unimodal_logits_is_named():
    model = MLPModel()
    inputs, labels = batch()
    modulator = Modulator.for_model(model, ModulationConfig(modulation="OGM"))
    out = forward_backward(model, inputs, labels)
    with pytest.raises(ContractError, match="unimodal_logits"):
        modulator.modulate_gradients({"logits": out["logits"]}, labels, epoch=0)
    with pytest.raises(ContractError, match="float32"):
        modulator.modulate_gradients(
            {**out, "unimodal_logits": tuple(z.double() for z in out["unimodal_logits"])}, labels, epoch=0
        )


def test_an_ogm_set_that_selects_nothing_is_refused():
    with pytest.raises(ValueError, match="selects no trainable parameter of the m0, m1, m2 encoder"):
        Modulator.for_model(MLPModel(), ModulationConfig(modulation="OGM", ogm_params="conv"))


@pytest.mark.parametrize("method", ["OGM", "OGM_GE", "OPM", "OGM_OPM"])
def test_one_modality_with_modulation_is_refused(method):
    with pytest.raises(ValueError, match="this model has one"):
        Modulator.for_model(MLPModel(dims=DIMS[:1]), ModulationConfig(modulation=method))


def test_one_modality_without_modulation_measures_nothing_by_design():
    model = MLPModel(dims=DIMS[:1])
    inputs, labels = batch(m=1)
    modulator = Modulator.for_model(model, ModulationConfig(modulation="none"))
    out = forward_backward(model, inputs, labels)
    modulator.modulate_gradients(out, labels, epoch=0)
    assert not modulator.measures and modulator.stats == {}


def test_labels_out_of_range_are_refused_at_the_first_step():
    model = MLPModel()
    inputs, labels = batch()
    modulator = Modulator.for_model(model, ModulationConfig(modulation="OGM"))
    out = forward_backward(model, inputs, labels)
    with pytest.raises(ValueError, match=rf"class indices in \[0, {NUM_CLASSES}\)"):
        modulator.modulate_gradients(out, labels + NUM_CLASSES, epoch=0)


def test_modulating_before_backward_is_refused():
    model = MLPModel()
    inputs, labels = batch()
    modulator = Modulator.for_model(model, ModulationConfig(modulation="OGM"))
    model.zero_grad(set_to_none=True)
    out = model(inputs)
    with pytest.raises(RuntimeError, match="no gradient"):
        modulator.modulate_gradients(out, labels, epoch=0)
    assert "coeff" not in modulator.stats


@pytest.mark.parametrize(
    "values, field",
    [
        ({"p_exe": math.nan}, "p_exe must be a finite number"),
        ({"alpha": math.inf}, "alpha must be a finite number"),
        ({"alpha": "0.5"}, "alpha must be a number"),
        ({"modulation_starts": 1.5}, "modulation_starts must be an integer"),
        ({"ratio_ref": "median"}, "ratio_ref: unknown"),
    ],
)
def test_modulation_config_names_the_bad_field(values, field):
    with pytest.raises(ValueError, match=field):
        ModulationConfig(**values)


# --------------------------------------------------------------------------- misuse on the command line


class FlatEncoder(nn.Module):
    """An encoder without a conv kernel: a linear map of the 4 x 4-pooled spectrogram."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * in_channels, 512))

    def forward(self, x):
        return self.net(x)


def test_cli_refuses_an_ogm_set_that_selects_nothing(run_script, tmp_path, monkeypatch):
    from onthefly.models.encoders import ENCODERS

    monkeypatch.setitem(ENCODERS, "spectrogram", FlatEncoder)
    status, err = run_script(
        "train.py",
        "--limit_samples",
        "8",
        "--batch_size",
        "4",
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--modulation",
        "OGM",
        "--ogm_params",
        "conv",
        "--output_dir",
        str(tmp_path),
    )
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "ogm_params 'conv' selects no trainable parameter of the audio encoder" in err


def test_cli_refuses_modulation_of_one_modality(run_script, tmp_path):
    status, err = run_script("train.py", "--modality", "audio", "--modulation", "OGM", "--output_dir", str(tmp_path))
    assert status == 2 and "takes --modulation none" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- the training loop at M = 3


class Scalars:
    """A SummaryWriter stand-in that keeps the tags it was given."""

    def __init__(self):
        self.tags: set[str] = set()

    def add_scalar(self, tag, value, step):
        self.tags.add(tag)


@pytest.mark.parametrize("method", ["OGM_GE", "OGM_OPM"])
def test_the_training_loop_logs_and_evaluates_three_modalities(tiny_encoders, method):
    from types import SimpleNamespace

    from onthefly.data.presets import DevicePreset
    from onthefly.engine import TrainState, evaluate, train_one_epoch

    info = three_modality_info()
    torch.manual_seed(0)
    model = build_model(info, "concat")
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "audio": torch.randn(4, 1, 16, 16, generator=g),
            "visual": torch.randint(0, 256, (4, 3, 2, 16, 16), generator=g, dtype=torch.uint8),
            "flow": torch.randint(0, 256, (4, 2, 2, 16, 16), generator=g, dtype=torch.uint8),
            "label": torch.randint(0, NUM_CLASSES, (4,), generator=g),
            "index": torch.arange(4) + 4 * i,
        }
        for i in range(3)
    ]
    cfg = SimpleNamespace(modulation=method, alpha=0.5, p_exe=1.0, nonfinite="stop", log_every=1, seed=0)
    modulator = Modulator.from_config(cfg, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = Scalars()
    preset = DevicePreset(info, torch.device("cpu"))
    stats = train_one_epoch(model, modulator, optimizer, batches, preset, TrainState(), cfg, None, writer)
    assert math.isfinite(stats["loss"])
    for name in info.modality_names:
        assert {f"modulation/ratio_{name}", f"modulation/coeff_{name}"} <= writer.tags
    metrics = evaluate(model, batches, preset, None)
    assert {"acc_audio", "acc_visual", "acc_flow"} <= set(metrics)


def test_cli_refuses_film_on_three_modalities(run_script, tmp_path, monkeypatch):
    import dataclasses

    from onthefly import runner

    entry = runner.get_dataset_entry("avdigits")
    flow = ModalitySpec("flow", "frames", 2, (2, 1, 28, 28), mean=(0.5,) * 2, std=(0.25,) * 2)
    three = dataclasses.replace(
        entry, info=lambda cfg: dataclasses.replace(entry.info(cfg), modalities=(*entry.info(cfg).modalities, flow))
    )
    monkeypatch.setattr(runner, "get_dataset_entry", lambda name: three)
    status, err = run_script(
        "train.py",
        "--limit_samples",
        "8",
        "--batch_size",
        "4",
        "--device",
        "cpu",
        "--fusion",
        "film",
        "--output_dir",
        str(tmp_path),
    )
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "--fusion film: FiLMFusion is defined for two modalities" in err
