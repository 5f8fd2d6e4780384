"""Nothing is lost under kills, bad numbers, bad files or an unusable output directory.

  * kill -9 mid-epoch and in the middle of a checkpoint write (tiny encoders), then --resume: the run ends
    with exactly the weights, metrics and test results of an uninterrupted run, and the
    half-written file is never loaded;
  * truncated or foreign checkpoints, and --resume with settings that would break the run,
    are refused in one line (exit 2) naming the file or the settings;
  * a NaN or Inf loss or gradient stops the run naming the step and the checkpoint to resume
    from, or with --nonfinite skip skips that batch; zero scores give finite coefficients;
  * an unwritable or full run directory is reported before any data or model is built;
  * a truncated AV-Digits cache is rebuilt.
(Option validation: tests/test_config_validation.py. A longer random kill/resume soak:
bench/soak_kill_resume.py.)
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from onthefly import checkpoint as ckpt_io
from onthefly import engine, infer, rundir, runner
from onthefly.data import avdigits
from onthefly.modulation import Modulator, discrepancy_ratios, ogm_coefficients, opm_drop_probabilities

CONFTEST = Path(__file__).with_name("conftest.py")
# Runs in this process take the tiny_encoders fixture, unless ResNet18 itself is what matters: the
# size of its checkpoints (the free-space check) or its non-negative features (the head overflow).
TINY = ["--limit_samples", "8", "--batch_size", "4", "--device", "cpu", "--deterministic", "--run_name", "run"]
# 3 epochs of 2 steps; OGM-GE draws noise every step, so exact resumption needs the RNG state.
KILL_ARGS = [*TINY, "--epochs", "3", "--modulation", "OGM_GE", "--modulation_starts", "1", "--log_every", "1"]
# One epoch of OGM that skips a batch with non-finite values instead of stopping.
SKIP_ARGS = [*TINY, "--epochs", "1", "--modulation", "OGM", "--nonfinite", "skip", "--no-eval_test"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    """Single-threaded, as the subprocesses are: bit-identical results, and kinder to a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# train.py's main in a process of its own, on conftest's tiny encoders: checkpointing and
# resumption are under test, and ResNet18's ~170 MiB checkpoints would make every write slow.
# The process can SIGKILL itself at an exact moment (a tiny model's step or write is too short
# to hit from outside): "at_step_N" as training step N (0-based) begins, "in_write" halfway
# through writing its first checkpoint; "SIGTERM_at_step_N" sends SIGTERM instead (SIGHUP too).
# (Kills at random moments: bench/soak_kill_resume.py.)
CHILD = """
import io, itertools, os, runpy, signal, sys
import torch
from onthefly import engine, runner
conftest, die, *argv = sys.argv[1:]
def die_now():
    os.kill(os.getpid(), signal.SIGKILL)
if die == "in_write":
    real_save = torch.save
    def save_half_then_die(obj, f):
        data = io.BytesIO()
        real_save(obj, data)
        f.write(data.getbuffer()[: data.tell() // 2])
        f.flush()
        die_now()
    torch.save = save_half_then_die
elif "at_step_" in die:  # at_step_N: SIGKILL; SIGTERM_at_step_N, SIGHUP_at_step_N: that signal
    name, at = die.split("at_step_")
    real_loss, steps, at = engine.compute_loss, itertools.count(), int(at)
    def loss_or_die(*args):
        if next(steps) == at:
            os.kill(os.getpid(), getattr(signal, name.rstrip("_"))) if name else die_now()
        return real_loss(*args)
    engine.compute_loss = loss_or_die
with runpy.run_path(conftest)["swap_in_tiny_encoders"]():
    sys.exit(runner.main(argv))
"""


def train(*args: str, die: str = "never") -> subprocess.CompletedProcess:
    """Training (CHILD) in a subprocess; its exit status and output (stdout and stderr)."""
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(CONFTEST), die, *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


def temporaries(run: Path) -> list[Path]:
    """Temporary files of checkpoint writes in progress (or cut short)."""
    return sorted(run.glob(".*.pt.*.tmp"))


