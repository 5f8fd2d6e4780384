"""The benchmark protocol's plumbing (onthefly/experiments) on a tiny grid with faked runs.

The fake spawn writes what train.py and probe.py would write (config.json, metrics.jsonl,
best.pt, test_metrics.json, probe.json) with known numbers, and counts its launches. One test
launches train.py's main once (on tiny encoders: tests/tiny_train.py), to check that the options
the sweep writes are train.py's and that the run it leaves behind counts as finished.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from onthefly.analysis.stats import compare_paired
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
TEST = {
    "none": [0.70, 0.72, 0.74],
    "OPM": [0.75, 0.73, 0.80],
    "audio alone": [0.81, 0.80, 0.79],
    "visual alone": [0.55, 0.50, 0.60],
}
ALONE_VAL = {"audio": 0.82, "visual": 0.58}
PROGRAMS = Programs(python="python")
GOLDEN = Path(__file__).parent / "golden" / "protocol_fake"
TINY_TRAIN = Path(__file__).with_name("tiny_train.py")


def write_grid(tmp_path: Path, grid: dict = GRID) -> gridfile.Grid:
    path = tmp_path / "grid.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                **grid,
                "methods": {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in grid["methods"].items()},
            },
            sort_keys=False,
        )
    )
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
                (spec.run_dir / "probe.json").write_text(
                    json.dumps({"acc_audio": 0.9, "acc_visual": 0.4 + spec.seed / 100})
                )
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
        epochs = [
            {"epoch": 0, "val_acc": val - 0.1, "val_acc_audio": 0.7, "val_acc_visual": 0.3},
            {"epoch": 1, "val_acc": val, "val_acc_audio": 0.8, "val_acc_visual": 0.35},
        ]
        (spec.run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
        (spec.run_dir / "last.pt").write_text("fake")
        (spec.run_dir / "best.pt").write_text("fake")
        # A leak: the fake writes test numbers even for tuning runs, which the selection must ignore.
        (spec.run_dir / "test_metrics.json").write_text(
            json.dumps({"acc": test, "macro_f1": test - 0.01, "acc_audio": 0.8, "acc_visual": 0.3 + spec.seed / 100})
        )
        return 0

    def launches(self, kind: str = "train.py") -> list[list[str]]:
        return [c for c in self.commands if c[1].endswith(kind)]


@pytest.fixture(autouse=True)
def figures_only_where_checked(request):
    """The report's figures are drawn in the tests marked draws_figures only (no_report_figures)."""
    if "draws_figures" not in request.keywords:
        request.getfixturevalue("no_report_figures")


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

    def phase(c):
        return Path(c[c.index("--output_dir") + 1]).relative_to(out).parts[0]

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


@pytest.mark.draws_figures
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
    # All three differences positive: 2 of the 2^3 sign patterns reach |mean| 0.04, p = 0.25;
    # one method compared with none, so Holm leaves it as it is, and 0.25 does not survive.
    assert float(rows["OPM"]["diff_perm_p"]) == pytest.approx(0.25)
    assert float(rows["OPM"]["diff_holm_p"]) == pytest.approx(0.25) and rows["OPM"]["diff_survives"] == "false"
    half = 4.302652729749464 * np.std([0.05, 0.01, 0.06], ddof=1) / np.sqrt(3)  # t_{2, 0.975}
    assert float(rows["OPM"]["diff_t_high"]) == pytest.approx(0.04 + half)
    assert float(rows["OPM"]["none_acc_std"]) == pytest.approx(np.std(TEST["none"], ddof=1))
    with open(out / "per_seed.csv") as f:
        per_seed = {(r["method"], int(r["seed"])): r for r in csv.DictReader(f)}
    assert len(per_seed) == 12 and float(per_seed[("OPM", 2)]["acc"]) == pytest.approx(TEST["OPM"][2])
    assert rows["OPM"]["weak_modality"] == "visual"  # the reference with the lower validation accuracy
    assert float(rows["OPM"]["weak_head_mean"]) == pytest.approx(0.31)  # 0.3 + seed/100 over seeds 0, 1, 2
    assert float(rows["OPM"]["weak_probe_mean"]) == pytest.approx(0.41)
    assert rows["OPM"]["selected"] == "q_base0.5"
    report = (out / "report.md").read_text()
    assert "| OPM | 3 | 76.00 ± 3.61 |" in report and "+4.00 [" in report and "| no difference shown |" in report
    assert (out / "modality_curves.png").stat().st_size > 0 and (out / "sensitivity.png").stat().st_size > 0


