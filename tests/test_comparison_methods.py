"""The rules of the ablations (OGM_CONST, DROPOUT_UNIFORM, UNIMODAL_AUX) and of the two published
alternatives (MMPareto, PMR), each checked in float64 on a tiny batch against values worked out
here by hand (or by a brute-force search where the rule is an optimum)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from onthefly.modulation.ablations import constant_coefficients, uniform_drop_probabilities, unimodal_cross_entropy
from onthefly.modulation.mmpareto import integrate_gradients, pareto_weights
from onthefly.modulation.ogm import modulate_gradients_
from onthefly.modulation.opm import opm_feature_dropout
from onthefly.modulation.pmr import class_sums, pmr_loss, pmr_weights, prototype_logits, prototypes_from_sums

D = torch.float64


def _t(values):
    return torch.tensor(values, dtype=D)


# --------------------------------------------------------------------------- OGM_CONST


def test_constant_coefficient_scales_only_the_named_modality():
    k = constant_coefficients(2, dominant=0, k=0.3, device=None)
    assert k.tolist() == pytest.approx([0.3, 1.0])
    w_a, w_b = torch.nn.Parameter(_t([[1.0, -2.0]])), torch.nn.Parameter(_t([[0.5, 3.0]]))
    x = _t([[2.0, 1.0], [-1.0, 4.0]])
    ((x @ w_a.T).sum() + (x @ w_b.T).pow(2).sum()).backward()
    # d/dw_a sum(x w_a) = column sums of x = (1, 5); d/dw_b sum((x w_b)^2) = 2 sum_i (x_i w_b) x_i:
    # x w_b = (4, 11.5) -> 2 (4 (2, 1) + 11.5 (-1, 4)) = (-7, 100).
    assert w_a.grad.tolist() == [[1.0, 5.0]] and w_b.grad.tolist() == [[-7.0, 100.0]]
    modulate_gradients_([[w_a], [w_b]], k.to(D))
    assert w_a.grad[0].tolist() == pytest.approx([0.3, 1.5]) and w_b.grad.tolist() == [[-7.0, 100.0]]
    assert constant_coefficients(3, dominant=2, k=0.5).tolist() == [1.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="outside 0..1"):
        constant_coefficients(2, dominant=2, k=0.5)


# --------------------------------------------------------------------------- DROPOUT_UNIFORM


def test_uniform_dropout_uses_opms_rescale_and_sample_rule():
    q = uniform_drop_probabilities(2, 0.25)
    assert q.tolist() == [0.25, 0.25]
    torch.manual_seed(0)
    h_a, h_b = torch.randn(6, 2, dtype=D), torch.randn(6, 3, dtype=D)
    (out_a, out_b), weight, keep = opm_feature_dropout((h_a, h_b), q, p_exe=1.0)
    # theta = (2 x 0.25 + 3 x 0.25) / 5 = 0.25: kept features are scaled by 1 / 0.75 (OPM forms the
    # scale in float32, hence the tolerance).
    for m, (h, out) in enumerate([(h_a, out_a), (h_b, out_b)]):
        for i in range(6):
            expected = h[i] / 0.75 if keep[i, m] else torch.zeros_like(h[i])
            assert torch.allclose(out[i], expected, rtol=1e-7, atol=0)
    assert weight.tolist() == [float(keep[i].any()) for i in range(6)]
    # Rates: every modality dropped about a quarter of the time, whatever the discrepancy.
    big = (torch.ones(20_000, 1), torch.ones(20_000, 1))
    _, _, keep = opm_feature_dropout(big, uniform_drop_probabilities(2, 0.25), p_exe=1.0)
    assert (1 - keep.float().mean(0)).tolist() == pytest.approx([0.25, 0.25], abs=0.01)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        uniform_drop_probabilities(2, 1.0)


# --------------------------------------------------------------------------- UNIMODAL_AUX


def test_unimodal_cross_entropy_by_hand():
    z_a = _t([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]])
    z_b = _t([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    labels = torch.tensor([1, 2])

    def ce(row, y):
        return math.log(sum(math.exp(v) for v in row)) - row[y]

    expected = ((ce([1, 2, 0], 1) + ce([0, 1, 3], 2)) / 2) + ((ce([0, 0, 0], 1) + ce([2, 0, 0], 2)) / 2)
    assert unimodal_cross_entropy((z_a, z_b), labels).item() == pytest.approx(expected, rel=1e-7)


# --------------------------------------------------------------------------- MMPareto


def test_mmpareto_without_conflict_is_gamma_times_the_sum():
    g_mm, g_uni = [_t([1.0, 0.0]), _t([2.0])], [_t([1.0, 1.0]), _t([0.0])]  # cos > 0
    assert pareto_weights(g_mm, g_uni).tolist() == [0.5, 0.5]
    out, _ = integrate_gradients(g_mm, g_uni, gamma=1.5)
    assert out[0].tolist() == pytest.approx([3.0, 1.5]) and out[1].tolist() == pytest.approx([3.0])


def test_mmpareto_with_conflict_takes_the_min_norm_direction_and_the_sums_magnitude():
    # One encoder with two tensors: g_mm = ((1, 0), (0.5)), g_uni = ((-1, 1), (-2)).
    g_mm, g_uni = [_t([1.0, 0.0]), _t([0.5])], [_t([-1.0, 1.0]), _t([-2.0])]
    # a.a = 1.25, a.b = -1 - 1 = -2, b.b = 6: cos < 0; c = (6 + 2) / (1.25 + 6 + 4) = 8 / 11.25.
    c = 8 / 11.25
    w = pareto_weights(g_mm, g_uni)
    assert w.tolist() == pytest.approx([c, 1 - c], abs=1e-12)
    # The same c by brute force: the norm of c a + (1 - c) b over a fine grid of c.
    a, b = np.array([1.0, 0.0, 0.5]), np.array([-1.0, 1.0, -2.0])
    grid = np.linspace(0, 1, 1_000_001)
    assert grid[np.argmin(np.linalg.norm(np.outer(grid, a) + np.outer(1 - grid, b), axis=1))] == pytest.approx(
        c, abs=1e-6
    )
    out, _ = integrate_gradients(g_mm, g_uni, gamma=1.5)
    for mm, uni, got in zip(g_mm, g_uni, out):
        new = 2 * (c * mm + (1 - c) * uni)
        boost = max(1.0, float((mm + uni).norm() / new.norm()))
        assert got.tolist() == pytest.approx((1.5 * boost * new).tolist(), abs=1e-12)
    # First tensor: new = 2 (c - (1 - c), 1 - c) = (0.8444.., 0.4444..), |new| = 0.9543 < |(0, 1)| = 1 -> boosted;
    # second: new = 2 (0.5 c - 2 (1 - c)) = -0.4444.., |sum| = 1.5 -> boosted to norm 1.5, times 1.5.
    assert out[1].tolist() == pytest.approx([-2.25], abs=1e-12)


def test_mmpareto_boundary_cases_follow_the_released_solver():
    # A zero multimodal gradient: cos = 0 counts as a conflict and the solver's clip gives c = 0.999;
    # the result is then the unimodal gradient rescaled to the sum's norm, times gamma.
    g_mm, g_uni = [_t([0.0, 0.0])], [_t([3.0, -4.0])]
    assert pareto_weights(g_mm, g_uni).tolist() == pytest.approx([0.999, 0.001])
    assert integrate_gradients(g_mm, g_uni, gamma=1.5)[0][0].tolist() == pytest.approx([4.5, -6.0])
    # Opposite gradients of equal norm: the min-norm point is 0, and so is the update.
    assert integrate_gradients([_t([1.0, 2.0])], [_t([-1.0, -2.0])], gamma=1.5)[0][0].tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------- PMR


def test_pmr_prototypes_logits_weights_and_loss_by_hand():
    h_a = _t([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    h_v = _t([[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]])
    labels = torch.tensor([0, 1, 0])
    sums, counts = class_sums(h_a, labels, num_classes=2)
    assert sums.tolist() == [[1.0, 0.0], [3.0, 4.0]] and counts.tolist() == [2.0, 1.0]
    p_a = prototypes_from_sums(sums, counts, previous=None, momentum=0.2)
    assert p_a.tolist() == [[0.5, 0.0], [3.0, 4.0]]
    blended = prototypes_from_sums(sums, counts, previous=torch.zeros(2, 2), momentum=0.2)
    assert blended.flatten().tolist() == pytest.approx([0.4, 0.0, 2.4, 3.2])
    p_a, p_v = p_a.to(D), _t([[1.0, 1.0], [0.0, 1.0]])

    u_a, u_v = prototype_logits(h_a, p_a), prototype_logits(h_v, p_v)
    # Distances of h_a to (0.5, 0) and (3, 4): (0.5, 5), (sqrt(22.25), 0), (0.5, sqrt(20)).
    # (0 is floored to 1e-6.)
    assert u_a.flatten().tolist() == pytest.approx([-0.5, -5.0, -math.sqrt(22.25), 0.0, -0.5, -math.sqrt(20)], abs=2e-6)

    def softmax_true(rows, ys):
        return sum(math.exp(r[y]) / sum(math.exp(v) for v in r) for r, y in zip(rows, ys))

    s_a, s_v = softmax_true(u_a.tolist(), [0, 1, 0]), softmax_true(u_v.tolist(), [0, 1, 0])
    ratio_a = s_a / s_v
    assert ratio_a > 1  # audio ahead: only the visual prototypical loss counts
    weights = pmr_weights(_t([ratio_a, 1 / ratio_a]), alpha=2.0)
    assert weights.tolist() == [0.0, 2.0]
    assert pmr_weights(_t([1.0, 1.0]), alpha=2.0).tolist() == [0.0, 0.0]  # a tie: neither

    def ce(rows, ys):
        return sum(math.log(sum(math.exp(v) for v in r)) - r[y] for r, y in zip(rows, ys)) / len(ys)

    loss = pmr_loss((u_a, u_v), labels, weights)
    assert loss.item() == pytest.approx(2.0 * ce(u_v.tolist(), [0, 1, 0]), rel=1e-12)
    # Gradient reaches the features (the encoders). h_v[0] lies on its class prototype (1, 1): the
    # distance floor gives it zero gradient through that distance where a plain sqrt gives NaN.
    h_v.requires_grad_(True)
    pmr_loss((u_a, prototype_logits(h_v, p_v)), labels, weights).backward()
    assert h_v.grad.isfinite().all() and h_v.grad[1:].abs().sum() > 0
    # Row 0: only the distance to the other prototype (0, 1) counts. dCE/du_01 = softmax(u_v[0])_1 = p_01,
    # du_01/dh = -(h - (0, 1)) / |h - (0, 1)| = (-1, 0); the loss is 2 x the mean over 3 samples.
    p_01 = math.exp(-1.0) / (math.exp(0.0) + math.exp(-1.0))
    assert h_v.grad[0].tolist() == pytest.approx([-2 / 3 * p_01, 0.0], abs=1e-6)


# --------------------------------------------------------------------------- through the Modulator


class TinyDoubleModel(torch.nn.Module):
    """The modulation contract in float64: two linear encoders and the concat head. The engine's
    loss and the z_m are float32 by design, so these checks of the wiring hold to float32
    precision; the rules themselves are checked exactly above."""

    modality_names = ("a", "b")

    def __init__(self, num_classes: int = 3):
        super().__init__()
        from onthefly.models.fusion import ConcatFusion

        self.encoders = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 2), "b": torch.nn.Linear(4, 2)})
        self.head = ConcatFusion(2, num_classes)
        self.double()

    def forward(self, inputs, feature_hook=None):
        features = tuple(self.encoders[m](inputs[m]) for m in self.modality_names)
        out = {"features": features, "unimodal_logits": self.head.unimodal_logits(*features), "sample_weight": None}
        if feature_hook is not None:
            features, out["sample_weight"] = feature_hook(out)
        out["logits"] = self.head(*features)
        return out

    def encoder_parameters(self):
        return tuple(list(self.encoders[m].parameters()) for m in self.modality_names)


def _tiny_step(modulation: str, **settings):
    from onthefly.engine import compute_loss
    from onthefly.modulation import ModulationConfig, Modulator

    torch.manual_seed(0)
    model = TinyDoubleModel()
    g = torch.Generator().manual_seed(1)
    inputs = {"a": torch.randn(5, 3, generator=g, dtype=D), "b": torch.randn(5, 4, generator=g, dtype=D)}
    labels = torch.tensor([0, 1, 2, 1, 0])
    modulator = Modulator.for_model(model, ModulationConfig(modulation=modulation, **settings))
    modulator.begin_epoch(model, [(inputs, labels)], lambda batch: batch, epoch=0)
    out = model(inputs, feature_hook=modulator.feature_hook(labels, 0))
    loss = compute_loss(out, labels, model.head)
    loss = loss + modulator.auxiliary_loss(out, labels, 0, loss)
    loss.backward()
    modulator.modulate_gradients(out, labels, 0)
    return model, modulator, inputs, labels


def _plain_grads(inputs, labels, extra=None):
    """Every parameter's gradient of CE(fused) (+ extra(model, features)) on a fresh copy of the tiny model."""
    torch.manual_seed(0)
    model = TinyDoubleModel()
    features = [model.encoders[m](inputs[m]) for m in model.modality_names]
    loss = torch.nn.functional.cross_entropy(model.head(*features), labels)
    if extra is not None:
        loss = loss + extra(model, features)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, model, features


