"""analysis/stats.py against values computed here another way: the t-interval from its formula,
the permutation p by enumerating sign patterns with itertools, Holm on a worked example."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from onthefly.analysis.stats import compare_paired, holm_adjust, holm_verdicts, sign_flip_p, t_interval

# The per-seed differences (points) of OGM-GE+OPM minus none quoted in issue 19.
ISSUE_DIFFS = [-3.67, 3.33, 1.00, 0.33, 0.33]


def test_t_interval_is_the_textbook_formula():
    d = ISSUE_DIFFS
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = scipy_stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    p = 2 * scipy_stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1)
    got = t_interval(d)
    assert got["mean"] == pytest.approx(mean, abs=1e-12)
    assert got["low"] == pytest.approx(mean - half, abs=1e-12) and got["high"] == pytest.approx(mean + half, abs=1e-12)
    assert got["p"] == pytest.approx(p, abs=1e-12)
    assert got["low"] == pytest.approx(-2.867, abs=1e-3) and got["p"] == pytest.approx(
        0.826, abs=1e-3
    )  # issue's figures
    assert t_interval([0.5, 0.5, 0.5]) == {"mean": 0.5, "low": 0.5, "high": 0.5, "p": 0.0}
    with pytest.raises(ValueError, match="at least 2"):
        t_interval([1.0])


def _brute_force_p(d):
    observed = abs(sum(d))
    sums = [abs(sum(s * x for s, x in zip(signs, d))) for signs in itertools.product((1, -1), repeat=len(d))]
    return sum(s >= observed - 1e-9 for s in sums) / len(sums)


def test_sign_flip_p_by_hand_and_by_enumeration():
    assert sign_flip_p([1, 1, 1, 1, 1]) == pytest.approx(2 / 32)  # only all + and all - reach |mean| 1
    assert sign_flip_p([1, 2, 3]) == pytest.approx(2 / 8)  # sums 6, 4, 2, 0, 0, -2, -4, -6
    assert sign_flip_p([1, 1]) == pytest.approx(2 / 4)  # sums 2, 0, 0, -2: ties count
    assert sign_flip_p(ISSUE_DIFFS) == pytest.approx(_brute_force_p(ISSUE_DIFFS))
    # Accuracies out of 300 whose correct counts differ by (+1, +1, +1, -1): sum 2 of 4 steps; every
    # pattern but the 6 with sum 0 reaches |sum| 2, p = 10/16, whether the accuracies are exact floats
    # or written with 10 digits (as a CSV may hold them; unrounded, the ties broke to 6/16).
    method, baseline = [215, 266, 252, 272], [214, 265, 251, 273]
    exact = [m / 300 - b / 300 for m, b in zip(method, baseline)]
    ten_digits = [float(f"{m / 300:.10g}") - float(f"{b / 300:.10g}") for m, b in zip(method, baseline)]
    assert sign_flip_p(exact) == sign_flip_p(ten_digits) == pytest.approx(10 / 16)
    # Ten seeds of accuracies out of 300, against the enumeration in integer counts (no float at all).
    for seed in range(20):
        counts = np.random.default_rng(seed).integers(230, 260, size=(2, 10))
        diff = counts[0] - counts[1]
        patterns = [abs(sum(s * x for s, x in zip(signs, diff))) for signs in itertools.product((1, -1), repeat=10)]
        want = sum(p >= abs(diff.sum()) for p in patterns) / 1024
        assert sign_flip_p([m / 300 - b / 300 for m, b in zip(*counts)]) == want, seed
    rng = np.random.default_rng(0)
    for _ in range(3):
        d = rng.normal(0.5, 1.0, size=10).round(2).tolist()  # rounded: ties between patterns do occur
        assert sign_flip_p(d) == pytest.approx(_brute_force_p(d))
    assert sign_flip_p([0.3] * 10) == pytest.approx(2 / 1024)
    with pytest.raises(ValueError, match="1 to 20"):
        sign_flip_p(np.ones(21))


def test_holm_on_a_worked_example():
    # p = 0.01, 0.04, 0.03, 0.005 (m = 4): sorted 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06,
    # 0.04 x 1 = 0.04 -> raised to 0.06 by the step-down's running maximum.
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm_adjust([0.02]) == pytest.approx([0.02])  # one comparison: unchanged
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        holm_adjust([0.1, 1.5])
    family = {name: {"perm_p": p} for name, p in zip("ABCD", [0.01, 0.04, 0.03, 0.005])}
    verdicts = holm_verdicts({**family, "E": None})
    assert set(verdicts) == set("ABCD")  # no comparison, not in the family
    assert [verdicts[n]["survives"] for n in "ABCD"] == [True, False, False, True]


def test_compare_paired_pairs_by_seed():
    base = {s: 0.80 for s in range(10)}
    method = {s: 0.80 + 0.01 * (s + 1) for s in range(10)} | {99: 0.0}  # seed 99 has no pair
    c = compare_paired(method, base)
    assert c["n"] == 10 and c["seeds"] == list(range(10))
    assert c["mean"] == pytest.approx(0.055) and c["perm_p"] == pytest.approx(2 / 1024)  # every difference > 0
    assert c["low"] < c["boot_low"] <= c["boot_high"] < c["high"]  # the bootstrap is the narrower one here
    assert compare_paired({0: 0.9}, {0: 0.8}) is None
