"""The statistics and markdown tables both reports print (report.py over run folders,
benchmark_report.py over a protocol): mean ± sample standard deviation over seeds, in percent."""

from __future__ import annotations

import math
import statistics
from typing import Any


def mean_std(values: list[float | None]) -> dict[str, Any] | None:
    """Mean and sample standard deviation (ddof 1; None for a single value) of the values
    present (None and NaN left out), with their count and the values; None when none is."""
    present = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not present:
        return None
    return {
        "mean": statistics.fmean(present),
        "std": statistics.stdev(present) if len(present) > 1 else None,
        "n": len(present),
        "values": present,
    }


def format_stat(s: dict[str, Any] | None, expected_n: int | None = None, scale: float = 100.0, digits: int = 2) -> str:
    """'mean ± std' (percent by default); the mean alone for one value; '–' for none;
    '(n=k)' when only k of `expected_n` values are present."""
    if s is None:
        return "–"
    text = f"{scale * s['mean']:.{digits}f}"
    if s.get("std") is not None:
        text += f" ± {scale * s['std']:.{digits}f}"
    if expected_n is not None and s["n"] < expected_n:
        text += f" (n={s['n']})"
    return text


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines: the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]
