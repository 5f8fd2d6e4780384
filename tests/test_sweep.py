"""The benchmark protocol's plumbing (onthefly/experiments) on a tiny grid with faked runs.

The fake spawn writes what train.py and probe.py would write (config.json, metrics.jsonl,
best.pt, test_metrics.json, probe.json) with known numbers, and counts its launches. One test
launches the real train.py once, to check that the options the sweep writes are train.py's
and that the run it leaves behind counts as finished.
"""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from onthefly.analysis.benchmark_report import paired_difference
from onthefly.errors import UserError
from onthefly.experiments import cli, launchers
from onthefly.experiments import grid as gridfile
from onthefly.experiments import protocol as protocol_module
from onthefly.experiments import spec as runspec
from onthefly.experiments.protocol import Programs

GRID = {
    "common": {"dataset": "avdigits", "epochs": 2},
    "tuning_seeds": [10, 11],
    "test_seeds": [0, 1, 2],
    "references": ["audio", "visual"],
    "methods": {
        "none": {"grid": {"lr": [0.01, 0.02]}},
        "OPM": {"grid": {"q_base": [0.3, 0.5]}, "sensitivity": {"x": "q_base"}},
    },
}
# Validation favours OPM's second point, the test split its first: selection must follow validation.
VAL = {("none", 0): 0.70, ("none", 1): 0.60, ("OPM", 0): 0.72, ("OPM", 1): 0.80}
TEST_IF_LEAKED = {("none", 0): 0.60, ("none", 1): 0.70, ("OPM", 0): 0.90, ("OPM", 1): 0.50}
# Test accuracies of the test-phase runs, per method and seed.
TEST = {"none": [0.70, 0.72, 0.74], "OPM": [0.75, 0.73, 0.80], "audio alone": [0.81, 0.80, 0.79],
        "visual alone": [0.55, 0.50, 0.60]}
ALONE_VAL = {"audio": 0.82, "visual": 0.58}
PROGRAMS = Programs(python="python")
GOLDEN = Path(__file__).parent / "golden" / "protocol_fake"


def write_grid(tmp_path: Path, grid: dict = GRID) -> gridfile.Grid:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**grid, "methods": {k: {kk: vv for kk, vv in v.items() if vv is not None}
                                                         for k, v in grid["methods"].items()}}, sort_keys=False))
    return gridfile.load_grid(path)


class FakeRuns:
    """Writes a run's files from its options instead of training; records every command."""

    def __init__(self, fail: set[str] = frozenset()):
        self.commands: list[list[str]] = []
        self.fail = set(fail)

    def __call__(self, job, argv, env):
        self.commands.append(argv)
        assert env["OMP_NUM_THREADS"] == "1"
        if job.name in self.fail:
            return 1
        if job.kind == "probe":
            for spec in job.targets:
                assert str(spec.run_dir) in argv
                (spec.run_dir / "probe.json").write_text(json.dumps({"acc_audio": 0.9, "acc_visual": 0.4 + spec.seed / 100}))
            return 0
        spec = job.spec
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        (spec.run_dir / "config.json").write_text(json.dumps({**spec.options, "weight_decay": 1e-4}))
        if spec.phase == "tune":
            val, test = VAL[(spec.method, spec.point_index)], TEST_IF_LEAKED[(spec.method, spec.point_index)]
            val += 0.01 if spec.seed == 10 else -0.01  # the seeds differ; their mean is VAL
        elif spec.is_reference:
            val, test = ALONE_VAL[spec.options["modality"]], TEST[spec.method][spec.seed]
        else:
            val, test = 0.7, TEST[spec.method][spec.seed]
        epochs = [{"epoch": 0, "val_acc": val - 0.1, "val_acc_audio": 0.7, "val_acc_visual": 0.3},
                  {"epoch": 1, "val_acc": val, "val_acc_audio": 0.8, "val_acc_visual": 0.35}]
        (spec.run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
        (spec.run_dir / "last.pt").write_text("fake")
        (spec.run_dir / "best.pt").write_text("fake")
        # A leak: the fake writes test numbers even for tuning runs, which the selection must ignore.
        (spec.run_dir / "test_metrics.json").write_text(json.dumps(
            {"acc": test, "macro_f1": test - 0.01, "acc_audio": 0.8, "acc_visual": 0.3 + spec.seed / 100}))
        return 0

    def launches(self, kind: str = "train.py") -> list[list[str]]:
        return [c for c in self.commands if c[1].endswith(kind)]


def protocol(tmp_path: Path, grid: gridfile.Grid, runs: FakeRuns) -> dict:
    launcher = launchers.LocalLauncher(["cpu", "cpu"], spawn=runs, report_every=0.01)
    return protocol_module.run_protocol(grid, tmp_path / "out", launcher, PROGRAMS)


def test_selection_uses_validation_never_test(tmp_path):
    runs = FakeRuns()
    result = protocol(tmp_path, write_grid(tmp_path), runs)
    sel = result["selection"]
    assert sel["OPM"]["index"] == 1 and sel["OPM"]["point"] == {"q_base": 0.5}  # the test split would pick 0
    assert sel["none"]["index"] == 0
    assert sel["OPM"]["val_acc"] == pytest.approx(0.80)
    assert sel["OPM"]["points"][1]["per_seed"] == {10: pytest.approx(0.81), 11: pytest.approx(0.79)}
    out = tmp_path / "out"
    phase = lambda c: Path(c[c.index("--output_dir") + 1]).relative_to(out).parts[0]  # noqa: E731
    tuning = [c for c in runs.launches() if phase(c) == "tune"]
    testing = [c for c in runs.launches() if phase(c) == "test"]
    assert len(tuning) == 2 * 2 * 2 and all("--no-eval_test" in c for c in tuning)
    assert len(testing) == 4 * 3 and all("--eval_test" in c for c in testing)
    # The test runs use the selected point and only the test seeds.
    opm = [c for c in testing if "OPM" in c]
    assert {c[c.index("--q_base") + 1] for c in opm} == {"0.5"}
    assert sorted(int(c[c.index("--seed") + 1]) for c in opm) == [0, 1, 2]
    saved = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert saved["methods"]["OPM"]["index"] == 1


def test_ties_go_to_the_earlier_point(tmp_path):
    grid = write_grid(tmp_path)
    specs = runspec.tuning_runs(grid, tmp_path / "out")
    for s in specs:
        s.run_dir.mkdir(parents=True)
        (s.run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "val_acc": 0.5}) + "\n")
    assert {m: c["index"] for m, c in protocol_module.select_points(grid, specs).items()} == {"none": 0, "OPM": 0}