def test_ogm_const_through_the_modulator_scales_the_named_encoder_by_k():
    model, modulator, inputs, labels = _tiny_step("OGM_CONST", const_dominant="b", const_k=0.25, ogm_params="all")
    plain, _, _ = _plain_grads(inputs, labels)
    for name, p in model.named_parameters():
        k = 0.25 if name.startswith("encoders.b.") else 1.0
        assert torch.allclose(p.grad, k * plain[name], rtol=1e-5, atol=1e-7), name


def test_unimodal_aux_gradient_of_a_head_share_by_hand():
    model, _, inputs, labels = _tiny_step("UNIMODAL_AUX", aux_weight=0.5)
    plain, fresh, features = _plain_grads(inputs, labels)
    # z_a = h_a W_a^T + b / 2; d CE(z_a) / d W_a = (softmax(z_a) - onehot)^T h_a / B, d / db = mean(...) / 2.
    h_a = features[0].detach().numpy()
    w = fresh.head.fc.weight.detach().numpy()
    b = fresh.head.fc.bias.detach().numpy()
    z_a = h_a @ w[:, :2].T + b / 2
    p_a = np.exp(z_a - z_a.max(1, keepdims=True))
    p_a /= p_a.sum(1, keepdims=True)
    residual = p_a - np.eye(3)[labels.numpy()]
    expected_w_a = plain["head.fc.weight"].numpy()[:, :2] + 0.5 * residual.T @ h_a / 5
    assert np.allclose(model.head.fc.weight.grad.numpy()[:, :2], expected_w_a, rtol=1e-5, atol=1e-7)

    # The encoders get the aux loss too: compare with autograd on the written-out loss.
    def aux(m, fs):
        w, b = m.head.fc.weight, m.head.fc.bias
        return 0.5 * sum(
            torch.nn.functional.cross_entropy(h @ w[:, 2 * i : 2 * i + 2].T + b / 2, labels) for i, h in enumerate(fs)
        )

    with_aux, _, _ = _plain_grads(inputs, labels, aux)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, with_aux[name], rtol=1e-5, atol=1e-7), name


