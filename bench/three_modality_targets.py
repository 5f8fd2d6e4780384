"""The three-modality AV-Digits targets (README, "Three modalities"), on the validation split.

For each seed: the joint model without modulation, each modality trained alone, and linear
probes of the joint model's encoders; at the first seed also every modulation method. Prints
a markdown table per seed and the mean, and writes it to <out>/targets.md (numbers in
<out>/targets.json). Finished runs (test_metrics.json present) and probes are reused.

    python bench/three_modality_targets.py                      # 3 seeds, ~15 trainings on a CPU
    python bench/three_modality_targets.py --seeds 0 --set epochs=2 --out /tmp/t   # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODALITIES = ("audio", "visual", "scan")  # the default; --modalities picks others
METHODS = ("none", "OGM", "OGM_GE", "OPM", "OGM_GE_OPM")


def train(out: Path, name: str, args: list[str], modalities: tuple[str, ...]) -> Path:
    run_dir = out / name
    if not (run_dir / "test_metrics.json").exists():
        cmd = [
            sys.executable,
            str(REPO / "code" / "train.py"),
            "--avdigits_modalities",
            ",".join(modalities),
            "--output_dir",
            str(out),
            "--run_name",
            name,
            "--overwrite",
            *args,
        ]
        print("+", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return run_dir


def probe(run_dir: Path) -> dict:
    if not (run_dir / "probe.json").exists():
        subprocess.run(
            [sys.executable, str(REPO / "code" / "probe.py"), "--checkpoint", str(run_dir)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return json.loads((run_dir / "probe.json").read_text())


def best_epoch(run_dir: Path) -> dict:
    """The epoch record best.pt was chosen at (highest validation accuracy, the first of equals)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return max(records, key=lambda r: (r["val_acc"], -r["epoch"]))


def measure(out: Path, seed: int, extra: list[str], with_probe: bool, modalities: tuple[str, ...]) -> dict:
    joint = train(out, f"joint_none_seed{seed}", ["--seed", str(seed), *extra], modalities)
    row = {"seed": seed, "joint": best_epoch(joint)["val_acc"]}
    best = best_epoch(joint)
    probes = probe(joint)["modalities"] if with_probe else {}
    for m in modalities:
        alone = train(out, f"{m}_alone_seed{seed}", ["--seed", str(seed), "--modality", m, *extra], modalities)
        row[f"alone_{m}"] = best_epoch(alone)["val_acc"]
        row[f"head_{m}"] = best[f"val_acc_{m}"]
        if with_probe:
            row[f"probe_{m}"] = probes[m]["val_acc"]
    return row


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def table(rows: list[dict], with_probe: bool, modalities: tuple[str, ...]) -> str:
    cols = ["joint"] + [f"alone_{m}" for m in modalities] + [f"head_{m}" for m in modalities]
    cols += [f"probe_{m}" for m in modalities] if with_probe else []
    mean = {c: sum(r[c] for r in rows) / len(rows) for c in cols}
    lines = ["| seed | " + " | ".join(c.replace("_", " ") for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in [*rows, {"seed": "mean", **mean}]:
        lines.append(f"| {r['seed']} | " + " | ".join(pct(r[c]) for c in cols) + " |")
    gaps = [
        f"{m}: alone - head {100 * (mean[f'alone_{m}'] - mean[f'head_{m}']):+.1f}"
        + (f", alone - probe {100 * (mean[f'alone_{m}'] - mean[f'probe_{m}']):+.1f}" if with_probe else "")
        for m in modalities
    ]
    return "\n".join(lines) + "\n\nMean gaps (points): " + "; ".join(gaps) + "\n"


def methods_table(
    out: Path, seed: int, extra: list[str], methods: list[str], modalities: tuple[str, ...]
) -> tuple[str, list[dict]]:
    rows = []
    for method in methods:
        name = f"joint_{method}_seed{seed}"
        best = best_epoch(train(out, name, ["--seed", str(seed), "--modulation", method, *extra], modalities))
        rows.append({"method": method, "val_acc": best["val_acc"], **{m: best[f"val_acc_{m}"] for m in modalities}})
    lines = [
        "| method | fused | " + " | ".join(f"head {m}" for m in modalities) + " |",
        "|---" * (len(modalities) + 2) + "|",
    ]
    lines += [
        f"| {r['method']} | {pct(r['val_acc'])} | " + " | ".join(pct(r[m]) for m in modalities) + " |" for r in rows
    ]
    return "\n".join(lines) + "\n", rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "checkpoints" / "three_modality"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="*", default=list(METHODS), help="run at the first seed ('' for none)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra train.py options for every run")
    ap.add_argument("--no_probe", action="store_true")
    ap.add_argument("--modalities", default=",".join(MODALITIES), help="AV-Digits streams, comma-separated")
    opts = ap.parse_args()
    out = Path(opts.out)
    extra = [f"--{kv}" for kv in opts.set]
    modalities = tuple(opts.modalities.split(","))
    rows = [measure(out, s, extra, not opts.no_probe, modalities) for s in opts.seeds]
    text = "Validation accuracy (%), best epoch of each run:\n\n" + table(rows, not opts.no_probe, modalities)
    method_rows = []
    if opts.methods:
        methods_text, method_rows = methods_table(out, opts.seeds[0], extra, opts.methods, modalities)
        text += f"\nEvery method, seed {opts.seeds[0]} (validation %, best epoch):\n\n" + methods_text
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "targets.md").write_text(text)
    record = {"seeds": rows, "methods": method_rows, "set": opts.set, "modalities": list(modalities)}
    # The code and machine of the runs (each run folder also keeps its own environment.json).
    record["environment"] = json.loads((out / f"joint_none_seed{opts.seeds[0]}" / "environment.json").read_text())
    (out / "targets.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
