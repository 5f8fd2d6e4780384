"""Statistics and report of the benchmark protocol (experiments/protocol.py): report.md, results.csv, figures.

Per method, over the test seeds of its selected grid point:
  - test accuracy and macro-F1 of the fused prediction: mean ± sample std (ddof 1);
  - the paired difference to the baseline `none`: d_s = acc_method(s) - acc_none(s) for every
    test seed s both have (pairing by seed removes what the seeds share: data order,
    initialisation); its mean with the paired t-interval (primary), the exact sign-flip
    permutation p-value, Holm's adjustment of those p-values across the methods compared with
    `none`, and the percentile bootstrap interval as a secondary column (analysis/stats.py);
    next to every difference, the seed-to-seed std of `none` itself;
  - the weak modality's head accuracy (z_m of the joint model, test_metrics.json) and linear
    probe accuracy (probe.json). The weak modality is the reference (trained alone) with the
    lower mean best validation accuracy, so it is measured, not assumed.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any

from ..experiments.grid import Grid
from ..experiments.spec import RunSpec, best_val_acc, point_name, run_seconds, run_state
from ..fileio import atomic_write_text, read_json_object
from .runs import load_run, read_jsonl
from .stats import ALPHA, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE, compare_paired, holm_verdicts
from .tables import format_stat, markdown_table, mean_std

BASELINE = "none"
LATE_EPOCHS = 2  # a best epoch among the last two says the schedule may have stopped while still improving
PLATEAU_WITHIN = 0.01  # one point of validation accuracy (3 samples of AV-Digits' 300)


def _diff_text(d: dict | None, low: str = "low", high: str = "high") -> str:
    if d is None:
        return "–"
    return f"{100 * d['mean']:+.2f} [{100 * d[low]:+.2f}, {100 * d[high]:+.2f}]"


def _p_text(p: float | None) -> str:
    return "–" if p is None else f"{p:.3f}"


def verdict_text(d: dict | None) -> str:
    if d is None:
        return "–"
    if not d["survives"]:
        return "no difference shown"
    return "better" if d["mean"] > 0 else "worse"


def _point_text(point: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in point.items()) or "–"


def _test_values(specs: list[RunSpec], key: str, source: str = "test") -> dict[int, float]:
    """{seed: value} of key in each run's test_metrics.json (source 'test') or probe.json ('probe')."""
    out = {}
    for s in specs:
        data = read_json_object(s.run_dir / ("test_metrics.json" if source == "test" else "probe.json"))
        if data is not None and data.get(key) is not None:
            out[s.seed] = float(data[key])
    return out


def best_epoch(run_dir: Path) -> tuple[int, int] | None:
    """(the epoch best.pt comes from, the number of epochs) from metrics.jsonl: the first epoch
    with the highest validation accuracy, as train.py keeps best.pt (strictly better only)."""
    values = [e["val_acc"] for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("val_acc") is not None]
    if not values:
        return None
    return values.index(max(values)), len(values)


def plateau_epoch(run_dir: Path, within: float = PLATEAU_WITHIN) -> int | None:
    """The first epoch whose validation accuracy is within `within` of the run's best: where the
    curve stopped rising, less sensitive than the best epoch to one validation sample more or less."""
    values = [e["val_acc"] for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("val_acc") is not None]
    if not values:
        return None
    return next(i for i, v in enumerate(values) if v >= max(values) - within)


def best_epochs(specs: list[RunSpec]) -> dict[str, Any]:
    """Best and plateau epochs of the runs, per seed, and how many best epochs fall in the last
    LATE_EPOCHS epochs."""
    found = {s.seed: b for s in specs if (b := best_epoch(s.run_dir)) is not None}
    return {
        "per_seed": {seed: epoch for seed, (epoch, _) in found.items()},
        "plateau": {s.seed: p for s in specs if (p := plateau_epoch(s.run_dir)) is not None},
        "late": sum(epoch >= n - LATE_EPOCHS for epoch, n in found.values()),
        "epochs": max((n for _, n in found.values()), default=None),
    }


def mean_drop_rates(specs: list[RunSpec]) -> dict[str, float]:
    """Per modality m, OPM's drop probability q_m averaged over the epochs (metrics.jsonl's
    `train_q_<m>`, each an epoch mean) and the runs: the rate DROPOUT_UNIFORM's grid is read against."""
    sums: dict[str, list[float]] = {}
    for s in specs:
        for record in read_jsonl(s.run_dir / "metrics.jsonl"):
            for key, value in record.items():
                if key.startswith("train_q_") and value is not None:
                    sums.setdefault(key.removeprefix("train_q_"), []).append(float(value))
    return {m: statistics.fmean(v) for m, v in sums.items()}