def test_mmpareto_through_the_modulator_integrates_separately_taken_gradients():
    model, _, inputs, labels = _tiny_step("MMPARETO")

    # As the released code takes them: one backward per loss, each encoder's gradients read off.
    def share_ce(i):
        def loss(m, fs):
            w, b = m.head.fc.weight, m.head.fc.bias
            return torch.nn.functional.cross_entropy(fs[i] @ w[:, 2 * i : 2 * i + 2].T + b / 2, labels)

        return loss

    joint, _, _ = _plain_grads(inputs, labels)
    total, _, _ = _plain_grads(inputs, labels, lambda m, fs: share_ce(0)(m, fs) + share_ce(1)(m, fs))
    for i, name in enumerate(("a", "b")):
        uni_all, _, _ = _plain_grads(inputs, labels, share_ce(i))
        keys = [f"encoders.{name}.weight", f"encoders.{name}.bias"]
        g_mm = [joint[k] for k in keys]
        g_uni = [uni_all[k] - joint[k] for k in keys]
        for k, expected in zip(keys, integrate_gradients(g_mm, g_uni, gamma=1.5)[0]):
            assert torch.allclose(dict(model.named_parameters())[k].grad, expected, rtol=1e-5, atol=1e-7), k
    for k in ("head.fc.weight", "head.fc.bias"):  # the head keeps the plain summed gradient
        assert torch.allclose(dict(model.named_parameters())[k].grad, total[k], rtol=1e-5, atol=1e-7)


