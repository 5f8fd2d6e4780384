"""Comparison report over run folders: methods x seeds -> report.md, summary.json and PNG figures.

Runs are grouped by every setting of their config.json except the seed (and how a run was
executed: device, folder, workers, ...: RUN_ONLY_KEYS); runs of a group differ only in their
seed and are averaged (mean ± sample std over seeds). Groups of one method that differ in other
settings are labelled with those settings. Runs trained with --modality <m> are the "trained
alone" references of modality m (fusion and modulation do not apply to them). A run trained on
the first N samples of each split (--limit_samples) is evaluated (--evaluate) on the same N.

Per group, from each run's files:
  Fused acc, Macro-F1, mAP   test_metrics.json (best.pt, chosen on validation accuracy)
  Head <m>                   test_metrics.json acc_<m>: accuracy of the joint model's z_m
  Probe <m>                  probe.json: linear probe on the frozen encoder of <m>
  Alone <m>                  test accuracy of the --modality <m> reference runs
  <m> zeroed                 eval_test_zero_<m>/metrics.json: fused accuracy with <m>'s input zeroed
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ..errors import UserError
from ..fileio import atomic_write_text
from .runs import Run, confusion_matrix, find_runs, group_label, group_runs, read_predictions
from .tables import format_stat, markdown_table, mean_std

# Config keys that say how a run was executed, not what it is: they may differ within a group.
RUN_ONLY_KEYS = {
    "run_name",
    "output_dir",
    "resume",
    "explicit",
    "overwrite",
    "device",
    "num_workers",
    "data",
    "run_id",
    "log_every",
    "compile",
    "precision",
    "channels_last",
    "eval_test",
    "deterministic",
    "config",
    "sync_bn",
    "nonfinite",
    "print_config",
}
LABEL_SETTINGS = 4  # at most this many differing settings in a group's label (summary.json has all)


def _of_best(run: Run, output: dict) -> bool:
    """`output` (probe.json, an eval's metrics.json) scored the best.pt its test_metrics.json
    scored: its recorded epoch, when both record one, is the best epoch (both count from 0)."""
    epoch, best = output.get("epoch"), (run.test or {}).get("best_epoch")
    return epoch is None or best is None or epoch == best


def _probe_acc(run: Run, m: str) -> float | None:
    if not run.probe or not _of_best(run, run.probe):
        return None
    if f"acc_{m}" in run.probe:
        return run.probe[f"acc_{m}"]
    return run.probe.get("modalities", {}).get(m, {}).get("test_acc")


def run_values(run: Run, modality_names: list[str]) -> dict[str, float | None]:
    """The per-run numbers the table averages (None where a file or key is missing)."""
    test = run.test or {}
    own = run.modality_names
    values: dict[str, float | None] = {"acc": test.get("acc"), "macro_f1": test.get("macro_f1"), "mAP": test.get("mAP")}
    for m in modality_names:
        values[f"head_{m}"] = test.get(f"acc_{m}") if m in own else None
        values[f"probe_{m}"] = _probe_acc(run, m) if m in own else None
        zeroed = _evaluated(run, f"eval_test_zero_{m}") and not run.is_unimodal
        values[f"zero_{m}"] = run.evals[f"eval_test_zero_{m}"].get("acc") if zeroed else None
    # The clean accuracy of the inference that also made the zeroed evaluations (same samples, same code path).
    clean = _evaluated(run, "eval_test") and not run.is_unimodal
    values["clean_acc"] = run.evals["eval_test"].get("acc") if clean else None
    return values


def settings(run: Run) -> dict:
    """What defines a run besides its seed."""
    return {k: v for k, v in run.config.items() if k not in RUN_ONLY_KEYS and k != "seed"}


def _differing(configs: list[dict]) -> list[str]:
    keys = sorted({k for c in configs for k in c})
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def group_by_settings(runs: list[Run]) -> list[tuple[tuple, str, dict, list[Run]]]:
    """(method key, label, settings that set it apart from the method's other groups, runs), in
    method order: runs that differ only in their seed."""
    out = []
    for key, method_runs in group_runs(runs).items():
        by_settings: dict[str, list[Run]] = {}
        for run in method_runs:
            by_settings.setdefault(json.dumps(settings(run), sort_keys=True, default=str), []).append(run)
        differing = _differing([settings(g[0]) for g in by_settings.values()])
        for gruns in by_settings.values():
            apart = {k: settings(gruns[0]).get(k) for k in differing}
            label = group_label(key)
            if apart:
                shown = [f"{k} {v}" for k, v in list(apart.items())[:LABEL_SETTINGS]]
                more = len(apart) - LABEL_SETTINGS
                label += f" ({', '.join(shown)}{f', +{more} more' if more > 0 else ''})"
            out.append((key, label, apart, gruns))
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "run"


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def summarize(runs: list[Run]) -> list[dict]:
    """One entry per dataset: modality names, and per group its runs and column statistics."""
    by_dataset: dict[str, list[Run]] = {}
    for run in runs:
        by_dataset.setdefault(run.dataset, []).append(run)
    out = []
    for dataset, druns in sorted(by_dataset.items()):
        names: list[str] = []
        for r in sorted(druns, key=lambda r: r.is_unimodal):  # a joint run gives the model order
            names += [m for m in r.modality_names if m not in names]
        alone = {
            m: mean_std([r.test.get("acc") for r in druns if r.is_unimodal and r.modality == m and r.test])
            for m in names
        }
        entries = []
        for key, label, apart, gruns in group_by_settings(druns):
            finished = [r for r in gruns if r.test]
            per_run = [run_values(r, names) for r in finished]
            keys = per_run[0] if per_run else run_values(gruns[0], names)
            columns = {c: mean_std([v[c] for v in per_run]) for c in keys}
            for m in names:
                columns[f"alone_{m}"] = alone[m] if (not gruns[0].is_unimodal or gruns[0].modality == m) else None
            entries.append(
                {
                    "key": list(key),
                    "label": label,
                    "settings_apart": apart,
                    "unimodal": gruns[0].is_unimodal,
                    "runs": [str(r.path) for r in gruns],
                    "finished": len(finished),
                    "seeds": [r.seed for r in gruns],
                    "columns": columns,
                    "_runs": gruns,
                }
            )
        out.append({"dataset": dataset, "modalities": names, "groups": entries})
    return out


def _markdown(summary: list[dict], figures: dict[str, list[tuple[str, str]]], notes: list[str], total_runs: int) -> str:
    lines = [
        "# Comparison report",
        "",
        f"{total_runs} runs. Runs that differ only in their seed are grouped; each cell is the mean ± sample "
        "standard deviation over the group's seeds (the mean alone for one seed; '(n=k)' when only k runs "
        "have that number). All numbers are percentages on the **test split**, for each run's best.pt "
        "(the epoch with the best validation accuracy).",
        "",
        "- **Fused acc**: accuracy of the joint model's fused prediction.",
        "- **Head m**: accuracy of modality m's unimodal logits z_m inside the joint model (its share of "
        "the fusion head).",
        "- **Probe m**: linear probe on m's frozen encoder features (logistic regression fitted on train, "
        "L2 strength chosen on val); measures what the encoder learned, independently of the fusion head.",
        "- **Alone m**: the same encoder trained on modality m alone (`--modality m`), the reference a "
        "balanced joint model should approach.",
        "- **Macro-F1**, **mAP**: of the fused prediction (mAP = one-vs-rest average precision, averaged "
        "over classes).",
        "",
    ]
    for ds in summary:
        names, groups = ds["modalities"], ds["groups"]
        if len(summary) > 1:
            lines += [f"## {ds['dataset']}", ""]
        header = (
            ["Method", "Seeds", "Fused acc"]
            + [f"Head {m}" for m in names]
            + [f"Probe {m}" for m in names]
            + [f"Alone {m}" for m in names]
            + ["Macro-F1", "mAP"]
        )
        rows = []
        for g in groups:
            c, n = g["columns"], g["finished"]
            cols = ["acc"] + [f"head_{m}" for m in names] + [f"probe_{m}" for m in names]
            cells = [format_stat(c.get(k), n) for k in cols] + [format_stat(c.get(f"alone_{m}")) for m in names]
            cells += [format_stat(c.get("macro_f1"), n), format_stat(c.get("mAP"), n)]
            rows.append([g["label"], str(n)] + cells)
        lines += [f"### Test results ({ds['dataset']})", ""] + markdown_table(header, rows) + [""]

        zero_rows = [g for g in groups if not g["unimodal"] and any(g["columns"].get(f"zero_{m}") for m in names)]
        if zero_rows:
            lines += [
                f"### Missing modality at test time ({ds['dataset']})",
                "",
                "Fused test accuracy when one modality's encoder input is replaced by zeros (the normalised "
                "input, i.e. the dataset-mean input), from `inference.py --zero_modality m`, next to the same "
                "checkpoint's accuracy with every modality present (`eval_test/`). A model that leans on one modality "
                "collapses when that one is missing.",
                "",
            ]
            header = ["Method", "Seeds", "Both present"] + [f"{m} zeroed" for m in names]
            rows = [
                [g["label"], str(g["finished"]), format_stat(g["columns"].get("clean_acc"), g["finished"])]
                + [format_stat(g["columns"].get(f"zero_{m}"), g["finished"]) for m in names]
                for g in zero_rows
            ]
            lines += markdown_table(header, rows) + [""]

        lines += [f"### Runs ({ds['dataset']})", ""]
        header = ["Run", "Method", "Seed", "Epochs", "Best epoch", "Best val acc", "Test acc"] + [
            f"Probe {m}" for m in names
        ]
        rows = []
        for g in groups:
            for r in g["_runs"]:
                best = max(r.epochs, key=lambda e: e.get("val_acc", -1)) if r.epochs else {}
                test = r.test or {}
                pct = lambda v: f"{100 * v:.2f}" if isinstance(v, (int, float)) else "–"  # noqa: E731
                rows.append(
                    [
                        f"`{r.path.name}`",
                        g["label"],
                        str(r.seed),
                        str(len(r.epochs)),
                        str(test.get("best_epoch", best.get("epoch", "–"))),
                        pct(best.get("val_acc")),
                        pct(test.get("acc")),
                    ]
                    + [pct(_probe_acc(r, m)) for m in names]
                )
        lines += markdown_table(header, rows) + [""]

        figs = figures.get(ds["dataset"], [])
        if figs:
            lines += [f"### Figures ({ds['dataset']})", ""]
            for caption, file in figs:
                lines += [f"**{caption}**", "", f"![{caption}]({file})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _make_figures(ds: dict, out_dir: Path, prefix: str) -> tuple[list[tuple[str, str]], list[str]]:
    from . import plots
    from .tb import read_scalars

    figures, notes = [], []
    names, groups = ds["modalities"], ds["groups"]
    by_label = {g["label"]: g["_runs"] for g in groups}

    path = plots.plot_validation_curves(by_label, names, out_dir / f"{prefix}val_acc_per_modality.png")
    figures.append(("Validation accuracy per epoch: fused and per-modality heads; dashed: trained alone", path.name))

    scalars = {}
    for g in groups:
        if g["unimodal"]:
            continue
        per_seed = [read_scalars(r.path / "tb", prefix="modulation/") for r in g["_runs"]]
        per_seed = [s for s in per_seed if s]
        if per_seed:
            scalars[g["label"]] = per_seed
    if scalars:
        path = plots.plot_modulation(scalars, names, out_dir / f"{prefix}modulation_over_steps.png")
        figures.append(
            ("Discrepancy ratio, OGM coefficients k_m and OPM drop probabilities q_m over training", path.name)
        )
    else:
        notes.append(f"{ds['dataset']}: no TensorBoard modulation scalars found (tb/ folders), so no modulation plot.")

    bars = []
    for g in groups:
        if g["unimodal"]:
            continue
        row = {"label": g["label"]}
        for key, s in g["columns"].items():
            row[key] = (s["mean"], s["std"]) if s else None
        bars.append(row)
    if bars:
        path = plots.plot_modality_bars(bars, names, out_dir / f"{prefix}modality_accuracy.png")
        figures.append(("Per-modality test accuracy: head z_m vs linear probe vs trained alone", path.name))

    missing = []
    for g in groups:
        labels, preds = [], []
        for r in g["_runs"]:
            csv_path = r.path / "eval_test" / "predictions.csv"
            if csv_path.is_file():
                y, p = read_predictions(csv_path)
                labels += y
                preds += p
        if not labels:
            missing.append(g["label"])
            continue
        classes = sorted(set(labels) | set(preds), key=_natural_key)
        matrix = confusion_matrix(labels, preds, classes)
        n = sum(1 for r in g["_runs"] if (r.path / "eval_test" / "predictions.csv").is_file())
        title = (
            f"Confusion matrix, {g['label']}: test split, {n} seed(s) pooled, {len(labels)} predictions\n"
            "(cells: counts; colour: % of the true class)"
        )
        path = plots.plot_confusion(matrix, classes, out_dir / f"{prefix}confusion_{_slug(g['label'])}.png", title)
        figures.append((f"Confusion matrix: {g['label']}", path.name))
    if missing:
        notes.append(
            f"{ds['dataset']}: no eval_test/predictions.csv for {', '.join(missing)}: run "
            "`code/inference.py --checkpoint <run>` (or this report with --evaluate) for confusion matrices."
        )
    return figures, notes


def _evaluated(run: Run, folder: str) -> bool:
    """An inference output of this run, of the checkpoint and on the samples its test_metrics.json scored."""
    metrics = run.evals.get(folder)
    return (
        metrics is not None
        and metrics.get("limit_samples") == run.config.get("limit_samples")
        and _of_best(run, metrics)
    )


def _stale_outputs(run: Run) -> list[str]:
    """probe.json and eval_* outputs of another checkpoint than the best.pt test_metrics.json scored."""
    outputs = {"probe.json": run.probe, **{f"{name}/": m for name, m in run.evals.items()}}
    return [name for name, output in outputs.items() if output and not _of_best(run, output)]


def evaluate_missing(runs: list[Run], device: str = "auto", zero_modalities: bool = True) -> int:
    """Run inference (clean, and with each modality zeroed) for runs that lack those outputs, on
    the samples the run was trained and tested on (its --limit_samples)."""
    from ..infer import get_args_parser as infer_parser
    from ..infer import run_inference

    done = 0
    for run in runs:
        if not (run.path / "best.pt").is_file():
            continue
        todo: list[str | None] = []
        if not (_evaluated(run, "eval_test") and (run.path / "eval_test" / "predictions.csv").is_file()):
            todo.append(None)
        if zero_modalities and not run.is_unimodal:
            todo += [m for m in run.modality_names if not _evaluated(run, f"eval_test_zero_{m}")]
        limit = run.config.get("limit_samples")
        for m in todo:
            argv = ["--checkpoint", str(run.path), "--split", "test", "--device", device]
            argv += (["--zero_modality", m] if m else []) + (["--limit_samples", str(limit)] if limit else [])
            run_inference(infer_parser().parse_args(argv))
            done += 1
    return done


def write_report(
    paths: list[str | Path], out_dir: str | Path, evaluate: bool = False, device: str = "auto", plots: bool = True
) -> dict:
    """Find runs under `paths`, write report.md, summary.json and figures into `out_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out: not a folder: {out_dir}")
    runs = [r for r in find_runs(paths) if out_dir.resolve() not in r.path.parents]
    if not runs:
        raise UserError(f"no run folders (with config.json) under {', '.join(map(str, paths))}")
    if evaluate and evaluate_missing(runs, device):
        runs = find_runs([r.path for r in runs])
    summary = summarize(runs)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        return _write(summary, out_dir, len(runs), plots)
    except OSError as e:
        raise UserError(f"--out: cannot write into {out_dir}: {e.strerror or e}") from None


def _write(summary: list[dict], out_dir: Path, total_runs: int, plots: bool) -> dict:
    """report.md, summary.json and the figures, each file replaced whole."""
    notes, figures = [], {}
    for ds in summary:
        for g in ds["groups"]:
            if g["finished"] < len(g["runs"]):
                unfinished = [Path(p).name for p, r in zip(g["runs"], g["_runs"]) if not r.test]
                notes.append(
                    f"{g['label']}: {len(unfinished)} run(s) without test_metrics.json left out: "
                    f"{', '.join(unfinished)}"
                )
        for r in (r for g in ds["groups"] for r in g["_runs"]):
            stale = _stale_outputs(r)
            if stale:
                notes.append(
                    f"{r.path.name}: {', '.join(stale)} scored another epoch than its best.pt "
                    f"(epoch {r.test['best_epoch']}) and are left out; run code/probe.py or this report's "
                    "--evaluate again"
                )
        limited = sorted(
            {r.config["limit_samples"] for g in ds["groups"] for r in g["_runs"] if r.config.get("limit_samples")}
        )
        if limited:
            notes.append(
                f"{ds['dataset']}: some runs used only the first {' / '.join(map(str, limited))} samples "
                "of each split (--limit_samples); their numbers are on those samples only, not the whole "
                "test split."
            )
        if plots:
            prefix = f"{ds['dataset']}_" if len(summary) > 1 else ""
            figs, fig_notes = _make_figures(ds, out_dir, prefix)
            figures[ds["dataset"]] = figs
            notes += fig_notes

    atomic_write_text(out_dir / "report.md", _markdown(summary, figures, notes, total_runs))
    public = [{**ds, "groups": [{k: v for k, v in g.items() if k != "_runs"} for g in ds["groups"]]} for ds in summary]
    atomic_write_text(out_dir / "summary.json", json.dumps({"datasets": public, "notes": notes}, indent=2))
    return {"report": str(out_dir / "report.md"), "summary": public, "figures": figures, "notes": notes}


def get_args_parser():
    from ..config import ArgumentParser

    p = ArgumentParser(
        prog="report.py", description="Compare trained runs: a markdown table (mean ± std over seeds) and plots."
    )
    p.add_argument("runs", nargs="+", help="run folders, or folders searched (recursively) for run folders")
    p.add_argument("--out", default=None, help="report folder (default: <first folder>/report)")
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="first run inference where missing: eval_test/ (predictions for confusion matrices) "
        "and eval_test_zero_<m>/ (missing-modality accuracy)",
    )
    p.add_argument("--device", default="auto", help="device for --evaluate")
    p.add_argument("--no_plots", action="store_true", help="tables only")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = get_args_parser().parse_args(argv)
        out = Path(args.out) if args.out else Path(args.runs[0]) / "report"
        result = write_report(args.runs, out, evaluate=args.evaluate, device=args.device, plots=not args.no_plots)
    except UserError as e:
        print(f"report.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # each inference output and report file is written whole or not at all
        print("report.py: interrupted; no report written", file=sys.stderr)
        return 130
    print(Path(result["report"]).read_text().split("### Runs")[0].rstrip())
    print(
        f"\nwrote {result['report']}, summary.json and "
        f"{sum(len(f) for f in result['figures'].values())} figure(s) in {out}"
    )
    return 0