def weak_modality(grid: Grid, test: list[RunSpec]) -> tuple[str | None, dict[str, float]]:
    """The reference modality with the lower mean best validation accuracy (None without references)."""
    alone = {}
    for m in grid.references:
        values = [v for s in test if s.method == f"{m} alone" and (v := best_val_acc(s.run_dir)) is not None]
        if values:
            alone[m] = statistics.fmean(values)
    return (min(alone, key=alone.get) if alone else None), alone


def summarize(grid: Grid, selection: dict, test: list[RunSpec]) -> dict[str, Any]:
    weak, alone_val = weak_modality(grid, test)
    accs = {m: _test_values([s for s in test if s.method == m], "acc") for m in grid.methods}
    base = accs.get(BASELINE, {})
    comparisons = {m: compare_paired(accs[m], base) for m in grid.methods if m != BASELINE}
    for method, verdict in holm_verdicts(comparisons).items():
        comparisons[method].update(verdict)
    # A second family, Holm-adjusted on its own: each contrast asks its own question (is the
    # on-the-fly rule better than its fixed ablation?), not one more "better than none?".
    contrasts = {pair: compare_paired(accs[pair[0]], accs[pair[1]]) for pair in grid.contrasts}
    for pair, verdict in holm_verdicts(contrasts).items():
        contrasts[pair].update(verdict)
    rows = []
    for method in [*grid.methods, *(f"{m} alone" for m in grid.references)]:
        runs = [s for s in test if s.method == method]
        acc = _test_values(runs, "acc")
        reference = method not in grid.methods
        own = method.split(" ")[0] if reference else weak
        row = {
            "method": method,
            "seeds": sorted(acc),
            "diverged": sorted(s.seed for s in runs if run_state(s) == "diverged"),
            "acc": mean_std(list(acc.values())),
            "macro_f1": mean_std(list(_test_values(runs, "macro_f1").values())),
            "diff_to_none": comparisons.get(method),
            "weak_head": None
            if reference or weak is None
            else mean_std(list(_test_values(runs, f"acc_{weak}").values())),
            "weak_probe": mean_std(list(_test_values(runs, f"acc_{own}", "probe").values())) if own else None,
            "best_epoch": best_epochs(runs),
            "selected": selection[method]["point"] if not reference else {},
            "val_acc": selection[method]["val_acc"] if not reference else None,
            "resolved": _resolved_options(runs, selection[method]["point"]) if not reference else {},
        }
        rows.append(row)
    opm = [s for s in test if s.method == "OPM"]
    return {
        "weak_modality": weak,
        "alone_val_acc": alone_val,
        "baseline_acc": mean_std(list(base.values())),
        "opm_drop_rates": mean_drop_rates(opm),
        "rows": rows,
        "contrasts": [{"method": a, "than": b, "diff": d} for (a, b), d in contrasts.items()],
    }


def _resolved_options(runs: list[RunSpec], point: dict) -> dict[str, Any]:
    """The selected options as the runs resolved them (config.json), with the defaults they kept."""
    shared = ("lr", "weight_decay", "alpha", "ogm_form", "q_base", "lam", "p_exe", "warmup_epochs", "epochs")
    keys = (*shared, *(k for k in point if k not in shared))  # and the method's own grid options
    for s in runs:
        config = read_json_object(s.run_dir / "config.json")
        if config:
            return {k: config.get(k) for k in keys if k in config}
    return {}


