"""The protocol through submitit (its local executor, as CI has no SLURM) against the local
launcher, with stand-in programs (tests/fake_programs.py) that write what train.py and probe.py
write. One run is preempted after its first epoch: its job must be requeued and continue
from last.pt."""

import json
import os
import signal
import sys
from pathlib import Path

import yaml

from onthefly.experiments import launchers
from onthefly.experiments.grid import load_grid
from onthefly.experiments.protocol import Programs, run_protocol

FAKE = Path(__file__).parent / "fake_programs.py"
PROGRAMS = Programs(python=sys.executable, train=FAKE, probe=FAKE)
GRID = {
    "common": {"dataset": "avdigits", "epochs": 2},
    "tuning_seeds": [10],
    "test_seeds": [0, 1],
    "references": ["audio"],
    "methods": {"none": {"grid": {"lr": [0.01, 0.02]}}, "OPM": {"grid": {"q_base": [0.3, 0.5]}}},
}
PREEMPTED = "p1_q_base0.5_seed10"  # a tuning run of OPM


def _protocol(tmp_path: Path, name: str, launcher) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(GRID, sort_keys=False))
    run_protocol(load_grid(path), tmp_path / name, launcher, PROGRAMS)
    return tmp_path / name


def test_submitit_protocol_requeues_a_preempted_run_and_reports_as_the_local_one(
    tmp_path, monkeypatch, no_report_figures
):
    local = _protocol(tmp_path, "local", launchers.LocalLauncher(["cpu", "cpu"]))

    monkeypatch.setenv("FAKE_PREEMPT", PREEMPTED)
    submitit_launcher = launchers.SubmititLauncher(
        tmp_path / "jobs", "local", "cpu", {"timeout_min": 5}, width=2, poll_every=0.2
    )
    cluster = _protocol(tmp_path, "submitit", submitit_launcher)

    run = cluster / "tune" / "OPM" / PREEMPTED
    log = (cluster / "logs" / "tune" / "OPM" / f"{PREEMPTED}.log").read_text()
    assert "# preempted or timed out: requeued, resuming from" in log
    assert f"resumed from {run / 'last.pt'} at epoch 1" in log
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    # The same selection and the same report numbers as the local launcher's.
    assert json.loads((cluster / "selection.json").read_text()) == json.loads((local / "selection.json").read_text())
    assert (cluster / "results.csv").read_text() == (local / "results.csv").read_text()
    assert len(list((tmp_path / "jobs").glob("*"))) > 0  # submitit's own folders: one per job


def _parent_of_process_with(*words: str) -> int:
    """The parent pid of the running process whose command line has these words (from /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and set(words) <= set((proc / "cmdline").read_bytes().decode().split("\0")):
                status = (proc / "status").read_text()
                return int(status.split("PPid:")[1].split()[0])
        except OSError:  # ended meanwhile
            continue
    raise AssertionError(f"no process with {words} in its command line")


def test_submitit_train_requeues_a_real_run_and_resumes_from_last_pt(tmp_path, monkeypatch):
    """code/submitit_train.py on submitit's local executor: the job is signalled as SLURM
    signals a preempted job (in its second epoch), requeued, and train.py continues from last.pt.
    train.py runs on tiny encoders (tests/tiny_train.py), paused in its second epoch until the
    signal: the job, its requeue and the resume are under test, not the model."""
    import time

    sys.path.insert(0, str(Path(__file__).parents[1] / "code"))
    import submitit_train

    root, started = tmp_path / "repo", tmp_path / "epoch1.started"
    (root / "code").mkdir(parents=True)
    (root / "code" / "train.py").symlink_to(Path(__file__).with_name("tiny_train.py"))
    monkeypatch.setattr(submitit_train, "REPO_ROOT", root)
    monkeypatch.setenv("TINY_TRAIN_PAUSE", str(started))
    job = submitit_train.submit(
        [
            "--cluster",
            "local",
            "--dataset",
            "avdigits",
            "--epochs",
            "2",
            "--limit_samples",
            "16",
            "--batch_size",
            "8",
            "--num_workers",
            "0",
            "--device",
            "cpu",
            "--no-eval_test",
            "--output_dir",
            str(tmp_path),
            "--run_name",
            "long",
        ]
    )
    run = tmp_path / "long"
    deadline = time.time() + 120
    while not started.is_file() and time.time() < deadline:
        time.sleep(0.1)
    assert (run / "last.pt").is_file()  # the first epoch's
    os.kill(
        _parent_of_process_with("--run_name", "long", str(tmp_path)), signal.SIGUSR2
    )  # SLURM's preemption signal, to the job's task
    job.wait()
    log = (tmp_path / "long.submitit" / "train.log").read_text()
    assert f"resuming from {run / 'last.pt'}" in log and "--resume" in log
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the requeue came before the end: the job's second command resumes, after the requeue line
    # (train.py's own stop line, before it, names --resume too)
    commands = [line for line in log.splitlines() if line.startswith("$ ")]
    assert "--resume" not in commands[0] and "--resume" in commands[-1], log
    assert log.index("# preempted or timed out") < log.index(commands[-1]), log
    assert sorted(set(epochs)) == [0, 1] and job.result() == 0, log
