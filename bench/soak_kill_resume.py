"""Soak test: kill -9 a training run at random moments, resume it each time, compare the result.

An uninterrupted run and an interrupted one are trained with the same settings (CPU,
--deterministic, one thread). The interrupted one is killed with SIGKILL after a random
delay, then continued with --resume (or started again when no epoch had finished yet), again
and again, until it completes. At the end it must hold exactly the uninterrupted run's
weights, optimizer state, per-epoch metrics and test metrics, and no temporary file.

    python bench/soak_kill_resume.py --kills 20 --epochs 4
    python bench/soak_kill_resume.py --kills 50 --modulation OGM_OPM --keep runs/soak

Kill delays are drawn uniformly from [--min_delay, --max_delay] seconds after each start,
so kills land during start-up, training steps, evaluation and checkpoint writes alike; the
report counts how many interrupted a checkpoint write (a temporary file was left behind).
Exit status 0 when the runs match, 1 otherwise. Not run by the test suite (minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20, help="how many times the run is killed")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--limit_samples", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--modulation", default="OGM_GE")
    p.add_argument("--min_delay", type=float, default=0.5)
    p.add_argument("--max_delay", type=float, default=12.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    p.add_argument("--keep", default=None, help="keep both runs in this directory (default: a temporary one, removed)")
    return p.parse_args(argv)


def train_cmd(args, out: Path) -> list[str]:
    return [
        sys.executable,
        str(REPO / "code" / "train.py"),
        "--device",
        "cpu",
        "--deterministic",
        "--limit_samples",
        str(args.limit_samples),
        "--batch_size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--modulation",
        args.modulation,
        "--log_every",
        "1",
        "--output_dir",
        str(out),
        "--run_name",
        "run",
    ]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # code/train.py finds onthefly beside itself


def interrupted_run(args, out: Path, rng: random.Random) -> dict:
    run = out / "run"
    kills = mid_write = restarts = 0
    while True:
        cmd = ["--resume", str(run / "last.pt")] if (run / "last.pt").exists() else None
        full = [sys.executable, str(REPO / "code" / "train.py"), *cmd] if cmd else train_cmd(args, out)
        if not cmd and kills:
            restarts += 1  # killed before the first checkpoint: start again
        log = out.parent / "interrupted.log"  # a file, not a pipe: a full pipe would stall the run
        with open(log, "wb") as f:
            proc = subprocess.Popen(full, env=env(), stdout=subprocess.DEVNULL, stderr=f)
        if kills < args.kills:
            try:
                proc.wait(timeout=rng.uniform(args.min_delay, args.max_delay))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                left = list(run.glob(".*.pt.*.tmp")) if run.exists() else []
                mid_write += bool(left)
                epoch = "none"
                if (run / "last.pt").exists():
                    epoch = torch.load(run / "last.pt", map_location="cpu", weights_only=False)["epoch"]
                print(
                    f"kill {kills:3d}: last.pt epoch {epoch}{'  (during a checkpoint write)' if left else ''}",
                    flush=True,
                )
                continue
        else:
            proc.wait()
        err = log.read_text(errors="replace")
        if proc.returncode != 0:
            raise SystemExit(f"the interrupted run failed (exit {proc.returncode}):\n{err[-3000:]}")
        return {"kills": kills, "during_checkpoint_write": mid_write, "restarts_from_scratch": restarts}


def compare(a: Path, b: Path) -> list[str]:
    problems = []
    for name in ("last.pt", "best.pt"):
        x, y = (torch.load(d / name, map_location="cpu", weights_only=False) for d in (a, b))
        if x["epoch"] != y["epoch"]:
            problems.append(f"{name}: epoch {x['epoch']} != {y['epoch']}")
        problems += [f"{name}: {k} differs" for k in x["model"] if not torch.equal(x["model"][k], y["model"][k])]
        for i, (s, t) in enumerate(zip(x["optimizer"]["state"].values(), y["optimizer"]["state"].values())):
            problems += [f"{name}: optimizer state {i}.{k} differs" for k in s if not torch.equal(s[k], t[k])]

    def records(d: Path):
        return [
            {k: v for k, v in json.loads(line).items() if k != "time_s"}
            for line in (d / "metrics.jsonl").read_text().splitlines()
        ]

    if records(a) != records(b):
        problems.append("metrics.jsonl differs")
    if json.loads((a / "test_metrics.json").read_text()) != json.loads((b / "test_metrics.json").read_text()):
        problems.append("test_metrics.json differs")
    problems += [f"temporary file left: {p.name}" for p in b.glob(".*.tmp")]
    return problems


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="soak_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        started = time.time()
        reference = root / "uninterrupted"
        shutil.rmtree(reference, ignore_errors=True)
        done = subprocess.run(train_cmd(args, reference), env=env(), capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the uninterrupted run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        print(f"uninterrupted run: {time.time() - started:.0f}s", flush=True)
        interrupted = root / "interrupted"
        shutil.rmtree(interrupted, ignore_errors=True)
        stats = interrupted_run(args, interrupted, random.Random(args.seed))
        problems = compare(reference / "run", interrupted / "run")
        print(json.dumps({**stats, "seconds": round(time.time() - started), "problems": problems}, indent=2))
        print("OK: identical to the uninterrupted run" if not problems else "MISMATCH")
        return 0 if not problems else 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