class FakeOPMDropRates(FakeRuns):
    """FakeRuns whose OPM runs log a drop probability per epoch, as train.py's metrics.jsonl does."""

    def __call__(self, job, argv, env):
        code = super().__call__(job, argv, env)
        if job.kind != "probe" and job.spec.method == "OPM":
            path = job.spec.run_dir / "metrics.jsonl"
            epochs = [json.loads(line) for line in path.read_text().splitlines()]
            for epoch, q in zip(epochs, (0.1, 0.3)):
                epoch.update(train_q_audio=q, train_q_visual=None)
            path.write_text("".join(json.dumps(e) + "\n" for e in epochs))
        return code


def test_report_without_references_or_uniform_dropout(tmp_path):
    """A grid with no trained-alone references has no weak modality: no 'Head'/'Probe' columns
    (not 'Head None'); without DROPOUT_UNIFORM, OPM's drop rates are not read against it."""
    protocol(tmp_path, write_grid(tmp_path, {**GRID, "references": []}), FakeOPMDropRates())
    report = (tmp_path / "out" / "report.md").read_text()
    assert "No trained-alone references, so no weak modality." in report
    assert "None" not in report and "Head" not in report and "Probe" not in report
    # q_audio 0.1 and 0.3 over the two epochs of each of the three test seeds: mean 0.2
    assert "its selected point): q_audio 0.200." in report and "DROPOUT_UNIFORM" not in report


@pytest.mark.parametrize("name", ["benchmark_avdigits.yaml", "benchmark_avdigits_resnet18.yaml"])
def test_the_shipped_grid_files_are_valid(name):
    """The grid files the README's commands run: every run's options pass train.py's parser and checks."""
    grid = gridfile.load_grid(Path(__file__).parents[1] / "configs" / name)
    runspec.check_run_options(grid)
    sizes = {len(m.points()) for m in grid.methods.values()}
    assert "none" in grid.methods and sizes == {6} and len(grid.test_seeds) == 10


def test_contrasts_compare_two_methods_paired_by_seed(tmp_path):
    protocol(tmp_path, write_grid(tmp_path, {**GRID, "contrasts": [["OPM", "none"]]}), FakeRuns())
    out = tmp_path / "out"
    (contrast,) = json.loads((out / "summary.json").read_text())["contrasts"]
    d = contrast["diff"]
    # OPM - none by seed: (0.05, 0.01, 0.06); 2 of the 2^3 sign patterns reach |mean| 0.04; the only
    # contrast, so Holm keeps p = 0.25, which does not survive.
    assert (contrast["method"], contrast["than"], d["seeds"]) == ("OPM", "none", [0, 1, 2])
    assert d["mean"] == pytest.approx(0.04) and d["perm_p"] == pytest.approx(0.25)
    assert d["holm_p"] == pytest.approx(0.25) and d["survives"] is False
    half = 4.302652729749464 * np.std([0.05, 0.01, 0.06], ddof=1) / np.sqrt(3)  # t_{2, 0.975}
    assert d["high"] == pytest.approx(0.04 + half)
    report = (out / "report.md").read_text()
    assert f"| OPM − none | +4.00 [{100 * (0.04 - half):+.2f}, {100 * (0.04 + half):+.2f}] | 0.250 | 0.250 |" in report
    # --methods without one of its two methods drops the contrast, not the run
    assert (
        gridfile.with_overrides(write_grid(tmp_path, {**GRID, "contrasts": [["OPM", "none"]]}), [], ["OPM"]).contrasts
        == ()
    )