def test_rerun_skips_finished_runs_and_resumes_unfinished_ones(tmp_path):
    grid = write_grid(tmp_path)
    first = FakeRuns()
    protocol(tmp_path, grid, first)
    assert len(first.launches()) == 8 + 12
    probed = [a for c in first.launches("probe.py") for a in c if a.startswith(str(tmp_path))]
    assert len(first.launches("probe.py")) == 2 and len(probed) == len(set(probed)) == 12  # 2 processes, each run once

    again = FakeRuns()
    protocol(tmp_path, grid, again)
    assert again.commands == []  # everything finished: nothing relaunched

    # Finished runs keep only what a later phase reads: no checkpoint of a tuning run.
    run = tmp_path / "out" / "tune" / "OPM" / "p1_q_base0.5_seed11"
    assert (run / "metrics.jsonl").is_file() and not list(run.glob("*.pt"))

    # One run interrupted after a checkpoint (no completion record): resumed from its last.pt.
    (run / runspec.DONE_FILE).unlink()
    (run / "last.pt").write_text("fake")
    resumed = FakeRuns()
    protocol(tmp_path, grid, resumed)
    assert resumed.commands == [["python", str(PROGRAMS.train), "--resume", str(run / "last.pt"), "--device", "cpu"]]

    # A changed common option: every run's config differs, so every run starts afresh.
    changed = write_grid(tmp_path, {**GRID, "common": {"dataset": "avdigits", "epochs": 3}})
    fresh = FakeRuns()
    protocol(tmp_path, changed, fresh)
    assert len(fresh.launches()) == 20 and all("--overwrite" in c and "--resume" not in c for c in fresh.launches())