def test_pmr_prototypes_come_from_the_first_tenth_of_the_batches_and_blend():
    from onthefly.modulation import ModulationConfig, Modulator

    torch.manual_seed(0)
    model = TinyDoubleModel()
    g = torch.Generator().manual_seed(2)
    batches = [
        (
            {"a": torch.randn(4, 3, generator=g, dtype=D), "b": torch.randn(4, 4, generator=g, dtype=D)},
            torch.tensor([0, 1, 2, i % 3]),
        )
        for i in range(25)
    ]
    modulator = Modulator.for_model(model, ModulationConfig(modulation="PMR", pmr_momentum=0.25))
    modulator.begin_epoch(model, batches, lambda batch: batch, epoch=0)
    with torch.no_grad():  # 25 // 10 = 2 batches
        h = torch.cat([model.encoders["a"](x["a"]) for x, _ in batches[:2]])
        y = torch.cat([labels for _, labels in batches[:2]])
        means = torch.stack([h[y == k].mean(0) for k in range(3)])
    assert torch.allclose(modulator.prototypes[0].double(), means, atol=1e-6)
    first = modulator.prototypes[0].clone()
    with torch.no_grad():
        model.encoders["a"].bias += 1.0  # the encoder moved: new class means, each shifted by 1
    modulator.begin_epoch(model, batches, lambda batch: batch, epoch=1)  # epoch 1: fresh means, as released
    assert torch.allclose(modulator.prototypes[0], first + 1.0, atol=1e-6)
    with torch.no_grad():
        model.encoders["a"].bias += 1.0
    modulator.begin_epoch(model, batches, lambda batch: batch, epoch=2)  # from epoch 2: blended
    assert torch.allclose(modulator.prototypes[0], 0.75 * (first + 2.0) + 0.25 * (first + 1.0), atol=1e-6)
    assert model.training  # back in training mode
    # A resumed run: without the previous prototypes a blending epoch is refused; with them restored
    # (state_dict / load_state_dict) it blends as the uninterrupted run did.
    resumed = Modulator.for_model(model, ModulationConfig(modulation="PMR", pmr_momentum=0.25))
    with pytest.raises(RuntimeError, match="load_state_dict"):
        resumed.begin_epoch(model, batches, lambda batch: batch, epoch=3)
    resumed.load_state_dict(modulator.state_dict())
    resumed.begin_epoch(model, batches, lambda batch: batch, epoch=3)
    modulator.begin_epoch(model, batches, lambda batch: batch, epoch=3)
    assert torch.equal(resumed.prototypes[0], modulator.prototypes[0])