def write_results_csv(path: Path, summary: dict) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "method",
            "n_seeds",
            "acc_mean",
            "acc_std",
            "macro_f1_mean",
            "macro_f1_std",
            "diff_to_none_mean",
            "diff_t_low",
            "diff_t_high",
            "diff_t_p",
            "diff_perm_p",
            "diff_holm_p",
            "diff_survives",
            "diff_boot_low",
            "diff_boot_high",
            "none_acc_std",
            "weak_modality",
            "weak_head_mean",
            "weak_head_std",
            "weak_probe_mean",
            "weak_probe_std",
            "selected",
            "selected_val_acc",
            "n_diverged",
        ]
    )
    num = lambda s, k: "" if s is None or s.get(k) is None else f"{s[k]:.10g}"  # noqa: E731
    for r in summary["rows"]:
        d = r["diff_to_none"]
        w.writerow(
            [
                r["method"],
                len(r["seeds"]),
                num(r["acc"], "mean"),
                num(r["acc"], "std"),
                num(r["macro_f1"], "mean"),
                num(r["macro_f1"], "std"),
                num(d, "mean"),
                num(d, "low"),
                num(d, "high"),
                num(d, "t_p"),
                num(d, "perm_p"),
                num(d, "holm_p"),
                "" if d is None else str(d["survives"]).lower(),
                num(d, "boot_low"),
                num(d, "boot_high"),
                num(summary["baseline_acc"], "std"),
                summary["weak_modality"] or "",
                num(r["weak_head"], "mean"),
                num(r["weak_head"], "std"),
                num(r["weak_probe"], "mean"),
                num(r["weak_probe"], "std"),
                point_name(r["selected"]),
                "" if r["val_acc"] is None else f"{r['val_acc']:.10g}",
                len(r["diverged"]),
            ]
        )
    atomic_write_text(path, buf.getvalue())


def write_per_seed_csv(path: Path, test: list[RunSpec]) -> None:
    """One row per test-phase run: method, seed and every number of its test_metrics.json, so
    each interval of the report can be recomputed from the committed file."""
    rows = [
        (s.method, s.seed, {**data, "best_epoch": (best_epoch(s.run_dir) or (None,))[0]})
        for s in test
        if (data := read_json_object(s.run_dir / "test_metrics.json")) is not None
    ]
    keys = sorted({k for _, _, data in rows for k, v in data.items() if isinstance(v, (int, float))})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "seed", *keys])
    for method, seed, data in sorted(rows, key=lambda r: (r[0], r[1])):
        # repr: the shortest text that reads back as the same float, so a recomputation is exact
        w.writerow([method, seed, *("" if data.get(k) is None else repr(float(data[k])) for k in keys)])
    atomic_write_text(path, buf.getvalue())


def _epochs_text(b: dict) -> str:
    epochs, plateau = sorted(b["per_seed"].values()), sorted(b["plateau"].values())
    if not epochs:
        return "–"
    return f"{statistics.median(epochs):g} ({epochs[0]}–{epochs[-1]}) / {statistics.median(plateau):g}"


def _epochs_of(summary: dict) -> str:
    counts = sorted({r["best_epoch"]["epochs"] for r in summary["rows"] if r["best_epoch"]["epochs"]})
    return " / ".join(map(str, counts)) + " epochs" if counts else "? epochs"