def test_bootstrap_interval_against_hand_computed_cases():
    # Differences (0, 0, 0, 0, 1): the bootstrap mean is K/5 with K ~ Binomial(5, 0.2), so its
    # 2.5% quantile is 0 (P(K = 0) = 0.33) and its 97.5% quantile 0.6 (P(K <= 2) = 0.942,
    # P(K <= 3) = 0.993).
    base = {s: 0.5 for s in range(5)}
    method = {s: 0.5 + (s == 4) for s in range(5)}
    d = compare_paired(method, {**base, 99: 0.0})  # seed 99 has no pair and is left out
    assert d["n"] == 5 and d["mean"] == pytest.approx(0.2)
    assert d["boot_low"] == pytest.approx(0.0) and d["boot_high"] == pytest.approx(0.6)
    # Every pair differs by the same amount: the interval is that amount.
    same = compare_paired({s: 0.8 + s / 10 for s in range(4)}, {s: 0.75 + s / 10 for s in range(4)})
    assert same["boot_low"] == pytest.approx(0.05) and same["boot_high"] == pytest.approx(0.05)
    # The mean difference, by hand, and a fixed seed gives the same interval twice.
    a, b = {0: 0.9, 1: 0.7, 2: 0.8}, {0: 0.85, 1: 0.75, 2: 0.7}
    assert compare_paired(a, b)["mean"] == pytest.approx((0.05 - 0.05 + 0.10) / 3)
    assert compare_paired(a, b) == compare_paired(a, b)
    assert compare_paired({0: 0.9}, {0: 0.8}) is None  # one pair: no interval


@pytest.mark.parametrize(
    "change, message",
    [
        ({"test_seeds": [10, 3, 4]}, "test seeds must be fresh: 10"),
        ({"methods": {"none": {"grid": {"lr": [0.01]}}, "OPM": {"grid": {"q_base": [0.3, 0.5]}}}}, "same budget"),
        ({"common": {"seed": 1}}, "set by the sweep itself"),
        ({"methods": {"none": {"grid": {"epochs": [1, 2]}}}}, "also in common"),
        ({"contrasts": "OPM"}, "'contrasts' must be a list"),
        ({"contrasts": [["OPM", "OPM"]]}, "not a pair of two different method names"),
        ({"contrasts": [["OPM", "OGM"]]}, "OGM not under 'methods'"),
        ({"contrasts": [["OPM", "none"], ["none", "OPM"]]}, "listed twice"),
    ],
)
def test_bad_grid_files_are_refused(tmp_path, change, message):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**GRID, **change}, sort_keys=False))
    with pytest.raises(UserError, match=message):
        gridfile.load_grid(path)


def test_a_real_train_run_counts_as_finished(tmp_path):
    grid = write_grid(
        tmp_path,
        {
            **GRID,
            "common": {
                "dataset": "avdigits",
                "epochs": 1,
                "limit_samples": 64,
                "batch_size": 32,
                "weight_decay": 0.0001,
            },
        },
    )
    spec = runspec.tuning_runs(grid, tmp_path / "out")[0]
    assert runspec.run_state(spec) == "start"
    jobs = protocol_module.training_jobs([spec], Programs(train=TINY_TRAIN), tmp_path / "out")
    progress = launchers.Progress("tuning", 1, 0, [], 1)
    assert launchers.LocalLauncher(["cpu"]).run(jobs, progress, protocol_module.settle_training) == []
    assert runspec.run_state(spec) == "done", jobs[0].log.read_text()
    assert not (spec.run_dir / "test_metrics.json").exists()  # --no-eval_test
    assert runspec.best_val_acc(spec.run_dir) is not None
    # Where it ran: train.py's environment.json (commit, versions, CPU) beside its config.json.
    environment = json.loads((spec.run_dir / "environment.json").read_text())
    assert environment["resumes"] == [] and environment["start"]["libraries"]["torch"]
    assert environment["start"]["cpu"] and "commit" in environment["start"]["git"]


def test_progress_line_counts_and_eta():
    progress = launchers.Progress("tuning", 10, 4, [60.0, 120.0], slots=2, later=6)
    progress.running = 2
    # 10 - 4 done - 2 running counted as half done = 5 runs of 90 s on 2 slots = 225 s; with 6 more: 495 s.
    assert progress.line() == (
        "[tuning] 4/10 done, 2 running, ETA 3.8 min (1.5 min per run over 2 finished); "
        "with the 6 runs of the test phase: 8.2 min"
    )
    assert launchers.Progress("test", 3, 0, [], 2).line() == "[test] 0/3 done, 0 running"


# --------------------------------------------------------------------------- same results as before the split


