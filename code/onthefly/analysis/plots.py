"""Figures of the comparison report (matplotlib, Agg backend: files only, no display needed).

Every figure states what is plotted, on which split, and how seeds were combined.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .runs import Run

ALONE_STYLE = {"color": "black", "linestyle": "--"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int):
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def _mean_std_over_runs(series: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std (0 for one series) of (x, y) series. Series logged at different x (runs that
    logged at different steps) are linearly interpolated at every x of any series inside the
    range all of them cover; series with the same x are taken as they are."""
    common = series[0][0]
    for x, _ in series[1:]:
        common = np.intersect1d(common, x)
    if any(len(x) != len(common) for x, _ in series):
        low, high = max(x.min() for x, _ in series), min(x.max() for x, _ in series)
        union = np.unique(np.concatenate([x for x, _ in series]))
        common = union[(union >= low) & (union <= high)]
        if len(common) == 0:  # no range shared: show the first series alone
            x, y = series[0]
            return x, y, np.zeros_like(y)
        series = [(common, np.interp(common, x, y)) for x, y in series]
    ys = np.stack([y[np.searchsorted(x, common)] for x, y in series])
    std = ys.std(axis=0, ddof=1) if len(ys) > 1 else np.zeros(len(common))
    return common, ys.mean(axis=0), std


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) < window:
        return y
    kernel = np.ones(window) / window
    head = np.array([y[: i + 1].mean() for i in range(window - 1)])
    return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def _epoch_series(runs: list[Run], key: str) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for run in runs:
        pts = [(r["epoch"] + 1, r[key]) for r in run.epochs if key in r and r[key] is not None]
        if pts:
            x, y = zip(*pts)
            out.append((np.array(x), np.array(y, dtype=np.float64)))
    return out


def plot_validation_curves(
    groups: dict[str, list[Run]], modality_names: Sequence[str], out_path: str | Path, title: str = ""
) -> Path:
    """Panels: fused validation accuracy, then each modality's head accuracy (z_m), per epoch.

    One line per multimodal method (mean over seeds, band = +-1 std); unimodal reference runs
    are drawn dashed black in their modality's panel.
    """
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    panels = [("val_acc", "fused prediction")] + [(f"val_acc_{m}", f"{m} (head z_{m})") for m in modality_names]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    axes = axes[0]
    multimodal = {k: v for k, v in groups.items() if not v[0].is_unimodal}
    colors = dict(zip(multimodal, _colors(len(multimodal))))
    last_epoch = 1
    for ax, (key, name) in zip(axes, panels):
        for label, runs in groups.items():
            if runs[0].is_unimodal:
                if key == "val_acc" or key != f"val_acc_{runs[0].modality}":
                    continue
                style = dict(ALONE_STYLE)
            else:
                style = {"color": colors[label]}
            series = _epoch_series(runs, key)
            if not series:
                continue
            x, mean, std = _mean_std_over_runs(series)
            last_epoch = max(last_epoch, int(x.max()))
            ax.plot(x, 100 * mean, marker="o", markersize=3, label=f"{label} (n={len(series)})", **style)
            band = np.clip(100 * (mean - std), 0, 100), np.clip(100 * (mean + std), 0, 100)  # accuracy: [0, 100]
            ax.fill_between(x, *band, color=style["color"], alpha=0.15, linewidth=0)
        ax.set_title(f"Validation accuracy: {name}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (1 = after the first epoch)")
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
    for ax in axes:
        ax.set_xlim(0.5, last_epoch + 0.5)
        if last_epoch <= 20:
            ax.set_xticks(range(1, last_epoch + 1))
    fig.suptitle(title or "Per-modality validation accuracy during training (mean over seeds, band = ±1 std)")
    fig.tight_layout()
    return _save(fig, out_path)


MODULATION_STATS = ("ratio", "coeff", "drop_prob")
LINE_STYLES = ("-", "--", ":", "-.")  # one per modality, in modality order (cycled beyond four)


