"""The paper's formulas, each checked against an independent float64 computation by hand."""

import math

import pytest
import torch

from onthefly.models import build_model
from onthefly.modulation import (
    ModulationConfig,
    Modulator,
    discrepancy_ratios,
    modulate_gradients_,
    ogm_coefficients,
    ogm_parameters,
    opm_drop_probabilities,
    opm_feature_dropout,
    unimodal_scores,
)

LOGITS_A = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 0.0]]
LOGITS_V = [[0.3, 0.1, 0.0], [1.0, -1.0, 0.5], [0.2, 0.2, 0.9], [2.0, 1.0, -2.0]]
LABELS = [0, 2, 1, 0]


def softmax_true_class_sum(rows, labels):
    total = 0.0
    for row, y in zip(rows, labels):
        exps = [math.exp(v) for v in row]
        total += exps[y] / sum(exps)
    return total


def test_scores_match_hand_computation():
    za, zv, y = torch.tensor(LOGITS_A), torch.tensor(LOGITS_V), torch.tensor(LABELS)
    scores = unimodal_scores((za, zv), y)
    expected = [softmax_true_class_sum(LOGITS_A, LABELS), softmax_true_class_sum(LOGITS_V, LABELS)]
    assert scores.dtype == torch.float32
    assert scores.tolist() == pytest.approx(expected, rel=1e-6)


def test_scores_carry_no_gradient():
    za = torch.tensor(LOGITS_A, requires_grad=True)
    scores = unimodal_scores((za, torch.tensor(LOGITS_V)), torch.tensor(LABELS))
    assert not scores.requires_grad


def test_ratios_and_zero_guard():
    s = torch.tensor([2.5, 1.25])
    assert discrepancy_ratios(s).tolist() == pytest.approx([2.0, 0.5])
    both_zero = discrepancy_ratios(torch.zeros(2))
    assert torch.isfinite(both_zero).all() and both_zero.tolist() == [0.0, 0.0]
    one_zero = discrepancy_ratios(torch.tensor([1.0, 0.0]))
    assert torch.isfinite(one_zero).all() and one_zero[0] > 1 and one_zero[1] == 0
    k = ogm_coefficients(one_zero, alpha=0.5)
    assert torch.isfinite(k).all()


@pytest.mark.parametrize("form", ["official", "continuous"])
@pytest.mark.parametrize("rho_a", [0.3, 1.0, 1.7, 4.0])
def test_ogm_coefficients(form, rho_a):
    alpha = 0.8
    rho = torch.tensor([rho_a, 1 / rho_a], dtype=torch.float64)
    k = ogm_coefficients(rho, alpha, form).tolist()
    for r, km in zip(rho.tolist(), k):
        x = r if form == "official" else r - 1
        expected = 1 - math.tanh(alpha * x) if r > 1 else 1.0
        assert km == pytest.approx(expected, abs=1e-12)


@pytest.fixture
def model_with_grads(tiny_info, tiny_batch):
    """The concat model after one backward pass of the fused loss on tiny_batch()."""
    torch.manual_seed(0)
    model = build_model(tiny_info(), "concat")
    inputs, labels = tiny_batch()
    out = model(inputs)
    torch.nn.functional.cross_entropy(out["logits"], labels).backward()
    return model


@pytest.mark.parametrize("which", ["conv", "all"])
def test_ogm_scales_exactly_the_selected_gradients(model_with_grads, which):
    model = model_with_grads
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    enc_a, enc_v = model.encoder_parameters()
    groups = [ogm_parameters(enc_a, which), ogm_parameters(enc_v, which)]
    k = torch.tensor([0.25, 1.0])
    modulate_gradients_(groups, k)
    scaled_ids = {id(p) for p in groups[0]}
    n_scaled = 0
    for name, p in model.named_parameters():
        if id(p) in scaled_ids:
            assert torch.equal(p.grad, before[name] * 0.25), name
            n_scaled += 1
        else:
            assert torch.equal(p.grad, before[name]), name
    if which == "conv":
        assert all(p.ndim == 4 for p in groups[0]) and n_scaled == 20  # ResNet18: 20 conv weights
    else:
        assert n_scaled == len(enc_a)


