"""`sweep.py --verify`: train the test phase of a finished protocol again and compare every number.

The selected settings are read from the protocol's selection.json (nothing is selected again)
and every test-phase run (each method's selected point and each reference, on every test seed)
is trained again into a scratch folder. Then, for every run, every number of its
test_metrics.json is compared with the original's:

  - all equal: "reproduced exactly" (exit 0);
  - some differ: per method and number, the shift of the mean over seeds next to the original's
    seed-to-seed std, then the report's verdicts (better / worse / no difference shown, after
    Holm; each method against none, and each contrast) recomputed from the new runs. Exit 0 when
    every verdict holds and the environment differs (another machine, other libraries: the
    shifts are expected); exit 1 when a verdict changed, or when numbers differ although the
    environment is the same.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ..analysis.benchmark_report import summarize, verdict_text
from ..errors import UserError
from ..fileio import read_json_object
from ..provenance import ENVIRONMENT_FILE, same_machine
from .grid import Grid
from .spec import RunSpec, run_state, test_runs

VERIFY_DIR = "verify"  # default scratch folder, inside the protocol's output


def load_selection(out: Path) -> dict[str, dict]:
    """The selection a finished protocol wrote (selection.json's methods)."""
    saved = read_json_object(out / "selection.json")
    if saved is None or not isinstance(saved.get("methods"), dict):
        raise UserError(f"--verify: {out} holds no finished protocol (no readable selection.json); run it first")
    return saved["methods"]


def _numbers(run_dir: Path) -> dict[str, float] | None:
    data = read_json_object(run_dir / "test_metrics.json")
    if data is None:
        return None
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def compare_runs(original: list[RunSpec], again: list[RunSpec]) -> list[dict[str, Any]]:
    """Per run (matched by method and seed) and number: the original value and the new one."""
    rows = []
    new_by_key = {(s.method, s.seed): s for s in again}
    for s in original:
        before, after = _numbers(s.run_dir), _numbers(new_by_key[(s.method, s.seed)].run_dir)
        if before is None:
            raise UserError(f"--verify: {s.run_dir / 'test_metrics.json'} is missing; finish the protocol first")
        if after is None:
            raise UserError(f"--verify: the rerun {new_by_key[(s.method, s.seed)].run_dir} left no test_metrics.json")
        for key in sorted(set(before) | set(after)):
            rows.append(
                {"method": s.method, "seed": s.seed, "key": key, "before": before.get(key), "after": after.get(key)}
            )
    return rows


def shifts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and number: mean over seeds of (after - before), and the seed-to-seed std before."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["key"]), []).append(r)
    out = []
    for (method, key), group in groups.items():
        pairs = [(r["before"], r["after"]) for r in group if r["before"] is not None and r["after"] is not None]
        before = [b for b, _ in pairs]
        out.append(
            {
                "method": method,
                "key": key,
                "shift": statistics.fmean(a - b for b, a in pairs) if pairs else None,
                "max_abs_shift": max((abs(a - b) for b, a in pairs), default=None),
                "std": statistics.stdev(before) if len(before) > 1 else None,
                "equal": all(r["before"] == r["after"] for r in group),
            }
        )
    return out


def _verdicts(summary: dict) -> dict[str, str]:
    """Every verdict of a report: each method against none, then each contrast."""
    out = {r["method"]: verdict_text(r["diff_to_none"]) for r in summary["rows"] if r.get("diff_to_none")}
    out.update({f"{c['method']} − {c['than']}": verdict_text(c["diff"]) for c in summary["contrasts"] if c["diff"]})
    return out


def compare_verdicts(before: dict, after: dict) -> list[dict[str, str]]:
    """Per comparison (a method against none, or a contrast): its verdict in the report and from the rerun."""
    old, new = _verdicts(before), _verdicts(after)
    return [{"method": m, "before": old[m], "after": new.get(m, "–")} for m in old]


def _environment(specs: list[RunSpec]) -> dict | None:
    for s in specs:
        record = read_json_object(s.run_dir / ENVIRONMENT_FILE)
        if record and isinstance(record.get("start"), dict):
            return record["start"]
    return None


def _num(x: float | None, sign: str = "+") -> str:
    """A number in its file's units (accuracies as fractions, the loss as it is)."""
    return "–" if x is None else f"{x:{sign}.4f}"


def verify(grid: Grid, out: Path, scratch: Path, launcher, programs, run_phase) -> int:
    """Rerun the test phase into `scratch`, compare, print; the exit status (see the module's docstring)."""
    selection = load_selection(out)
    missing = sorted(set(grid.methods) - set(selection))
    if missing:
        raise UserError(f"--verify: selection.json of {out} has no {', '.join(missing)}; same --grid and --methods?")
    original = test_runs(grid, selection, out)
    unfinished = [s.name for s in original if run_state(s) != "done"]
    if unfinished:
        raise UserError(f"--verify: {len(unfinished)} test run(s) of {out} are not finished ({unfinished[0]}, ...)")
    again = test_runs(grid, selection, scratch)
    print(f"verify: training the {len(again)} test-phase runs again in {scratch}", flush=True)
    run_phase("verify", again, again, programs, scratch, launcher)

    rows = compare_runs(original, again)
    unequal = [r for r in rows if r["before"] != r["after"]]
    if not unequal:
        print(f"verify: reproduced exactly: all {len(rows)} numbers of {len(original)} runs are equal", flush=True)
        return 0

    env_before, env_after = _environment(original), _environment(again)
    differs = same_machine(env_before, env_after) if env_before and env_after else ["unknown"]
    print(
        f"verify: {len(unequal)} of {len(rows)} numbers differ; environment differs in: "
        f"{', '.join(differs) or 'nothing (same machine and libraries)'}"
    )
    print("method | number | mean shift over seeds | largest shift | seed-to-seed std before (in the file's units)")
    for s in shifts(rows):
        if not s["equal"]:
            spread = _num(s["std"], "")
            print(f"{s['method']} | {s['key']} | {_num(s['shift'])} | {_num(s['max_abs_shift'])} | {spread}")
    verdicts = compare_verdicts(summarize(grid, selection, original), summarize(grid, selection, again))
    changed = [v for v in verdicts if v["before"] != v["after"]]
    for v in verdicts:
        print(f"verdict {v['method']}: {v['before']} -> {v['after']}{'  CHANGED' if v in changed else ''}")
    if changed:
        print(f"verify: {len(changed)} verdict(s) of the report do not hold on this rerun", flush=True)
        return 1
    if not differs:
        print("verify: every verdict holds, but the same environment gave other numbers: not reproduced", flush=True)
        return 1
    print("verify: not exactly reproduced (another environment), but every verdict of the report holds", flush=True)
    return 0