def metrics(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_encoders_within) -> Path:
    """An uninterrupted run, in this process: one thread and tiny encoders, as the subprocesses."""
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tiny_encoders_within():
            assert runner.main([*KILL_ARGS, "--output_dir", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out / "run"


def test_kill_mid_epoch_and_mid_checkpoint_then_resume_is_exact(reference, tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "last.pt"

    # 1. Killed in the middle of epoch 1 (after one of its two steps).
    job = train(*KILL_ARGS, "--output_dir", str(tmp_path), die="at_step_3")
    assert job.returncode == -signal.SIGKILL and "epoch   0" in job.stdout and "epoch   1" not in job.stdout, job.stdout
    assert ckpt_io.load_checkpoint(last)["epoch"] == 1  # epoch 0's checkpoint, whole

    # 2. Resumed, then killed halfway through writing the checkpoint of epoch 1.
    job = train("--resume", str(last), die="in_write")
    assert job.returncode == -signal.SIGKILL, job.stdout
    (left,) = temporaries(run_dir)
    with pytest.raises(Exception, match="unreadable"):  # the half-written file is garbage ...
        ckpt_io.load_checkpoint(left)
    assert ckpt_io.load_checkpoint(last)["epoch"] == 1  # ... and last.pt is whole

    # 3. Resumed to the end: the temporary file is ignored, then removed.
    job = train("--resume", str(run_dir))
    assert job.returncode == 0, job.stdout
    assert not temporaries(run_dir)

    for name in ("last.pt", "best.pt"):
        want, got = (torch.load(d / name, weights_only=False) for d in (reference, run_dir))
        assert got["epoch"] == want["epoch"] == (3 if name == "last.pt" else want["epoch"])
        for key in want["model"]:
            assert torch.equal(got["model"][key], want["model"][key]), (name, key)
        for a, b in zip(got["optimizer"]["state"].values(), want["optimizer"]["state"].values()):
            assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert metrics(run_dir) == metrics(reference)  # each epoch logged once, redone epochs included
    assert json.loads((run_dir / "test_metrics.json").read_text()) == json.loads(
        (reference / "test_metrics.json").read_text()
    )


def one_line_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign dict", "foreign object", "not torch"])
def test_a_damaged_or_foreign_checkpoint_is_refused_naming_it(reference, tmp_path, capsys, damage):
    bad = tmp_path / "last.pt"
    if damage == "truncated":
        data = (reference / "last.pt").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "foreign dict":
        torch.save({"state_dict": {}, "epoch": 3}, bad)
    elif damage == "foreign object":
        torch.save([1, 2, 3], bad)
    else:
        bad.write_text("epoch: 3\n")
    one_line_error(capsys, runner.main(["--resume", str(bad)]), str(bad))


def test_resume_refuses_settings_that_would_break_the_run(reference, capsys):
    last = str(reference / "last.pt")
    err = one_line_error(capsys, runner.main(["--resume", last, "--fusion", "sum", "--modulation", "OPM"]), last)
    assert "fusion: 'concat' -> 'sum'" in err and "modulation: 'OGM_GE' -> 'OPM'" in err
    err = one_line_error(capsys, runner.main(["--resume", last, "--image_noise", "0.1"]), last)
    assert "image_noise" in err
    err = one_line_error(capsys, runner.main(["--resume", last, "--encoder_width", "16"]), last)
    assert "encoder_width: 64 -> 16" in err  # the checkpoint's weights have ResNet18's shapes
    # the samples and batches that chose best.pt on validation: data-defining, as the README says
    err = one_line_error(capsys, runner.main(["--resume", last, "--limit_samples", "16", "--batch_size", "8"]), last)
    assert "limit_samples: 8 -> 16" in err and "batch_size: 4 -> 8" in err
    # a setting valid alone but not with the run's own: --modulation_starts 1 was saved
    one_line_error(capsys, runner.main(["--resume", last, "--modulation_ends", "0"]), "--modulation_starts (1)")


class Injection:
    """Counts training steps through compute_loss; poisons the loss or a gradient at one step."""

    def __init__(self, monkeypatch, at_step: int, what: str):
        self.calls, self.at_step, self.what = 0, at_step, what
        compute_loss, modulate = engine.compute_loss, Modulator.modulate_gradients

        def poisoned_loss(out, labels, head):
            loss = compute_loss(out, labels, head)
            self.calls += 1
            return loss * float("nan") if self.calls - 1 == self.at_step and self.what == "nan loss" else loss

        def poisoned_gradient(modulator, out, labels, epoch):
            modulate(modulator, out, labels, epoch)
            if self.calls - 1 == self.at_step and self.what == "inf gradient":
                next(p for group in modulator.groups for p in group).grad[0].fill_(float("inf"))

        monkeypatch.setattr(engine, "compute_loss", poisoned_loss)
        monkeypatch.setattr(Modulator, "modulate_gradients", poisoned_gradient)


def test_nan_loss_stops_naming_the_step_and_the_checkpoint(tiny_encoders, tmp_path, capsys, monkeypatch):
    Injection(monkeypatch, at_step=3, what="nan loss")  # epoch 1, its second step
    rc = runner.main(
        [
            *TINY,
            "--epochs",
            "3",
            "--modulation",
            "OGM",
            "--log_every",
            "20",
            "--no-eval_test",
            "--output_dir",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    last = tmp_path / "run" / "last.pt"
    assert rc == 3
    where = "non-finite loss or gradient at epoch 1, step 1 of the epoch (global step 3; epochs and steps count from 0)"
    assert where in err
    assert f"--resume {last}" in err
    ckpt = ckpt_io.load_checkpoint(last)
    assert ckpt["epoch"] == 1 and all(v.isfinite().all() for v in ckpt["model"].values())  # nothing bad saved
    assert [r["epoch"] for r in metrics(tmp_path / "run")] == [0]

    monkeypatch.undo()  # the cause is gone: the run continues from the named checkpoint
    assert runner.main(["--resume", str(last)]) == 0
    assert [r["epoch"] for r in metrics(tmp_path / "run")] == [0, 1, 2]


def test_nan_before_the_first_checkpoint_says_there_is_none(tiny_encoders, tmp_path, capsys, monkeypatch):
    Injection(monkeypatch, at_step=0, what="inf gradient")
    rc = runner.main([*TINY, "--epochs", "1", "--no-eval_test", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 3 and "epoch 0, step 0" in err and "no checkpoint" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_nonfinite_skip_drops_only_the_bad_batch(tiny_encoders, tmp_path, capsys, monkeypatch):
    Injection(monkeypatch, at_step=1, what="inf gradient")
    rc = runner.main([*SKIP_ARGS, "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 0 and "skipped a batch with a non-finite loss or gradient (epoch 0, step 1)" in err
    (record,) = metrics(tmp_path / "run")
    assert record["train_skipped"] == 1 and math.isfinite(record["train_loss"])
    ckpt = ckpt_io.load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["global_step"] == 2 and all(v.isfinite().all() for v in ckpt["model"].values())


def test_zero_scores_give_finite_coefficients():
    for scores in ([0.0, 0.0], [0.0, 3.0], [3.0, 0.0], [1e-30, 5.0]):
        ratios = discrepancy_ratios(torch.tensor(scores))
        for values in (
            ratios,
            ogm_coefficients(ratios, 0.5),
            ogm_coefficients(ratios, 0.5, "continuous"),
            opm_drop_probabilities(ratios, 0.5, 0.5),
        ):
            assert values.isfinite().all(), (scores, values)
    # through the Modulator: logits that give the true classes probability exactly 0
    encoders = (torch.nn.Conv2d(1, 1, 1), torch.nn.Conv2d(1, 1, 1))
    for enc in encoders:
        enc.weight.grad = torch.ones_like(enc.weight)
    model = argparse.Namespace(
        encoder_parameters=lambda: tuple(list(e.parameters()) for e in encoders),
        modality_names=("audio", "visual"),
        forward=lambda inputs, feature_hook=None: None,
    )
    cfg = argparse.Namespace(modulation="OGM_OPM", alpha=0.5)
    modulator = Modulator.from_config(cfg, model)
    labels = torch.tensor([0, 1])
    hopeless = torch.tensor([[-1e4, 0.0], [0.0, -1e4]])  # softmax gives the true class exactly 0
    confident = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    for logits in ((hopeless, hopeless), (hopeless, confident), (confident, hopeless)):
        out = {"unimodal_logits": logits, "features": (torch.ones(2, 3), torch.ones(2, 3))}
        features, weight = modulator.feature_hook(labels, epoch=0)(out)  # OPM, in the forward pass
        modulator.modulate_gradients(out, labels, epoch=0)  # OGM, after backward
        assert 0.0 in modulator.stats["score"].tolist()
        for key in ("score", "ratio", "coeff", "drop_prob"):
            assert modulator.stats[key].isfinite().all(), key
        assert all(f.isfinite().all() for f in features) and weight.isfinite().all()
        assert all(enc.weight.grad.isfinite().all() for enc in encoders)


def _no_building(*args, **kwargs):
    raise AssertionError("data or model built before the run directory was checked")


@pytest.mark.parametrize("where", ["under a regular file", "a regular file"])
def test_an_unwritable_run_directory_is_reported_before_any_building(tmp_path, capsys, monkeypatch, where):
    monkeypatch.setattr(runner, "build_model", _no_building)
    monkeypatch.setattr(runner, "train_loader", _no_building)
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = blocker / "sub" if where == "under a regular file" else blocker
    rc = runner.main([*TINY, "--epochs", "1", "--output_dir", str(out)])
    one_line_error(capsys, rc, str(out))


def test_a_full_disk_is_reported_before_training(tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runner, "build_model", _no_building)
    monkeypatch.setattr(os, "fsync", full)  # the 1 MiB write probe cannot be flushed
    rc = runner.main([*TINY, "--epochs", "1", "--output_dir", str(tmp_path)])
    monkeypatch.undo()
    one_line_error(capsys, rc, "cannot write to the run directory", "No space left on device")


def test_too_little_space_for_the_checkpoints_is_reported_before_training(tmp_path, capsys, monkeypatch):
    real = rundir.shutil.disk_usage
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: real(path)._replace(free=50 << 20))
    monkeypatch.setattr(runner, "train_one_epoch", _no_building)
    rc = runner.main([*TINY, "--epochs", "1", "--output_dir", str(tmp_path)])
    one_line_error(capsys, rc, "50 MiB free", "the checkpoints need about")


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt_io.atomic_torch_save({"v": 1}, path)

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_io.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.atomic_torch_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["v"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_torn_metrics_log_is_trimmed_to_the_checkpointed_epochs(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"epoch": 0, "val_acc": 0.1}\n{"epoch": 1, "val_acc": 0.2}\n{"epoch": 2, "val_a')
    assert ckpt_io.trim_metrics_log(log, epochs_done=2) == 1
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [0, 1]
    assert ckpt_io.trim_metrics_log(log, epochs_done=1) == 1
    assert ckpt_io.trim_metrics_log(tmp_path / "none.jsonl", epochs_done=1) == 0


def test_a_truncated_avdigits_cache_is_rebuilt(tiny_encoders, tmp_path, capsys):
    cfg = argparse.Namespace(data=str(tmp_path))
    path = avdigits.cache_path(cfg)
    good = avdigits.load_arrays(cfg)  # builds the cache in tmp_path
    capsys.readouterr()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    rebuilt = avdigits.load_arrays(cfg)
    out = capsys.readouterr().out
    assert "rebuilding unreadable AV-Digits cache" in out and str(path) in out
    for key in good:
        assert np.array_equal(good[key], rebuilt[key]), key
    with np.load(path) as f:  # and the file is whole again
        assert sorted(f.files) == sorted(good)


# --------------------------------------------------------------------------- run folders (issue: data lost)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _earlier_run(folder: Path) -> None:
    """What an earlier run left without a last.pt, plus a file of the user's own."""
    (folder / "tb").mkdir(parents=True)
    (folder / "tb" / "events.out").write_bytes(b"events")
    for name in ("best.pt", "metrics.jsonl", "test_metrics.json", "config.json", "notes.tmp", ".mine.tmp"):
        (folder / name).write_text(f"earlier {name}")


def test_a_new_run_never_deletes_an_earlier_runs_files(tiny_encoders, tmp_path, capsys):
    run = tmp_path / "run"
    _earlier_run(run)
    before = _snapshot(run)
    rc = runner.main([*TINY, "--epochs", "1", "--output_dir", str(tmp_path)])
    one_line_error(capsys, rc, str(run), "best.pt", "--overwrite")
    assert _snapshot(run) == before


def test_overwrite_replaces_only_what_a_run_writes(tiny_encoders, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _earlier_run(run)
    monkeypatch.setattr(runner, "train_one_epoch", _no_building)  # stop right after the folder is prepared
    with pytest.raises(AssertionError, match="before the run directory"):
        runner.main([*TINY, "--epochs", "1", "--overwrite", "--output_dir", str(tmp_path)])
    left = _snapshot(run)
    assert left["notes.tmp"] == b"earlier notes.tmp" and left[".mine.tmp"] == b"earlier .mine.tmp"
    assert "best.pt" not in left and "metrics.jsonl" not in left and not (run / "tb" / "events.out").exists()
    assert not (run / ".lock").exists()  # released when the run ended, even by an exception


def test_a_run_folder_in_use_is_refused(tiny_encoders, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "w") as held:  # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"{os.getpid()} {socket.gethostname()}\n")
        held.flush()
        rc = runner.main([*TINY, "--epochs", "1", "--output_dir", str(tmp_path)])
        one_line_error(capsys, rc, f"{run} is in use by process {os.getpid()}")
        assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_a_stale_lock_of_a_killed_run_is_taken_over(tiny_encoders, tmp_path, capsys, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(f"{dead.pid} {socket.gethostname()}\n")  # left by a SIGKILL: no flock held
    monkeypatch.setattr(runner, "train_one_epoch", _no_building)
    with pytest.raises(AssertionError):
        runner.main([*TINY, "--epochs", "1", "--output_dir", str(tmp_path)])
    assert f"taking over the lock of process {dead.pid}, which is no longer running" in capsys.readouterr().out
    assert not (run / ".lock").exists()


def test_resume_only_from_a_runs_own_last_pt(reference, tmp_path, capsys):
    before = _snapshot(reference)
    err = one_line_error(
        capsys, runner.main(["--resume", str(reference / "best.pt")]), "resume only from a run's last.pt"
    )
    assert str(reference / "best.pt") in err
    # last.pt copied into another run's folder: that folder is not touched
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"run_id": "someone else", "run_name": "run"}))
    (other / "metrics.jsonl").write_text('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}\n')
    (other / ".last.pt.unrelated.tmp").write_text("keep")
    (other / "last.pt").write_bytes((reference / "last.pt").read_bytes())
    kept = _snapshot(other)
    one_line_error(capsys, runner.main(["--resume", str(other / "last.pt")]), "is not this checkpoint's own run folder")
    (other / "config.json").unlink()
    kept.pop("config.json")
    one_line_error(capsys, runner.main(["--resume", str(other)]), "is not this checkpoint's own run folder")
    assert _snapshot(other) == kept
    # a folder other than its own, or --overwrite, with --resume
    last = str(reference / "last.pt")
    one_line_error(capsys, runner.main(["--resume", last, "--run_name", "elsewhere"]), "continues in its own folder")
    one_line_error(
        capsys, runner.main(["--resume", last, "--output_dir", str(tmp_path)]), "continues in its own folder"
    )
    one_line_error(capsys, runner.main(["--resume", last, "--overwrite"]), "--overwrite with --resume")
    one_line_error(capsys, runner.main(["--resume", last, "--optimizer", "adamw"]), "optimizer: 'sgd' -> 'adamw'")
    one_line_error(capsys, runner.main(["--resume", last, "--epochs", "2"]), "has already completed 3 epochs")
    assert _snapshot(reference) == before


def test_options_given_with_resume_are_applied(tiny_encoders, tmp_path, monkeypatch):
    """A finished 1-epoch cosine run (its lr is 0 at the end) continued to 3 epochs with other
    optimiser values: each new epoch trains with the rebuilt schedule's rate, never 0."""
    assert (
        runner.main(
            [
                *TINY,
                "--epochs",
                "1",
                "--scheduler",
                "cosine",
                "--lr",
                "0.01",
                "--no-eval_test",
                "--output_dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    seen = []
    real = runner.train_one_epoch

    def recording(model, modulator, optimizer, *args, **kwargs):
        seen.append({k: optimizer.param_groups[0][k] for k in ("lr", "momentum", "weight_decay")})
        return real(model, modulator, optimizer, *args, **kwargs)

    monkeypatch.setattr(runner, "train_one_epoch", recording)
    last = tmp_path / "run" / "last.pt"
    assert (
        runner.main(
            [
                "--resume",
                str(last),
                "--epochs",
                "3",
                "--lr",
                "0.05",
                "--momentum",
                "0.5",
                "--weight_decay",
                "0.001",
                "--no-eval_test",
            ]
        )
        == 0
    )
    cosine = [0.05 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in (1, 2)]
    assert [s["lr"] for s in seen] == pytest.approx(cosine, rel=1e-12)
    assert all(s["momentum"] == 0.5 and s["weight_decay"] == 0.001 for s in seen)
    assert [r["epoch"] for r in metrics(tmp_path / "run")] == [0, 1, 2]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["lr"], saved["epochs"], saved["momentum"]) == (0.05, 3, 0.5)


# --------------------------------------------------------------------------- stops and interruptions


@pytest.mark.parametrize(
    "overflow,message",
    [
        ("inf weight", "the weights became non-finite during epoch 0"),
        ("huge head", "the model's outputs became non-finite after epoch 0"),  # finite weights, inf logits
    ],
)
def test_weights_that_overflow_on_an_epochs_last_step_stop_the_run(tmp_path, capsys, monkeypatch, overflow, message):
    real = runner.build_optimizer

    def overflowing(cfg, model):  # the last step of epoch 0 writes inf into a weight, from finite gradients
        optimizer = real(cfg, model)
        calls = []

        def overflow_after_the_second_step(opt, args, kwargs):
            calls.append(1)
            if len(calls) == 2 and overflow == "inf weight":
                next(model.parameters()).data[0].fill_(float("inf"))
            if len(calls) == 2 and overflow == "huge head":
                next(model.head.parameters()).data.fill_(3e37)  # finite; their sums are not

        optimizer.register_step_post_hook(overflow_after_the_second_step)
        return optimizer

    monkeypatch.setattr(runner, "build_optimizer", overflowing)
    rc = runner.main([*TINY, "--epochs", "1", "--no-eval_test", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()  # tqdm's bar, then the one line of the stop
    assert rc == 3 and "Traceback" not in err, err
    assert message in err.splitlines()[-1] and "no checkpoint to resume from" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_an_epoch_whose_every_batch_was_skipped_stops_the_run(tiny_encoders, tmp_path, capsys, monkeypatch):
    modulate = Modulator.modulate_gradients

    def always_inf(modulator, out, labels, epoch):
        modulate(modulator, out, labels, epoch)
        next(p for group in modulator.groups for p in group).grad[0].fill_(float("inf"))

    monkeypatch.setattr(Modulator, "modulate_gradients", always_inf)
    rc = runner.main([*SKIP_ARGS, "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and "every batch of epoch 0 had a non-finite loss or gradient and was skipped" in err[-1], err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_ctrl_c_says_where_it_stopped_and_how_to_resume(tiny_encoders, tmp_path, capsys, monkeypatch):
    real, epochs = runner.train_one_epoch, []

    def interrupted_in_epoch_1(*args, **kwargs):
        epochs.append(1)
        if len(epochs) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "train_one_epoch", interrupted_in_epoch_1)
    rc = runner.main([*TINY, "--epochs", "2", "--no-eval_test", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    last = tmp_path / "run" / "last.pt"
    assert rc == 130 and "Traceback" not in err, err
    assert (
        err.splitlines()[-1]
        == f"train.py: interrupted during epoch 1; resume with: python code/train.py --resume {last}"
    )
    monkeypatch.undo()
    assert runner.main(["--resume", str(last)]) == 0  # the folder was unlocked
    assert [r["epoch"] for r in metrics(tmp_path / "run")] == [0, 1]


# --------------------------------------------------------------------------- inference on the run's own split


def test_inference_refuses_a_dataset_split_differently(tiny_encoders, reference, tmp_path, capsys, monkeypatch):
    real = avdigits.load_arrays

    def resplit(cfg):  # the same samples, assigned to the splits differently
        arrays = dict(real(cfg))
        arrays["split"] = np.roll(arrays["split"], 1)
        return arrays

    monkeypatch.setattr(avdigits, "load_arrays", resplit)
    out = tmp_path / "eval"
    rc = infer.main(["--checkpoint", str(reference / "best.pt"), "--device", "cpu", "--out", str(out)])
    one_line_error(capsys, rc, "--split test: the data at --data is split differently", str(reference / "best.pt"))
    assert not out.exists()
    monkeypatch.undo()
    assert infer.main(["--checkpoint", str(reference / "best.pt"), "--device", "cpu", "--out", str(out)]) == 0


# --------------------------------------------------------------------------- resume with a config file, extending a run


def test_resume_applies_the_values_of_a_config_file(tiny_encoders, tmp_path, capsys):
    assert runner.main([*TINY, "--epochs", "1", "--no-eval_test", "--output_dir", str(tmp_path)]) == 0
    last = tmp_path / "run" / "last.pt"
    longer = tmp_path / "longer.yaml"
    longer.write_text("epochs: 2\nlr: 0.05\n")
    assert runner.main(["--resume", str(last), "--config", str(longer), "--no-eval_test"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["epochs"], saved["lr"], saved["config"]) == (2, 0.05, str(longer))
    assert [r["epoch"] for r in metrics(tmp_path / "run")] == [0, 1]
    # a file's resume: key resumes, and its other values apply as well
    resume = tmp_path / "resume.yaml"
    resume.write_text(f"resume: {last}\nepochs: 3\neval_test: false\n")
    assert runner.main(["--config", str(resume)]) == 0
    assert [r["epoch"] for r in metrics(tmp_path / "run")] == [0, 1, 2]
    # and a data-defining value in a file is refused as on the command line
    capsys.readouterr()
    other = tmp_path / "other.yaml"
    other.write_text("batch_size: 8\n")
    one_line_error(capsys, runner.main(["--resume", str(last), "--config", str(other)]), "batch_size: 4 -> 8")


def test_print_config_with_resume_prints_the_settings_the_run_would_resume_with(reference, capsys):
    assert runner.main(["--resume", str(reference / "last.pt"), "--epochs", "5", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["modulation"], printed["limit_samples"], printed["batch_size"]) == ("OGM_GE", 8, 4)
    assert printed["epochs"] == 5 and printed["modulation_starts"] == 1


def test_extending_a_finished_run_drops_its_test_metrics_until_it_is_tested_again(tiny_encoders, tmp_path, monkeypatch):
    assert runner.main([*TINY, "--epochs", "1", "--output_dir", str(tmp_path)]) == 0
    run = tmp_path / "run"
    assert json.loads((run / "test_metrics.json").read_text())["best_epoch"] == 0
    real, epochs = runner.train_one_epoch, []

    def interrupted_in_epoch_2(*args, **kwargs):
        epochs.append(1)
        if len(epochs) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "train_one_epoch", interrupted_in_epoch_2)
    assert runner.main(["--resume", str(run / "last.pt"), "--epochs", "3"]) == 130
    assert not (run / "test_metrics.json").exists()  # it scored a best.pt that epochs 1-2 may replace
    monkeypatch.undo()
    assert runner.main(["--resume", str(run / "last.pt"), "--epochs", "3"]) == 0
    best = ckpt_io.load_checkpoint(run / "best.pt")
    assert json.loads((run / "test_metrics.json").read_text())["best_epoch"] == best["epoch"] - 1


# --------------------------------------------------------------------------- a full disk, signals, a read-only --data


def test_a_full_disk_at_a_checkpoint_write_is_one_line_and_the_run_resumes(
    tiny_encoders, tmp_path, capsys, monkeypatch
):
    real, writes = ckpt_io.atomic_torch_save, []

    def full_on_the_third_write(obj, path):  # epoch 0: best.pt, last.pt; epoch 1: best.pt or last.pt fails
        writes.append(path)
        if len(writes) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(obj, path)

    monkeypatch.setattr(ckpt_io, "atomic_torch_save", full_on_the_third_write)
    rc = runner.main([*TINY, "--epochs", "3", "--no-eval_test", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    last = tmp_path / "run" / "last.pt"
    assert rc == 1 and "Traceback" not in err, err
    assert "No space left on device" in err.splitlines()[-1] and f"--resume {last}" in err.splitlines()[-1], err
    assert ckpt_io.load_checkpoint(last)["epoch"] == 1
    monkeypatch.undo()
    assert runner.main(["--resume", str(last)]) == 0
    assert [r["epoch"] for r in metrics(tmp_path / "run")] == [0, 1, 2]  # epoch 1's line before the failure: redone


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_with_one_line_and_the_run_resumes_exactly(reference, tmp_path, name):
    run = tmp_path / "run"
    stopped = train(*KILL_ARGS, "--output_dir", str(tmp_path), die=f"{name}_at_step_3")  # epoch 1, its second step
    lines = stopped.stdout.strip().splitlines()
    assert stopped.returncode == 128 + getattr(signal, name), stopped.stdout
    resume = f"resume with: python code/train.py --resume {run / 'last.pt'}"
    assert lines[-1] == f"train.py: stopped by {name} during epoch 1; {resume}"
    assert "Traceback" not in stopped.stdout
    if name == "SIGTERM":  # the folder is as after epoch 0 either way: one exact resume suffices
        resumed = train("--resume", str(run / "last.pt"))
        assert resumed.returncode == 0, resumed.stdout
        assert metrics(run) == metrics(reference)


def test_an_avdigits_cache_that_cannot_be_written_is_one_line(tiny_encoders, tmp_path, capsys, monkeypatch):
    def read_only(path, write, binary=True):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(avdigits, "atomic_write", read_only)
    data = tmp_path / "data"
    data.mkdir()
    rc = runner.main([*TINY, "--epochs", "1", "--data", str(data), "--output_dir", str(tmp_path / "out")])
    one_line_error(capsys, rc, "--data: cannot write the AV-Digits cache", "Read-only file system")


def test_a_checkpoint_older_than_an_option_resumes_with_its_default_named(tiny_encoders, tmp_path, capsys):
    """A run saved before an option existed lacks it in its config: the resume takes the current
    default and says so, instead of failing on the missing setting."""
    assert runner.main([*TINY, "--epochs", "1", "--no-eval_test", "--output_dir", str(tmp_path)]) == 0
    last = tmp_path / "run" / "last.pt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    del ckpt["config"]["opm_ends"], ckpt["config"]["drop_last"]
    torch.save(ckpt, last)
    capsys.readouterr()
    assert runner.main(["--resume", str(last), "--epochs", "2", "--no-eval_test"]) == 0
    err = capsys.readouterr().err
    assert "predates" in err and "drop_last" in err and "opm_ends" in err, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["opm_ends"] == -1 and "drop_last" in saved


def test_pmr_prototypes_travel_in_the_checkpoint(tiny_encoders, tmp_path, monkeypatch):
    """PMR with momentum blends each epoch's prototypes with the previous ones (from epoch 2):
    a run interrupted after epoch 1 and resumed trains exactly as an uninterrupted one."""
    args = [*TINY, "--epochs", "3", "--modulation", "PMR", "--pmr_momentum", "0.5", "--no-eval_test"]
    assert runner.main([*args, "--output_dir", str(tmp_path / "whole")]) == 0
    real, calls = runner.train_one_epoch, []

    def interrupted_in_epoch_2(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(runner, "train_one_epoch", interrupted_in_epoch_2)
    assert runner.main([*args, "--output_dir", str(tmp_path / "split")]) == 130
    monkeypatch.undo()
    assert runner.main(["--resume", str(tmp_path / "split" / "run" / "last.pt")]) == 0
    assert metrics(tmp_path / "split" / "run") == metrics(tmp_path / "whole" / "run")


def test_labels_outside_the_classes_are_one_line_before_training(tiny_encoders, tmp_path, capsys, monkeypatch):
    """A dataset whose labels leave [0, num_classes) is refused naming the split, before any step."""
    from onthefly.data import avdigits

    real_init = avdigits.AVDigits.__init__

    def with_a_bad_label(self, cfg, split):
        real_init(self, cfg, split)
        if split == "val":
            self.labels = self.labels.clone()
            self.labels[0] = 10

    monkeypatch.setattr(avdigits.AVDigits, "__init__", with_a_bad_label)
    monkeypatch.setattr(runner, "train_one_epoch", _no_building)
    one_line_error(capsys, runner.main([*TINY, "--output_dir", str(tmp_path)]), "val split", "[0, 10)")