def test_ogm_ge_noise_has_the_gradients_std():
    torch.manual_seed(0)
    big_a = torch.nn.Parameter(torch.zeros(256, 64, 3, 3))
    big_v = torch.nn.Parameter(torch.zeros(128, 128, 3, 3))
    big_a.grad = torch.randn_like(big_a) * 0.02 + 0.003
    big_v.grad = torch.randn_like(big_v) * 0.5
    g_a, g_v = big_a.grad.clone().double(), big_v.grad.clone().double()
    k = torch.tensor([0.4, 1.0])
    modulate_gradients_([[big_a], [big_v]], k, gaussian_noise=True)
    for g0, p, km in ((g_a, big_a, 0.4), (g_v, big_v, 1.0)):
        noise = p.grad.double() - km * g0
        expected_std = g0.std().item()  # std before scaling, as the paper
        assert noise.std().item() == pytest.approx(expected_std, rel=0.02)
        assert abs(noise.mean().item()) < 0.02 * expected_std
        assert noise.abs().max() > 0


@pytest.mark.parametrize("rho_a", [0.5, 1.0, 1.3, 3.0])
def test_opm_drop_probabilities(rho_a):
    q_base, lam = 0.4, 0.9
    rho = torch.tensor([rho_a, 1 / rho_a])
    q = opm_drop_probabilities(rho, q_base, lam).tolist()
    for r, qm in zip(rho.tolist(), q):
        expected = min(max(q_base * (1 + lam * math.tanh(r - 1)), 0.0), 1.0) if r > 1 else 0.0
        assert qm == pytest.approx(expected, abs=1e-6)


def test_opm_probability_is_clipped():
    q = opm_drop_probabilities(torch.tensor([50.0, 0.02]), q_base=0.9, lam=5.0)
    assert q.tolist() == [1.0, 0.0]


def test_opm_mask_rates_and_rescaling():
    torch.manual_seed(0)
    batch, d_a, d_v = 20000, 6, 2
    feats = (torch.ones(batch, d_a), torch.full((batch, d_v), 2.0))
    q = torch.tensor([0.3, 0.0])
    (fa, fv), weight, keep = opm_feature_dropout(feats, q, p_exe=1.0)
    keep_rate = keep[:, 0].double().mean().item()
    sigma = math.sqrt(0.3 * 0.7 / batch)
    assert abs(keep_rate - 0.7) < 4 * sigma
    assert keep[:, 1].all()
    theta = (d_a * 0.3 + d_v * 0.0) / (d_a + d_v)
    scale = 1 / (1 - theta)
    kept, dropped = keep[:, 0], ~keep[:, 0]
    assert torch.allclose(fa[kept], torch.full_like(fa[kept], scale))
    assert (fa[dropped] == 0).all()
    assert torch.allclose(fv, torch.full_like(fv, 2.0 * scale))
    assert (weight == 1).all()  # the visual stream is never dropped here


def test_opm_samples_with_every_modality_dropped_leave_the_loss():
    torch.manual_seed(1)
    feats = (torch.ones(5000, 4), torch.ones(5000, 4))
    _, weight, keep = opm_feature_dropout(feats, torch.tensor([0.5, 0.5]), p_exe=1.0)
    assert torch.equal(weight, keep.any(dim=1).float())
    assert 0.2 < (weight == 0).float().mean().item() < 0.3  # expected 0.25


def test_opm_p_exe_is_a_per_batch_draw():
    torch.manual_seed(2)
    feats = (torch.ones(8, 3), torch.ones(8, 3))
    executed = 0
    trials = 4000
    for _ in range(trials):
        (fa, _), _, keep = opm_feature_dropout(feats, torch.tensor([1.0, 0.0]), p_exe=0.3)
        executed += int(not keep[:, 0].any())  # q = 1: an executed batch drops every audio row
        assert keep[:, 0].all() or not keep[:, 0].any()
    assert abs(executed / trials - 0.3) < 4 * math.sqrt(0.3 * 0.7 / trials)


def test_opm_p_exe_zero_changes_nothing():
    feats = (torch.randn(16, 4), torch.randn(16, 4))
    (fa, fv), weight, _ = opm_feature_dropout(feats, torch.tensor([0.9, 0.0]), p_exe=0.0)
    assert torch.equal(fa, feats[0]) and torch.equal(fv, feats[1]) and (weight == 1).all()


@pytest.mark.parametrize(
    "starts,ends,warmup,active_epochs",
    [(0, 10**9, 0, [0, 1, 2, 3, 4]), (1, 3, 0, [1, 2, 3]), (0, 3, 2, [2, 3]), (2, 2, 0, [2])],
)
def test_modulation_window_and_warmup(starts, ends, warmup, active_epochs):
    cfg = ModulationConfig(modulation="OGM", modulation_starts=starts, modulation_ends=ends, warmup_epochs=warmup)
    assert [e for e in range(5) if cfg.active(e)] == active_epochs