def _drawn_modalities(stat: str, num_modalities: int) -> range:
    """Every modality, except the two-modality ratio: rho_b = 1 / rho_a, so rho_a alone says it all."""
    return range(1) if stat == "ratio" and num_modalities == 2 else range(num_modalities)


def modulation_series(
    scalars: dict[str, list[dict[str, tuple[np.ndarray, np.ndarray]]]], modality_names: Sequence[str]
) -> dict[str, list[dict]]:
    """What plot_modulation draws: per statistic, one entry per (method, modality) that logged it,
    {label, m, modality, steps, mean (over seeds), n (seeds)}.

    `scalars`: method label -> one {tag: (steps, values)} per seed, TensorBoard tags
    modulation/<ratio|coeff|drop_prob>_<modality name> (or _<modality index>, as older runs
    logged them). With two modalities the ratio is drawn for the first only (rho_b = 1 / rho_a).
    """
    out: dict[str, list[dict]] = {}
    for stat in MODULATION_STATS:
        out[stat] = []
        for label, per_seed in scalars.items():
            for m in _drawn_modalities(stat, max(2, len(modality_names))):
                mname = modality_names[m] if m < len(modality_names) else f"m{m}"
                tags = (f"modulation/{stat}_{mname}", f"modulation/{stat}_{m}")
                series = [next(s[t] for t in tags if t in s) for s in per_seed if any(t in s for t in tags)]
                series = [xy for xy in series if len(xy[0])]
                if series:
                    x, mean, _ = _mean_std_over_runs(series)
                    out[stat].append(
                        {"label": label, "m": m, "modality": mname, "steps": x, "mean": mean, "n": len(series)}
                    )
    return out