def test_settings_of_the_new_methods_are_checked():
    from onthefly.modulation import ModulationConfig, Modulator

    with pytest.raises(ValueError, match="OGM_CONST needs const_dominant"):
        ModulationConfig(modulation="OGM_CONST")
    with pytest.raises(ValueError, match="drop_prob must be < 1"):
        ModulationConfig(modulation="DROPOUT_UNIFORM", drop_prob=1.0)
    with pytest.raises(ValueError, match="'c' is not a modality of this model"):
        Modulator.for_model(TinyDoubleModel(), ModulationConfig(modulation="OGM_CONST", const_dominant="c"))
    modulator = Modulator.for_model(TinyDoubleModel(), ModulationConfig(modulation="PMR"))
    out = TinyDoubleModel()({"a": torch.zeros(2, 3, dtype=D), "b": torch.zeros(2, 4, dtype=D)})
    with pytest.raises(RuntimeError, match="call begin_epoch"):
        modulator.auxiliary_loss(out, torch.tensor([0, 1]), 0, torch.zeros(()))


def test_the_protocol_accepts_the_new_methods_and_checks_their_settings(tmp_path):
    import yaml

    from onthefly.errors import UserError
    from onthefly.experiments.grid import load_grid
    from onthefly.experiments.spec import check_run_options

    methods = {
        "none": {"grid": {"lr": [0.01, 0.02]}},
        "OGM_CONST": {"grid": {"const_dominant": ["audio"], "const_k": [0.3, 0.6]}},
        "DROPOUT_UNIFORM": {"grid": {"drop_prob": [0.1, 0.2]}},
        "UNIMODAL_AUX": {"grid": {"aux_weight": [0.5, 1.0]}},
        "MMPARETO": {"grid": {"pareto_gamma": [1.0, 1.5]}},
        "PMR": {"grid": {"pmr_alpha": [0.5, 1.0]}},
    }
    grid = {"common": {"dataset": "avdigits", "epochs": 1}, "tuning_seeds": [10], "test_seeds": [0], "methods": methods}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    check_run_options(load_grid(path))  # every point resolves with train.py's own parser and checks
    methods["OGM_CONST"] = {"grid": {"const_k": [0.3, 0.6]}}
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(UserError, match="OGM_CONST needs --const_dominant"):
        check_run_options(load_grid(path))