def test_failed_runs_stop_the_phase_and_are_retried(tmp_path):
    grid = write_grid(tmp_path)
    broken = FakeRuns(fail={"tune/none/p0_lr0.01_seed10"})
    with pytest.raises(protocol_module.RunsFailed, match="1 run"):
        protocol(tmp_path, grid, broken)
    assert len(broken.launches()) == 8  # the other tuning runs finished; no test run started
    retry = FakeRuns()
    protocol(tmp_path, grid, retry)
    assert len(retry.launches()) == 1 + 12
    with open(tmp_path / "out" / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20 and {r["state"] for r in rows} == {"done"}
    assert all(r["command"].startswith("python code/train.py --output_dir") for r in rows)


def test_report_statistics(tmp_path):
    protocol(tmp_path, write_grid(tmp_path), FakeRuns())
    out = tmp_path / "out"
    with open(out / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"none", "OPM", "audio alone", "visual alone"}
    assert float(rows["OPM"]["acc_mean"]) == pytest.approx(np.mean(TEST["OPM"]))
    assert float(rows["OPM"]["acc_std"]) == pytest.approx(np.std(TEST["OPM"], ddof=1))
    # Paired by seed: (0.75-0.70, 0.73-0.72, 0.80-0.74) = (0.05, 0.01, 0.06), mean 0.04.
    assert float(rows["OPM"]["diff_to_none_mean"]) == pytest.approx(0.04)
    assert rows["none"]["diff_to_none_mean"] == ""
    assert rows["OPM"]["weak_modality"] == "visual"  # the reference with the lower validation accuracy
    assert float(rows["OPM"]["weak_head_mean"]) == pytest.approx(0.31)  # 0.3 + seed/100 over seeds 0, 1, 2
    assert float(rows["OPM"]["weak_probe_mean"]) == pytest.approx(0.41)
    assert rows["OPM"]["selected"] == "q_base0.5"
    report = (out / "report.md").read_text()
    assert "| OPM | 3 | 76.00 ± 3.61 |" in report and "+4.00 [" in report
    assert (out / "modality_curves.png").stat().st_size > 0 and (out / "sensitivity.png").stat().st_size > 0


def test_bootstrap_interval_against_hand_computed_cases():
    # Differences (0, 0, 0, 0, 1): the bootstrap mean is K/5 with K ~ Binomial(5, 0.2), so its
    # 2.5% quantile is 0 (P(K = 0) = 0.33) and its 97.5% quantile 0.6 (P(K <= 2) = 0.942,
    # P(K <= 3) = 0.993).
    base = {s: 0.5 for s in range(5)}
    method = {s: 0.5 + (s == 4) for s in range(5)}
    d = paired_difference(method, {**base, 99: 0.0})  # seed 99 has no pair and is left out
    assert d["n"] == 5 and d["mean"] == pytest.approx(0.2)
    assert d["low"] == pytest.approx(0.0) and d["high"] == pytest.approx(0.6)
    # Every pair differs by the same amount: the interval is that amount.
    same = paired_difference({s: 0.8 + s / 10 for s in range(4)}, {s: 0.75 + s / 10 for s in range(4)})
    assert same["low"] == pytest.approx(0.05) and same["high"] == pytest.approx(0.05)
    # The mean difference, by hand, and a fixed seed gives the same interval twice.
    a, b = {0: 0.9, 1: 0.7, 2: 0.8}, {0: 0.85, 1: 0.75, 2: 0.7}
    assert paired_difference(a, b)["mean"] == pytest.approx((0.05 - 0.05 + 0.10) / 3)
    assert paired_difference(a, b) == paired_difference(a, b)
    assert paired_difference({0: 0.9}, {0: 0.8}) is None  # one pair: no interval


@pytest.mark.parametrize("change, message", [
    ({"test_seeds": [10, 3, 4]}, "test seeds must be fresh: 10"),
    ({"methods": {"none": {"grid": {"lr": [0.01]}}, "OPM": {"grid": {"q_base": [0.3, 0.5]}}}}, "same budget"),
    ({"common": {"seed": 1}}, "set by the sweep itself"),
    ({"methods": {"none": {"grid": {"epochs": [1, 2]}}}}, "also in common"),
])
def test_bad_grid_files_are_refused(tmp_path, change, message):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**GRID, **change}, sort_keys=False))
    with pytest.raises(UserError, match=message):
        gridfile.load_grid(path)


def test_a_real_train_run_counts_as_finished(tmp_path):
    grid = write_grid(tmp_path, {**GRID, "common": {"dataset": "avdigits", "epochs": 1, "limit_samples": 64,
                                                    "batch_size": 32, "weight_decay": 0.0001}})
    spec = runspec.tuning_runs(grid, tmp_path / "out")[0]
    assert runspec.run_state(spec) == "start"
    jobs = protocol_module.training_jobs([spec], Programs(), tmp_path / "out")
    progress = launchers.Progress("tuning", 1, 0, [], 1)
    assert launchers.LocalLauncher(["cpu"]).run(jobs, progress, protocol_module.settle_training) == []
    assert runspec.run_state(spec) == "done", jobs[0].log.read_text()
    assert not (spec.run_dir / "test_metrics.json").exists()  # --no-eval_test
    assert runspec.best_val_acc(spec.run_dir) is not None


def test_progress_line_counts_and_eta():
    progress = launchers.Progress("tuning", 10, 4, [60.0, 120.0], slots=2, later=6)
    progress.running = 2
    # 10 - 4 done - 2 running counted as half done = 5 runs of 90 s on 2 slots = 225 s; with 6 more: 495 s.
    assert progress.line() == ("[tuning] 4/10 done, 2 running, ETA 3.8 min (1.5 min per run over 2 finished); "
                               "with the 6 runs of the test phase: 8.2 min")
    assert launchers.Progress("test", 3, 0, [], 2).line() == "[test] 0/3 done, 0 running"
