"""Paired comparisons of a method with the baseline over a few seeds, and what survives several of them.

For the differences d_s = method(s) - baseline(s) over the n seeds both have:
  - the paired t-interval of the mean difference (primary): mean(d) ± t_{n-1, 1-a/2} sd(d) / sqrt(n),
    and its two-sided p-value;
  - the exact sign-flip permutation test: under "no difference" each d_s is as likely to be
    +|d_s| as -|d_s|, so the p-value is the share of all 2^n sign patterns (the observed one
    included) whose |mean| is at least the observed |mean|. Exact, no normality assumed; its
    smallest possible value is 2 / 2^n (0.0625 at n = 5, 0.002 at n = 10);
  - the percentile bootstrap interval of the mean, a secondary summary only: with few seeds it
    cannot reach past the smallest and largest d_s and under-covers;
  - Holm's step-down correction of the permutation p-values across the methods compared with
    the same baseline (family-wise error rate at `alpha`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
MAX_EXACT_SEEDS = 20  # 2^20 sign patterns: enumerating more would take minutes and gigabytes
# Accuracies are ratios of counts, so many sign patterns tie the observed sum exactly, and a tie
# must count (|sum| >= observed). In floats, sums that are equal as fractions differ in their last
# bits, and by more when the values were read back from a 10-digit CSV; so sums within this of the
# observed one count as ties. Far below any real difference: one sample of a 100,000-sample test
# split moves an accuracy by 1e-5.
TIE_TOLERANCE = 1e-8


def paired_differences(method: Mapping[int, float], baseline: Mapping[int, float]) -> tuple[list[int], np.ndarray]:
    """The seeds both have (sorted) and method - baseline on each, in float64."""
    seeds = sorted(set(method) & set(baseline))
    return seeds, np.array([method[s] - baseline[s] for s in seeds], dtype=np.float64)


def t_interval(d: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, float]:
    """Mean of d, its Student-t confidence interval and the two-sided p-value of "mean 0"."""
    d = np.asarray(d, dtype=np.float64)
    if len(d) < 2:
        raise ValueError(f"a t-interval needs at least 2 paired differences (got {len(d)})")
    # Every difference equal: sd = 0, the interval is that value and the p-value is 0 (or 1 at 0).
    if np.ptp(d) == 0:
        return {"mean": float(d[0]), "low": float(d[0]), "high": float(d[0]), "p": float(d[0] == 0)}
    result = stats.ttest_1samp(d, 0.0)
    ci = result.confidence_interval(confidence)
    return {"mean": float(d.mean()), "low": float(ci.low), "high": float(ci.high), "p": float(result.pvalue)}


def sign_flip_p(d: Sequence[float]) -> float:
    """Exact two-sided sign-flip permutation p-value of the mean of d: the share of all 2^n sign
    patterns (the observed one included) whose |sum| reaches the observed |sum| (ties count)."""
    d = np.asarray(d, dtype=np.float64)
    if not 1 <= len(d) <= MAX_EXACT_SEEDS:
        raise ValueError(f"the exact sign-flip test takes 1 to {MAX_EXACT_SEEDS} differences (got {len(d)})")
    # Written out rather than scipy.stats.permutation_test: its tie tolerance is relative to float
    # epsilon, which splits ties that are exact in counts (see TIE_TOLERANCE).
    sums = np.zeros(1)
    for x in d:  # after step i: the 2^i signed sums of d[:i]
        sums = np.concatenate([sums + x, sums - x])
    return float(np.mean(np.abs(sums) >= abs(d.sum()) - TIE_TOLERANCE))


def bootstrap_interval(
    d: Sequence[float], confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> dict[str, float]:
    """Percentile bootstrap interval of the mean of d (secondary: see the module docstring)."""
    d = np.asarray(d, dtype=np.float64)
    ci = stats.bootstrap(
        (d,),
        np.mean,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return {"low": float(ci.low), "high": float(ci.high)}


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order.

    Sorted ascending p_(1) <= ... <= p_(m): adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
    Rejecting where the adjusted value is < alpha controls the family-wise error rate at alpha.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if np.any((p < 0) | (p > 1) | ~np.isfinite(p)):
        raise ValueError(f"p-values must lie in [0, 1] (got {p.tolist()})")
    order = np.argsort(p, kind="stable")
    m = len(p)
    stepped = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(stepped)
    return adjusted.tolist()


def compare_paired(
    method: Mapping[int, float], baseline: Mapping[int, float], confidence: float = CONFIDENCE
) -> dict[str, Any] | None:
    """Every statistic of one method against the baseline, paired by seed (None under 2 shared seeds)."""
    seeds, d = paired_differences(method, baseline)
    if len(seeds) < 2:
        return None
    t = t_interval(d, confidence)
    boot = bootstrap_interval(d, confidence)
    return {
        "mean": t["mean"],
        "low": t["low"],
        "high": t["high"],
        "t_p": t["p"],
        "perm_p": sign_flip_p(d),
        "boot_low": boot["low"],
        "boot_high": boot["high"],
        "n": len(seeds),
        "seeds": seeds,
        "differences": d.tolist(),
    }


def holm_verdicts(comparisons: Mapping[str, dict[str, Any] | None], alpha: float = ALPHA) -> dict[str, dict[str, Any]]:
    """Holm-adjust the permutation p-values of every comparison against one baseline.

    Returns {name: {"holm_p": adjusted p, "survives": adjusted p < alpha}} for the comparisons
    that exist (a None comparison, too few seeds, is not part of the family).
    """
    names = [name for name, c in comparisons.items() if c is not None]
    adjusted = holm_adjust([comparisons[name]["perm_p"] for name in names])
    return {name: {"holm_p": p, "survives": p < alpha} for name, p in zip(names, adjusted)}