def test_modulator_leaves_gradients_alone_outside_its_window(model_with_grads, tiny_batch):
    model = model_with_grads
    inputs, labels = tiny_batch()
    out = model(inputs)
    before = [p.grad.clone() for p in model.parameters()]
    mod = Modulator(ModulationConfig(modulation="OGM_GE", alpha=1.0, modulation_starts=3), model.encoder_parameters())
    mod.modulate_gradients(out, labels, epoch=2)
    assert all(torch.equal(b, p.grad) for b, p in zip(before, model.parameters()))
    assert mod.stats["coeff"].tolist() == [1.0, 1.0]


def test_modulator_applies_the_coefficient_of_the_batch(model_with_grads, tiny_batch):
    model = model_with_grads
    model.eval()  # fixed BN statistics: the same z_m on the second forward
    inputs, labels = tiny_batch()
    out = model(inputs)
    enc_a, enc_v = model.encoder_parameters()
    conv_a = [p for p in enc_a if p.ndim == 4]
    conv_v = [p for p in enc_v if p.ndim == 4]
    before_a = [p.grad.clone() for p in conv_a]
    before_v = [p.grad.clone() for p in conv_v]
    alpha = 0.7
    mod = Modulator(ModulationConfig(modulation="OGM", alpha=alpha), model.encoder_parameters())
    mod.modulate_gradients(out, labels, epoch=0)
    za, zv = (z.double() for z in out["unimodal_logits"])
    s = [softmax_true_class_sum(za.tolist(), labels.tolist()), softmax_true_class_sum(zv.tolist(), labels.tolist())]
    rho = [s[0] / s[1], s[1] / s[0]]
    k = [1 - math.tanh(alpha * r) if r > 1 else 1.0 for r in rho]
    assert mod.stats["coeff"].tolist() == pytest.approx(k, rel=1e-5)
    for b, p in zip(before_a, conv_a):
        assert torch.allclose(p.grad, b * k[0], rtol=1e-6, atol=0)
    for b, p in zip(before_v, conv_v):
        assert torch.allclose(p.grad, b * k[1], rtol=1e-6, atol=0)


def test_concat_unimodal_logits_are_the_heads_shares(tiny_info, tiny_batch):
    torch.manual_seed(0)
    model = build_model(tiny_info(), "concat").eval()
    inputs, _ = tiny_batch()
    out = model(inputs)
    h_a, h_v = (h.double() for h in out["features"])
    w, b = model.head.fc.weight.double(), model.head.fc.bias.double()
    z_a = h_a @ w[:, :512].T + b / 2
    z_v = h_v @ w[:, 512:].T + b / 2
    assert torch.allclose(out["unimodal_logits"][0].double(), z_a, atol=1e-5)
    assert torch.allclose(out["unimodal_logits"][1].double(), z_v, atol=1e-5)
    assert torch.allclose(out["logits"].double(), z_a + z_v, atol=1e-5)  # the shares add up to the output


def test_sum_unimodal_logits_are_each_branch(tiny_info, tiny_batch):
    torch.manual_seed(0)
    model = build_model(tiny_info(), "sum").eval()
    inputs, _ = tiny_batch()
    out = model(inputs)
    h_a, h_v = out["features"]
    fc_a, fc_v = model.head.branches
    assert torch.allclose(out["unimodal_logits"][0], fc_a(h_a))
    assert torch.allclose(out["logits"], fc_a(h_a) + fc_v(h_v), atol=1e-6)


def test_evaluation_drops_nothing_even_with_opm_configured(tiny_info, tiny_batch):
    from onthefly.data.presets import DevicePreset
    from onthefly.engine import predict

    torch.manual_seed(0)
    info = tiny_info()
    model = build_model(info, "concat")
    inputs, labels = tiny_batch()
    batch = {**inputs, "label": labels, "index": torch.arange(len(labels))}
    preset = DevicePreset(info, torch.device("cpu"))
    mod = Modulator(ModulationConfig(modulation="OPM", q_base=1.0, lam=0.0, p_exe=1.0), model.encoder_parameters())
    model.eval()
    x, y = preset(batch)
    plain = model(x)["logits"]
    hooked = model(x, feature_hook=mod.feature_hook(y, epoch=0))["logits"]
    assert not torch.allclose(hooked, plain)  # the hook does drop features when asked
    pred = predict(model, [batch], preset, None)
    assert torch.equal(pred["logits"], plain)
