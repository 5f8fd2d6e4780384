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
    out = integrate_gradients(g_mm, g_uni, gamma=1.5)
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
    assert grid[np.argmin(np.linalg.norm(np.outer(grid, a) + np.outer(1 - grid, b), axis=1))] == pytest.approx(c, abs=1e-6)
    out = integrate_gradients(g_mm, g_uni, gamma=1.5)
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
    assert integrate_gradients(g_mm, g_uni, gamma=1.5)[0].tolist() == pytest.approx([4.5, -6.0])
    # Opposite gradients of equal norm: the min-norm point is 0, and so is the update.
    assert integrate_gradients([_t([1.0, 2.0])], [_t([-1.0, -2.0])], gamma=1.5)[0].tolist() == [0.0, 0.0]


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