def _markdown(grid: Grid, summary: dict, selection: dict, figures: list[tuple[str, str]], timing: dict) -> str:
    weak = summary["weak_modality"]
    alone = ", ".join(f"{m} {100 * v:.2f}%" for m, v in summary["alone_val_acc"].items())
    lines = [
        "# Benchmark report",
        "",
        f"Grid file `{grid.path.name}`; common options: {_point_text(grid.common) or 'none'}. Every "
        "method was tuned over "
        f"{len(next(iter(grid.methods.values())).points())} grid points x tuning seeds {grid.tuning_seeds} on the "
        "**validation** split (score: the mean over tuning seeds of each run's best validation accuracy; "
        "ties: the point "
        f"written first), then its selected point was trained on the fresh test seeds {grid.test_seeds} and evaluated "
        "on the **test** split (best.pt, the epoch with the best validation accuracy).",
        "",
        f"Weak modality: **{weak}** (the trained-alone reference with the lower mean best validation "
        f"accuracy: {alone})."
        if weak
        else "No trained-alone references, so no weak modality.",
        "",
        "- **Accuracy**, **macro-F1**: test, fused prediction, mean ± sample std over the test seeds (%).",
        f"- **Δ vs none [{int(100 * CONFIDENCE)}% t]**: mean over test seeds of (method − none), paired by seed, with "
        "the paired Student-t interval of that mean; percentage points. **none std**: the seed-to-seed std of `none` "
        "itself, the scale a difference has to be read against.",
        "- **p (sign-flip)**: exact two-sided permutation p-value over all 2^n sign patterns of the paired differences "
        f"(its smallest possible value is 2/2^n). **Holm p**: adjusted across the methods compared with none "
        f"({len(grid.methods) - 1}). **Verdict**: better / worse when the Holm-adjusted p is below {ALPHA}, otherwise "
        '"no difference shown".',
        f"- **Bootstrap [{int(100 * CONFIDENCE)}%]** (secondary): percentile bootstrap interval of the mean difference "
        f"(scipy.stats.bootstrap, {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}); with few seeds it cannot "
        "reach past the observed differences and is too narrow.",
    ]
    if weak:
        lines += [
            f"- **Head {weak}**: test accuracy of the joint model's unimodal logits z_{weak} (its share of "
            "the fusion head).",
            f"- **Probe {weak}**: linear probe on the frozen {weak} encoder (fitted on train, L2 chosen on "
            "val, test accuracy); for a reference row, the probe of its own encoder.",
        ]
    lines.append("")
    header = [
        "Method",
        "Seeds",
        "Accuracy",
        "Macro-F1",
        f"Δ vs none [{int(100 * CONFIDENCE)}% t]",
        "none std",
        "p (sign-flip)",
        "Holm p",
        "Verdict",
        f"Bootstrap [{int(100 * CONFIDENCE)}%]",
        *([f"Head {weak}", f"Probe {weak}"] if weak else []),
        "Best epoch / plateau",
        "Selected (val acc)",
    ]
    base = summary["baseline_acc"]
    base_std = "–" if base is None or base["std"] is None else f"{100 * base['std']:.2f}"
    rows = []
    for r in summary["rows"]:
        selected = (
            f"{_point_text(r['selected'])} ({100 * r['val_acc']:.2f})" if r["val_acc"] is not None else "defaults"
        )
        d = r["diff_to_none"]
        stats = [format_stat(r[k]) for k in ("acc", "macro_f1")] + [_diff_text(d), base_std if d else "–"]
        stats += [_p_text(d and d["perm_p"]), _p_text(d and d["holm_p"]), verdict_text(d)]
        stats += [_diff_text(d, "boot_low", "boot_high")]
        stats += [format_stat(r[k]) for k in ("weak_head", "weak_probe")] if weak else []
        rows.append([r["method"], str(len(r["seeds"])), *stats, _epochs_text(r["best_epoch"]), selected])
    lines += markdown_table(header, rows) + [""]
    if summary["opm_drop_rates"]:
        rates = ", ".join(f"q_{m} {q:.3f}" for m, q in summary["opm_drop_rates"].items())
        if "DROPOUT_UNIFORM" in grid.methods:
            rates += "; DROPOUT_UNIFORM's selected drop_prob is to be read against them"
        lines += [
            f"OPM's measured drop probabilities (mean over epochs and test seeds of its selected point): {rates}.",
            "",
        ]
    if summary["contrasts"]:
        lines += [
            "**Contrasts** (the grid file's `contrasts`): a method against another one rather than against none, "
            "with the same statistics, paired by seed; Holm's adjustment runs across the contrasts, a family "
            "of its own.",
            "",
        ]
        rows = []
        for c in summary["contrasts"]:
            d = c["diff"]
            stats = [_diff_text(d), _p_text(d and d["perm_p"]), _p_text(d and d["holm_p"]), verdict_text(d)]
            rows.append([f"{c['method']} − {c['than']}", *stats, _diff_text(d, "boot_low", "boot_high")])
        header = ["Contrast", f"Δ [{int(100 * CONFIDENCE)}% t]", "p (sign-flip)", "Holm p", "Verdict", "Bootstrap"]
        lines += markdown_table(header, rows) + [""]
    late = sum(r["best_epoch"]["late"] for r in summary["rows"])
    runs = sum(len(r["best_epoch"]["per_seed"]) for r in summary["rows"])
    lines += [
        f"**Best epoch / plateau**: median (min–max) over the test seeds of the epoch best.pt comes from "
        f"(0-based, of {_epochs_of(summary)}), then the median of the first epoch within "
        f"{100 * PLATEAU_WITHIN:g} point of each run's best validation accuracy (where its curve stopped "
        "rising). "
        f"{late} of {runs} test runs have their best epoch in the last {LATE_EPOCHS} epochs.",
        "",
    ]
    diverged = [f"{r['method']} seed {seed}" for r in summary["rows"] for seed in r["diverged"]]
    if diverged:
        lines += [
            f"Diverged (train.py stopped on non-finite values; not in the rows above): {', '.join(diverged)}.",
            "",
        ]

    lines += [
        "## Settings of the selected points",
        "",
        "As the test runs resolved them (config.json): the grid's values, and train.py's defaults for the rest.",
        "",
    ]
    keys = sorted({k for r in summary["rows"] for k in r["resolved"]})
    lines += markdown_table(
        ["Method", *keys],
        [[r["method"], *(str(r["resolved"].get(k, "–")) for k in keys)] for r in summary["rows"] if r["resolved"]],
    ) + [""]

    lines += [
        "## Tuning (validation accuracy, %)",
        "",
        "Every grid point: the mean over tuning seeds of the best validation accuracy, then each seed's; "
        "**bold**: selected.",
        "",
    ]
    for method, chosen in selection.items():
        rows = []
        for p in chosen["points"]:
            mark = "**" if p["index"] == chosen["index"] else ""
            per_seed = " / ".join(f"{100 * v:.2f}" for v in p["per_seed"].values())
            score = "diverged" if p["val_acc"] is None else f"{mark}{100 * p['val_acc']:.2f}{mark}"
            rows.append([f"{mark}{p['index']}{mark}", f"{mark}{_point_text(p['point'])}{mark}", score, per_seed])
        lines += [f"### {method}", ""] + markdown_table(["Point", "Options", "Val acc (mean)", "Per seed"], rows) + [""]

    if figures:
        lines += ["## Figures", ""]
        for caption, file in figures:
            lines += [f"**{caption}**", "", f"![{caption}]({file})", ""]
    lines += [
        "## Time",
        "",
        f"This invocation of the protocol: {timing['wall_s'] / 60:.1f} min of wall time (runs finished by an earlier "
        f"invocation were skipped). Sum of the training runs' durations: {timing['train_s'] / 60:.1f} min over "
        f"{timing['runs']} runs, {timing['slots']} at a time, i.e. about "
        f"{timing['train_s'] / 60 / timing['slots']:.1f} min of training for the whole protocol from scratch.",
        "",
    ]
    return "\n".join(lines)


