"""Every script in examples/ runs, on its small built-in data, as a user would start it: the
single-process ones in this process (runpy, as `python examples/X.py` runs it, without a new
interpreter to start), the DDP one under torchrun."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
RUNS = {
    "own_model.py": ["--steps", "5"],
    "three_modalities.py": ["--steps", "5", "--ratio_ref", "min_others"],
    "accumulation_amp.py": ["--steps", "3", "--micro_batches", "3"],
}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "code"), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_every_example_is_run_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted([*RUNS, "ddp.py"])


@pytest.mark.parametrize("script", sorted(RUNS))
def test_example_runs(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / script), *RUNS[script]])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")  # an error or sys.exit fails the test
    assert "coeff" in capsys.readouterr().out  # OGM ran and reported its coefficients


def test_ddp_example_keeps_the_replicas_identical():
    done = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(EXAMPLES / "ddp.py"),
            "--steps",
            "4",
        ]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "replicas identical: True" in done.stdout
