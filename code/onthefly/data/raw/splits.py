"""Seeded train / val / test assignment for the clips that were processed.

Rules (documented in docs/datasets.md):
  * Clips that come with a split from the dataset's lists keep it.
  * A dataset without lists (CREMA-D, Kinetics-Sounds as bare class folders) gets a
    class-stratified split: per class, round(fraction x count) clips for test and for val,
    at least one each when the class has 3 clips or more. Fractions are of the whole set.
  * With groups (CREMA-D actors under --speaker_independent) whole groups are drawn until
    the fraction is reached, so no actor is in two splits.
  * A listed dataset without a val list gets one carved from train (fraction of train),
    stratified by class; where groups are class-specific (UCF101 gXX groups) whole groups
    per class are drawn, so near-duplicate clips of one group stay together. A missing
    test list is carved from train the same way.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from ...errors import UserError


def _round_count(fraction: float, n: int) -> int:
    k = int(round(fraction * n))
    if n >= 3:
        k = max(k, 1)
    return min(k, max(n - 1, 0))


def _stratified(pool: list[int], labels: Sequence[int], fraction: float, rng: random.Random) -> set[int]:
    by_class: dict[int, list[int]] = defaultdict(list)
    for i in pool:
        by_class[labels[i]].append(i)
    chosen: set[int] = set()
    for c in sorted(by_class):
        members = by_class[c]
        rng.shuffle(members)
        chosen.update(members[: _round_count(fraction, len(members))])
    return chosen


def _draw_groups(members: list[int], groups: Sequence[str], target: float, rng: random.Random) -> set[int]:
    by_group: dict[str, list[int]] = defaultdict(list)
    for i in members:
        by_group[groups[i]].append(i)
    names = sorted(by_group)
    if len(names) < 2:
        return set()
    rng.shuffle(names)
    chosen: set[int] = set()
    for k, g in enumerate(names):
        if chosen and len(chosen) >= target or k == len(names) - 1:
            break
        chosen.update(by_group[g])
    return chosen


def _stratified_two(
    pool: list[int], labels: Sequence[int], test_fraction: float, val_fraction: float, rng: random.Random
) -> tuple[set[int], set[int]]:
    """Test and val drawn per class, both sized on the class total; at least one of each
    (and one train clip) when a class has 3 clips or more."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i in pool:
        by_class[labels[i]].append(i)
    test: set[int] = set()
    val: set[int] = set()
    for c in sorted(by_class):
        members = by_class[c]
        rng.shuffle(members)
        n = len(members)
        k_test = _round_count(test_fraction, n)
        k_val = min(_round_count(val_fraction, n), max(n - k_test - 1, 0))
        test.update(members[:k_test])
        val.update(members[k_test : k_test + k_val])
    return test, val


def _grouped(
    pool: list[int], labels: Sequence[int], groups: Sequence[str], fraction: float, rng: random.Random
) -> set[int]:
    group_classes: dict[str, set[int]] = defaultdict(set)
    for i in pool:
        group_classes[groups[i]].add(labels[i])
    if all(len(c) == 1 for c in group_classes.values()):  # class-specific groups: per class
        by_class: dict[int, list[int]] = defaultdict(list)
        for i in pool:
            by_class[labels[i]].append(i)
        chosen: set[int] = set()
        for c in sorted(by_class):
            chosen |= _draw_groups(by_class[c], groups, fraction * len(by_class[c]), rng)
        return chosen
    return _draw_groups(pool, groups, fraction * len(pool), rng)  # groups across classes (actors)


def carve(
    pool: list[int], labels: Sequence[int], groups: Sequence[str] | None, fraction: float, rng: random.Random
) -> set[int]:
    if groups is None:
        return _stratified(pool, labels, fraction, rng)
    return _grouped(pool, labels, groups, fraction, rng)


def assign_splits(
    labels: Sequence[int],
    given: Sequence[str | None],
    groups: Sequence[str] | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> list[str]:
    """One of "train", "val", "test" per clip, deterministic for a seed."""
    n = len(labels)
    rng = random.Random(seed)
    if all(s is None for s in given):
        out = ["train"] * n
        pool = list(range(n))
        if groups is None:
            test, val = _stratified_two(pool, labels, test_fraction, val_fraction, rng)
        else:
            test = carve(pool, labels, groups, test_fraction, rng)
            rest = [i for i in pool if i not in test]
            val = carve(rest, labels, groups, val_fraction * n / max(1, len(rest)), rng)
        for i in test:
            out[i] = "test"
        for i in val:
            out[i] = "val"
    else:
        if any(s is None for s in given):
            raise ValueError("either every clip or no clip comes with a split")
        out = [str(s) for s in given]
        for name, fraction in (("test", test_fraction), ("val", val_fraction)):
            if name not in out:
                pool = [i for i in range(n) if out[i] == "train"]
                for i in carve(pool, labels, groups, fraction, rng):
                    out[i] = name
    counts = {s: out.count(s) for s in ("train", "val", "test")}
    empty = [s for s, c in counts.items() if c == 0]
    if empty:
        raise UserError(
            f"split {', '.join(empty)} would be empty ({counts['train']} train / {counts['val']} val / "
            f"{counts['test']} test clips); use more clips or larger --val_fraction / --test_fraction"
        )
    return out