def plot_modulation(
    scalars: dict[str, list[dict[str, tuple[np.ndarray, np.ndarray]]]],
    modality_names: Sequence[str],
    out_path: str | Path,
    title: str = "",
) -> Path:
    """Three panels over training steps: ratio rho (rho_a = s_a / s_b at M = 2; every rho_m beyond),
    OGM's k_m, OPM's q_m (see `modulation_series` for the input)."""
    plt = _plt()
    names = list(modality_names) + ["m0", "m1"][len(modality_names) :]
    a, b = names[:2]
    ratio = (
        (f"discrepancy ratio ρ = s_{a} / s_{b}", f"ρ (log scale; >1: {a} dominant)")
        if len(names) == 2
        else (
            "discrepancy ratio ρ_m = s_m / (reference of the other modalities' scores, --ratio_ref)",
            "ρ_m (log scale; >1: m dominant)",
        )
    )
    styles = ", ".join(f"{LINE_STYLES[m % len(LINE_STYLES)]!r}: {n}" for m, n in enumerate(names))
    titles = {
        "ratio": ratio,
        "coeff": ("OGM gradient coefficient k_m (1 = unchanged)", "k_m"),
        "drop_prob": ("OPM feature-drop probability q_m", "q_m"),
    }
    data = modulation_series(scalars, modality_names)
    fig, axes = plt.subplots(len(MODULATION_STATS), 1, figsize=(10, 10), sharex=True)
    colors = dict(zip(scalars, _colors(len(scalars))))
    for ax, stat in zip(axes, MODULATION_STATS):
        name, ylabel = titles[stat]
        single = stat == "ratio" and len(names) == 2
        for e in data[stat]:
            text = e["label"] if single else f"{e['label']}: {e['modality']}"
            window = max(1, len(e["steps"]) // 40)
            ax.plot(
                e["steps"],
                _smooth(e["mean"], window),
                color=colors[e["label"]],
                linestyle=LINE_STYLES[e["m"] % len(LINE_STYLES)],
                linewidth=1.4,
                label=f"{text} (n={e['n']})",
            )
        drawn = bool(data[stat])
        if stat == "ratio":
            ax.axhline(1.0, color="grey", linewidth=0.8)
            if drawn:
                from matplotlib.ticker import LogLocator, ScalarFormatter

                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(ScalarFormatter())
                ax.yaxis.set_minor_formatter(ScalarFormatter())
        if not drawn:
            ax.text(
                0.5, 0.5, "no run logged this quantity", ha="center", va="center", transform=ax.transAxes, color="grey"
            )
        ax.set_title(name + ("" if single else f" (line styles {styles})"))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8, loc="best", ncol=2)
    from matplotlib.ticker import MaxNLocator

    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("optimizer step (training batches since the start)")
    fig.suptitle(
        title or "Modulation statistics per logged training step (mean over seeds; light moving average when long)"
    )
    fig.tight_layout()
    return _save(fig, out_path)


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], out_path: str | Path, title: str) -> Path:
    """Row-normalised confusion matrix (% of each true class), counts written in the cells."""
    plt = _plt()
    k = len(class_names)
    totals = matrix.sum(axis=1, keepdims=True)
    share = 100 * matrix / np.maximum(totals, 1)
    size = max(4.5, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(im, ax=ax, label="% of the true class")
    if k <= 30:
        ax.set_xticks(range(k), class_names, rotation=90 if max(map(len, class_names)) > 3 else 0)
        ax.set_yticks(range(k), class_names)
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    ax.text(
                        j,
                        i,
                        str(matrix[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if share[i, j] > 50 else "black",
                    )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_modality_bars(rows: list[dict], modality_names: Sequence[str], out_path: str | Path, title: str = "") -> Path:
    """Per method: each modality's head accuracy (z_m) and linear-probe accuracy, with the
    trained-alone accuracy as a dashed line. rows: {label, head_<m>, probe_<m>, alone_<m>} as
    (mean, std) pairs or None."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(modality_names), figsize=(6 * len(modality_names), 4.6), squeeze=False)
    labels = [r["label"] for r in rows]
    x = np.arange(len(rows))
    for ax, m in zip(axes[0], modality_names):
        for offset, (key, name, color) in zip(
            (-0.2, 0.2),
            (
                (f"head_{m}", "head z_m in the joint model", "tab:blue"),
                (f"probe_{m}", "linear probe on the encoder", "tab:orange"),
            ),
        ):
            vals = [r.get(key) for r in rows]
            means = [100 * v[0] if v else np.nan for v in vals]
            errs = [100 * v[1] if v and v[1] is not None else np.nan for v in vals]  # no bar for one seed
            ax.bar(x + offset, means, width=0.4, yerr=errs, capsize=3, color=color, label=name)
        alone = next((r.get(f"alone_{m}") for r in rows if r.get(f"alone_{m}")), None)
        if alone:
            ax.axhline(100 * alone[0], label="trained alone (same modality, same encoder)", **ALONE_STYLE)
        ax.set_xticks(x, labels, rotation=20, ha="right")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{m}: how well the joint model learned this modality")
        ax.grid(axis="y", alpha=0.3)
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle(title or "Per-modality test accuracy (mean over seeds, error bar = ±1 std)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _save(fig, out_path)


def plot_sensitivity(
    panels: dict[str, tuple[str, dict[str, list[tuple[float, float, float]]]]], out_path: str | Path, title: str = ""
) -> Path:
    """One panel per method: validation accuracy against one grid option, a line per value of another.

    panels: {method: (x option, {line label: [(x, mean accuracy, std), ...]})}.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.8 * len(panels), 8.0), 4.2), squeeze=False)
    for ax, (method, (x_name, series)) in zip(axes[0], panels.items()):
        for color, (label, pts) in zip(_colors(len(series)), series.items()):
            x, y, err = (np.array(v, dtype=np.float64) for v in zip(*sorted(pts)))
            ax.errorbar(x, 100 * y, yerr=100 * err, marker="o", markersize=4, capsize=3, color=color, label=label)
        ax.set_title(method)
        ax.set_xlabel(x_name)
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        title or "Sensitivity: best validation accuracy per grid point\n(mean over tuning seeds, bar = ±1 std)"
    )
    fig.tight_layout()
    return _save(fig, out_path)


def _save(fig, out_path: str | Path) -> Path:
    plt = _plt()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