def _figures(
    grid: Grid, selection: dict, tune: list[RunSpec], test: list[RunSpec], out: Path, weak: str | None
) -> list:
    from . import plots

    figures = []
    panels = {}
    for name, method in grid.methods.items():
        if method.sensitivity is None or name not in selection:
            continue
        x, lines = method.sensitivity["x"], method.sensitivity.get("lines")
        series: dict[str, list[tuple[float, float, float]]] = {}
        for p in [p for p in selection[name]["points"] if p["val_acc"] is not None]:
            values = list(p["per_seed"].values())
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            series.setdefault(f"{lines} {p['point'][lines]}" if lines else name, []).append(
                (float(p["point"][x]), p["val_acc"], spread)
            )
        panels[name] = (x, series)
    if panels:
        path = plots.plot_sensitivity(panels, out / "sensitivity.png")
        figures.append(
            ("Sensitivity: validation accuracy of every grid point (mean over tuning seeds, bar = ±1 std)", path.name)
        )

    groups = {}
    for method in [*grid.methods, *(f"{m} alone" for m in grid.references)]:
        runs = [r for s in test if s.method == method and (r := load_run(s.run_dir)) is not None]
        if runs:
            groups[method] = runs
    modalities = [m for m in grid.references]
    if groups and modalities:
        path = plots.plot_validation_curves(
            groups,
            modalities,
            out / "modality_curves.png",
            title="Validation accuracy per epoch (test seeds, mean ± std): fused and each modality's head z_m; "
            "dashed: trained alone",
        )
        figures.append(
            (
                "Per-modality validation accuracy over epochs for every method (selected settings); "
                f"dashed: the modality trained alone{'; weak modality: ' + weak if weak else ''}",
                path.name,
            )
        )
    return figures


def write_benchmark_report(
    grid: Grid, selection: dict, tune: list[RunSpec], test: list[RunSpec], out: Path, wall_seconds: float, slots: int
) -> dict:
    """report.md, results.csv, per_seed.csv, summary.json and figures in `out`."""
    summary = summarize(grid, selection, test)
    durations = [d for s in tune + test if (d := run_seconds(s)) is not None]
    timing = {"wall_s": wall_seconds, "train_s": float(sum(durations)), "runs": len(durations), "slots": slots}
    figures = _figures(grid, selection, tune, test, out, summary["weak_modality"])
    atomic_write_text(out / "report.md", _markdown(grid, summary, selection, figures, timing))
    write_results_csv(out / "results.csv", summary)
    write_per_seed_csv(out / "per_seed.csv", test)
    atomic_write_text(out / "summary.json", json.dumps({**summary, "timing": timing}, indent=2))
    return {**summary, "timing": timing, "figures": figures}