@pytest.mark.draws_figures
def test_selection_and_report_match_the_protocol_before_the_split(tmp_path):
    """tests/golden/protocol_fake: the same fake runs through analysis/sweep.py as it stood before
    the protocol moved to onthefly/experiments (selection.json, results.csv, report.md up to its
    timing section). The statistics columns (t-interval, sign-flip p, Holm, bootstrap as secondary)
    were regenerated when they replaced the bootstrap-only interval; every other column and line
    was checked equal to the file from before the split at that point; the best-epoch column and
    line, and the curves caption (every method), were added since."""
    protocol(tmp_path, write_grid(tmp_path), FakeRuns())
    out = tmp_path / "out"
    assert json.loads((out / "selection.json").read_text()) == json.loads((GOLDEN / "selection.json").read_text())
    with open(GOLDEN / "results.csv") as f:
        golden = list(csv.DictReader(f))
    with open(out / "results.csv") as f:
        now = list(csv.DictReader(f))
    assert [{k: r[k] for k in golden[0]} for r in now] == golden
    report = (out / "report.md").read_text()
    assert report[: report.index("## Time")] == (GOLDEN / "report.md").read_text()


class Interrupting(FakeRuns):
    """Ctrl-C once `after` training runs have finished."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after

    def __call__(self, job, argv, env):
        if job.kind == "train" and len(self.launches()) >= self.after:
            raise KeyboardInterrupt
        return super().__call__(job, argv, env)


def test_an_interrupted_protocol_redoes_nothing_finished(tmp_path):
    grid = write_grid(tmp_path)
    first = Interrupting(after=11)  # the 8 tuning runs and 3 test runs
    with pytest.raises(KeyboardInterrupt):
        protocol(tmp_path, grid, first)
    finished = {c[c.index("--run_name") + 1] + c[c.index("--output_dir") + 1] for c in first.launches()}
    again = FakeRuns()
    protocol(tmp_path, grid, again)
    relaunched = {c[c.index("--run_name") + 1] + c[c.index("--output_dir") + 1] for c in again.launches()}
    assert len(finished) == 11 and len(relaunched) == 20 - 11 and not finished & relaunched


# --------------------------------------------------------------------------- issue 20: what counts as finished


def test_a_run_is_judged_by_the_options_that_defined_it(tmp_path):
    small = write_grid(tmp_path, {**GRID, "common": {"dataset": "avdigits", "epochs": 2, "limit_samples": 32}})
    protocol(tmp_path, small, FakeRuns())
    full = FakeRuns()  # the same command without --set limit_samples=32: none of those runs is this protocol's
    protocol(tmp_path, write_grid(tmp_path), full)
    assert len(full.launches()) == 20 and all("--overwrite" in c for c in full.launches())
    assert all("--limit_samples" not in c for c in full.launches())


BREAKS = {
    "emptied metrics.jsonl": ("tune/OPM/p1_q_base0.5_seed11", "metrics.jsonl", ""),
    "missing best.pt": ("test/OPM_seed1", "best.pt", None),
    "missing test_metrics.json": ("test/none_seed2", "test_metrics.json", None),
    "missing reference": ("test/visual-alone_seed0", "test_metrics.json", None),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_a_finished_run_missing_its_results_is_redone(tmp_path, case):
    grid = write_grid(tmp_path)
    protocol(tmp_path, grid, FakeRuns())
    run, name, content = BREAKS[case]
    target = tmp_path / "out" / run / name
    target.unlink() if content is None else target.write_text(content)
    again = FakeRuns()
    protocol(tmp_path, grid, again)
    assert [c[c.index("--run_name") + 1] for c in again.launches()] == [Path(run).name]
    assert "--overwrite" in again.launches()[0]
    with open(tmp_path / "out" / "results.csv") as f:
        assert {r["method"]: r["n_seeds"] for r in csv.DictReader(f)} == {m: "3" for m in TEST}
    assert "No trained-alone references" not in (tmp_path / "out" / "report.md").read_text()
    third = FakeRuns()
    protocol(tmp_path, grid, third)
    assert third.commands == []


def test_a_second_protocol_on_the_same_folder_is_refused(tmp_path, capsys):
    from onthefly.rundir import acquire_run_lock

    (tmp_path / "out").mkdir()
    held = acquire_run_lock(tmp_path / "out")  # as a running sweep.py holds it
    runs = FakeRuns()
    try:
        with pytest.raises(UserError, match="in use by process .* choose another --out"):
            protocol(tmp_path, write_grid(tmp_path), runs)
    finally:
        held.release()
    assert runs.commands == []
    protocol(tmp_path, write_grid(tmp_path), runs)  # free again once the first one ended
    assert not (tmp_path / "out" / ".lock").exists()


class Diverging(FakeRuns):
    """These runs write their first epoch, then stop as train.py does on a non-finite loss (exit 3)."""

    def __init__(self, diverge: set[str]):
        super().__init__()
        self.diverge = diverge

    def __call__(self, job, argv, env):
        rc = super().__call__(job, argv, env)
        if job.name in self.diverge:
            (job.spec.run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "val_acc": 0.1}) + "\n")
            (job.spec.run_dir / "test_metrics.json").unlink()
            return runspec.DIVERGED_EXIT
        return rc


def test_a_diverged_run_is_recorded_and_reported_not_retried(tmp_path):
    grid = write_grid(tmp_path)
    runs = Diverging({"tune/OPM/p1_q_base0.5_seed10", "test/none_seed1"})
    result = protocol(tmp_path, grid, runs)
    opm = result["selection"]["OPM"]
    assert opm["index"] == 0  # point 1 (the best on validation) diverged: never selected
    assert opm["points"][1]["val_acc"] is None and opm["points"][1]["diverged_seeds"] == [10]
    out = tmp_path / "out"
    with open(out / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert rows["none"]["n_seeds"] == "2" and rows["none"]["n_diverged"] == "1"
    assert (
        "Diverged (train.py stopped on non-finite values; not in the rows above): none seed 1."
        in (out / "report.md").read_text()
    )
    again = FakeRuns()
    protocol(tmp_path, grid, again)
    assert again.commands == []


# --------------------------------------------------------------------------- issue 20: the grid is checked first


BAD_GRIDS = {
    "unknown method": (
        {"methods": {"none": {"grid": {"lr": [0.01]}}, "FOO": {"grid": {"lr": [0.01]}}}},
        "invalid choice: 'FOO'",
    ),
    "unknown option": ({"common": {"dataset": "avdigits", "epoch": 2}}, "not train.py options: epoch"),
    "negative lr": (
        {"methods": {"none": {"grid": {"lr": [0.01, -1]}}, "OPM": {"grid": {"q_base": [0.3, 0.5]}}}},
        "--lr must be > 0",
    ),
    "unknown reference": ({"references": ["audio", "smell"]}, "smell is not a modality of avdigits"),
    "reference twice": ({"references": ["audio", "audio"]}, "lists audio twice"),
    "print_config": ({"common": {"dataset": "avdigits", "print_config": True}}, "set by the sweep itself"),
    "capitalised option": ({"common": {"dataset": "avdigits", "Epochs": 1}}, "not option names"),
}


@pytest.mark.parametrize("case", list(BAD_GRIDS))
def test_the_whole_grid_is_checked_before_the_first_run(tmp_path, case):
    change, message = BAD_GRIDS[case]
    runs = FakeRuns()
    with pytest.raises(UserError, match=message):
        protocol(tmp_path, write_grid(tmp_path, {**GRID, **change}), runs)
    assert runs.commands == []


def test_grid_file_with_a_key_written_twice_is_refused(tmp_path):
    path = tmp_path / "grid.yaml"
    text = yaml.safe_dump(GRID, sort_keys=False)
    path.write_text(text.replace("  epochs: 2\n", "  epochs: 2\n  epochs: 3\n"))
    with pytest.raises(UserError, match="key 'epochs' appears twice"):
        gridfile.load_grid(path)


def test_config_file_with_a_key_written_twice_is_refused(tmp_path):
    from onthefly.config import resolve_config

    path = tmp_path / "recipe.yaml"
    path.write_text("lr: 0.1\nepochs: 3\nlr: 0.2\n")
    with pytest.raises(UserError, match="key 'lr' appears twice in one mapping \\(line 3\\)"):
        resolve_config(["--config", str(path)])


def test_a_flag_set_false_becomes_what_train_py_accepts(tmp_path):
    args = runspec.option_args({"deterministic": False, "eval_test": False, "channels_last": True, "lr": 0.1})
    assert args == ["--no-eval_test", "--channels_last", "--lr", "0.1"]
    assert runspec.option_args({"deterministic": True}) == ["--deterministic"]
    grid = write_grid(tmp_path, {**GRID, "common": {"dataset": "avdigits", "epochs": 2, "deterministic": False}})
    runspec.check_run_options(grid)  # train.py's parser accepts every run's options


def test_long_run_folder_names_are_shortened_with_a_hash(tmp_path):
    grid = {
        name: [0.000123456]
        for name in (
            "audio_frames",
            "audio_noise",
            "image_noise",
            "image_occlusion",
            "image_corrupt",
            "audio_corrupt",
            "image_downsample",
            "data_seed",
            "weight_decay",
            "momentum",
            "lr_step",
            "lr_gamma",
            "batch_size",
            "num_workers",
            "log_every",
            "epochs",
            "lr",
            "num_frames",
        )
    }
    g = write_grid(tmp_path, {**GRID, "common": {"dataset": "avdigits"}, "methods": {"none": {"grid": grid}}})
    names = [s.run_dir.name for s in runspec.tuning_runs(g, tmp_path)]
    assert all(len(n) <= runspec.MAX_NAME for n in names) and len(set(names)) == len(names)
    full = "p0_" + runspec.point_name(g.methods["none"].points()[0]) + "_seed10"
    assert len(full) > 255 and names[0].startswith(full[:50])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "epochs=: x"], "--set epochs=: x: the value is not valid YAML"),
        (["--set", "Epochs=1"], "not option names"),
        (["--device", "foo"], "--device foo: expected auto, cpu, cuda or cuda:N"),
        (["--launcher", "slurm"], "--launcher slurm needs --partition"),
        (["--out", "FILE/sub"], "Not a directory"),
    ],
)
def test_command_line_mistakes_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "FILE").write_text("")
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID, sort_keys=False))
    argv = [a.replace("FILE", str(tmp_path / "FILE")) for a in argv]
    defaults = ["--grid", str(grid), "--device", "cpu", "--out", str(tmp_path / "out")]
    assert cli.main(defaults + argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sweep.py: error:") and message in err, err


def test_reproduce_script_starts_again_a_run_interrupted_in_its_first_epoch(tmp_path):
    """The script's first-epoch dead end: a folder with config.json and no last.pt (train.py
    refuses to start over it without --overwrite). A stand-in PYTHON records the commands."""
    import subprocess

    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    out = tmp_path / "repro"
    (out / "none_seed0").mkdir(parents=True)
    (out / "none_seed0" / "config.json").write_text("{}")
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHON": str(fake),
        "OUT": str(out),
        "SEEDS": "0 1",
        "METHODS": "none",
        "MODALITIES": "audio",
    }
    script = Path(__file__).parents[1] / "scripts" / "reproduce_avdigits.sh"
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
    calls = [line for line in log.read_text().splitlines() if line.startswith("code/train.py") and "none_seed" in line]
    assert len(calls) == 2
    assert "--run_name none_seed0" in calls[0] and calls[0].endswith("--overwrite --modulation none --seed 0")
    assert "--run_name none_seed1" in calls[1] and "--overwrite" not in calls[1]


def _verify(tmp_path: Path, grid: gridfile.Grid, runs: FakeRuns) -> int:
    launcher = launchers.LocalLauncher(["cpu", "cpu"], spawn=runs, report_every=0.01)
    return protocol_module.run_verify(grid, tmp_path / "out", tmp_path / "scratch", launcher, PROGRAMS)


def test_verify_reproduces_exactly_and_reports_shifts(tmp_path, capsys):
    grid = write_grid(tmp_path)
    protocol_module.run_protocol(
        grid,
        tmp_path / "out",
        launchers.LocalLauncher(["cpu"], spawn=FakeRuns(), report_every=0.01),
        PROGRAMS,
        publish=tmp_path / "published",
    )
    assert (tmp_path / "out" / "environment.json").is_file()
    published = {p.name for p in (tmp_path / "published").iterdir()}
    assert {"report.md", "per_seed.csv", "results.csv", "environment.json", "selection.json"} <= published
    again = FakeRuns()
    assert _verify(tmp_path, grid, again) == 0
    assert "reproduced exactly: all 48 numbers of 12 runs" in capsys.readouterr().out  # 12 runs x 4 numbers
    assert len(again.launches()) == 12 and all("--eval_test" in c for c in again.launches())
    assert all(str(tmp_path / "scratch") in c[c.index("--output_dir") + 1] for c in again.launches())

    class Shifted(FakeRuns):  # OPM's seed 1 scores 0.03 higher on test
        def __call__(self, job, argv, env):
            code = super().__call__(job, argv, env)
            if job.spec.method == "OPM" and job.spec.seed == 1:
                path = job.spec.run_dir / "test_metrics.json"
                path.write_text(json.dumps({**json.loads(path.read_text()), "acc": 0.76}))
            return code

    for d in (tmp_path / "scratch" / "test").iterdir():
        (d / runspec.DONE_FILE).unlink()
    # Without an environment record the machines cannot be called the same: a shift is reported, exit 0.
    assert _verify(tmp_path, grid, Shifted()) == 0
    text = capsys.readouterr().out
    # OPM acc: one of three seeds moved by +0.03 -> mean shift +0.01; std before = std(0.75, 0.73, 0.80).
    assert f"OPM | acc | +0.0100 | +0.0300 | {np.std(TEST['OPM'], ddof=1):.4f}" in text
    assert "verdict OPM: no difference shown -> no difference shown" in text and "holds" in text

    # The same environment recorded in every run: different numbers are a failure to reproduce.
    for d in [*(tmp_path / "scratch" / "test").iterdir(), *(tmp_path / "out" / "test").iterdir()]:
        (d / "environment.json").write_text(json.dumps({"start": {"cpu": "x", "libraries": {"torch": "1"}}}))
        (d / runspec.DONE_FILE).unlink(missing_ok=True) if "scratch" in str(d) else None
    assert _verify(tmp_path, grid, Shifted()) == 1
    assert "not reproduced" in capsys.readouterr().out


def test_verify_without_a_finished_protocol_is_one_line(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    write_grid(tmp_path)
    assert cli.main(["--grid", str(grid), "--out", str(tmp_path / "none"), "--verify"]) == 2
    assert "no finished protocol" in capsys.readouterr().err


def test_compare_verdicts_names_a_changed_one():
    from onthefly.experiments.verify import compare_verdicts

    def summary(survives: bool, mean: float, contrast_survives: bool = False) -> dict:
        return {
            "rows": [
                {"method": "none", "diff_to_none": None},
                {"method": "OPM", "diff_to_none": {"survives": survives, "mean": mean}},
            ],
            "contrasts": [{"method": "OPM", "than": "OGM", "diff": {"survives": contrast_survives, "mean": 0.01}}],
        }

    assert compare_verdicts(summary(True, 0.02), summary(False, 0.01)) == [
        {"method": "OPM", "before": "better", "after": "no difference shown"},
        {"method": "OPM − OGM", "before": "no difference shown", "after": "no difference shown"},
    ]
    assert compare_verdicts(summary(True, -0.02), summary(True, -0.01))[0]["after"] == "worse"
    assert compare_verdicts(summary(True, 0.02), summary(True, 0.02, True))[1]["after"] == "better"


def test_best_epoch_and_opm_drop_rates_from_metrics(tmp_path):
    from onthefly.analysis.benchmark_report import best_epoch, best_epochs, mean_drop_rates, plateau_epoch

    records = [
        {"epoch": 0, "val_acc": 0.5, "train_q_audio": 0.4, "train_q_visual": 0.0},
        {"epoch": 1, "val_acc": 0.7, "train_q_audio": 0.2, "train_q_visual": 0.1},
        {"epoch": 2, "val_acc": 0.7, "train_q_audio": 0.0, "train_q_visual": 0.2},  # a tie: best.pt stays at 1
        {"epoch": 3, "val_acc": 0.6},
    ]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert best_epoch(run) == (1, 4)
    spec = runspec.RunSpec("test", "OPM", 0, run, {})
    # 1 is not among the last two (2, 3); the first epoch within 0.01 of 0.7 is 1 too
    assert best_epochs([spec]) == {"per_seed": {0: 1}, "plateau": {0: 1}, "late": 0, "epochs": 4}
    assert plateau_epoch(run, within=0.25) == 0
    assert mean_drop_rates([spec]) == {"audio": pytest.approx(0.2), "visual": pytest.approx(0.1)}
    assert best_epoch(tmp_path / "nothing") is None
