"""Stand-ins for code/train.py and code/probe.py in the protocol's tests: they write the files the
real programs write, with numbers that follow from the options, in a fraction of a second.

  train: `--output_dir D --run_name N <options> [--overwrite] --device X`, or `--resume D/N/last.pt
         --device X`. Two epochs; the validation accuracy is a fixed function of the options, so
         every launcher gives the same selection. FAKE_PREEMPT=<run name>: that run, started
         afresh, writes its first epoch and last.pt, then signals its parent (the submitit job)
         as a preemption would, and waits to be stopped. FAKE_DIVERGE=<run name>: exit 3 after
         the first epoch, as train.py on a non-finite loss.
  probe: `--skip_existing [--limit_samples N] --checkpoint RUN... --device X`: probe.json.
"""

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path


def options_of(argv: list[str]) -> dict:
    """{'lr': '0.01', 'eval_test': True, ...} from train.py's syntax."""
    out, i = {}, 0
    while i < len(argv):
        key = argv[i][2:]
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[key], i = argv[i + 1], i + 2
        else:
            out[key.removeprefix("no-")], i = not key.startswith("no-"), i + 1
    return out


def val_acc(options: dict) -> float:
    """A value in [0.5, 0.9) that depends only on the defining options (never on the folder)."""
    key = json.dumps(
        {k: v for k, v in sorted(options.items()) if k not in ("output_dir", "run_name", "device", "overwrite")}
    )
    return 0.5 + int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 16**8 * 0.4


def epoch(run_dir: Path, options: dict, e: int) -> None:
    record = {"epoch": e, "val_acc": val_acc(options) - 0.1 * (1 - e), "val_acc_audio": 0.7, "val_acc_visual": 0.3}
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    (run_dir / "last.pt").write_text(json.dumps({"epoch": e}))
    (run_dir / "best.pt").write_text(json.dumps({"epoch": e}))


def train(argv: list[str]) -> int:
    args = options_of(argv)
    if "resume" in args:
        run_dir = Path(args["resume"]).parent
        options = json.loads((run_dir / "config.json").read_text())
        start = json.loads((run_dir / "last.pt").read_text())["epoch"] + 1
        print(f"resumed from {args['resume']} at epoch {start}", flush=True)
    else:
        run_dir = Path(args["output_dir"]) / args["run_name"]
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "last.pt", "best.pt", "test_metrics.json"):
            (run_dir / name).unlink(missing_ok=True)
        options = {k: v for k, v in args.items() if k not in ("overwrite", "device")}
        (run_dir / "config.json").write_text(json.dumps(options))
        start = 0
    for e in range(start, 2):
        epoch(run_dir, options, e)
        if e == 0 and os.environ.get("FAKE_DIVERGE") == options["run_name"]:
            print("stopped: non-finite loss", flush=True)
            return 3
        if e == 0 and os.environ.get("FAKE_PREEMPT") == options["run_name"]:
            os.kill(os.getppid(), signal.SIGUSR2)
            time.sleep(60)  # stopped by the job's checkpoint() long before
            return 1
    if options.get("eval_test", True) is not False:
        acc = val_acc(options) - 0.05
        (run_dir / "test_metrics.json").write_text(
            json.dumps({"best_epoch": 1, "acc": acc, "macro_f1": acc - 0.01, "acc_audio": 0.8, "acc_visual": 0.3})
        )
    return 0


def probe(argv: list[str]) -> int:
    runs = argv[argv.index("--checkpoint") + 1 : argv.index("--device")]
    for run in runs:
        (Path(run) / "probe.json").write_text(json.dumps({"acc_audio": 0.9, "acc_visual": 0.4}))
    return 0


if __name__ == "__main__":
    sys.exit(probe(sys.argv[1:]) if "--checkpoint" in sys.argv else train(sys.argv[1:]))