def test_command_line_misuse_of_the_new_settings_is_one_line():
    from onthefly.config import resolve_config
    from onthefly.errors import UserError

    with pytest.raises(UserError, match="^--modulation OGM_CONST needs --const_dominant"):
        resolve_config(["--modulation", "OGM_CONST"])
    with pytest.raises(UserError, match="^--drop_prob must be < 1"):
        resolve_config(["--modulation", "DROPOUT_UNIFORM", "--drop_prob", "1"])
    cfg = resolve_config(["--modulation", "PMR", "--pmr_alpha", "2", "--pmr_momentum", "0.2"])
    assert (cfg.pmr_alpha, cfg.pmr_momentum) == (2.0, 0.2)


def test_pmr_under_ddp_sums_the_prototype_sums_and_counts_over_ranks():
    from onthefly.modulation import ModulationConfig, Modulator

    torch.manual_seed(0)
    model = TinyDoubleModel()
    g = torch.Generator().manual_seed(3)
    batches = [
        (
            {"a": torch.randn(6, 3, generator=g, dtype=D), "b": torch.randn(6, 4, generator=g, dtype=D)},
            torch.tensor([0, 1, 2, 0, 1, 2]),
        )
    ]
    single = Modulator.for_model(model, ModulationConfig(modulation="PMR"))
    # Two ranks that saw the same shard: every sum and count doubles, the class means do not.
    reduced = []

    def two_ranks(t):
        reduced.append(t.shape)
        return t + t

    ddp = Modulator(
        ModulationConfig(modulation="PMR"),
        model.encoder_parameters(),
        reduce_fn=two_ranks,
        modality_names=model.modality_names,
        head=model.head,
    )
    for modulator in (single, ddp):
        modulator.begin_epoch(model, batches, lambda batch: batch, 0)
    assert reduced == [(3, 2), (3, 2), (3,)]  # each modality's sums, then the counts
    assert all(torch.allclose(a, b) for a, b in zip(single.prototypes, ddp.prototypes))
