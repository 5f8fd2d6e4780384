"""sweep.py's command line: the grid file, where the runs go, and which launcher starts them."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path

from ..config import ArgumentParser
from ..errors import UserError
from .grid import load_grid, with_overrides
from .launchers import REPO_ROOT, LocalLauncher, SubmititLauncher, check_device, device_slots
from .protocol import Launcher, RunsFailed, run_protocol, run_verify
from .verify import VERIFY_DIR


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="sweep.py",
        description="The benchmark protocol: tune on validation, test fresh seeds, "
        "probe, report. Resumable: run it again after an interruption.",
    )
    p.add_argument(
        "--grid", default=str(REPO_ROOT / "configs" / "benchmark_avdigits.yaml"), help="the grid file (YAML)"
    )
    p.add_argument("--out", default=str(REPO_ROOT / "checkpoints" / "benchmark_avdigits"), help="output folder")
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="OPTION=VALUE",
        help="override or add a common option of every run, e.g. --set epochs=1 limit_samples=128",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="train the test phase of the finished protocol in --out again (into --verify_out) and compare "
        "every number; exit 0 when reproduced exactly (or, elsewhere, every verdict holds)",
    )
    p.add_argument("--verify_out", default=None, help="--verify's scratch folder (default: <out>/verify)")
    p.add_argument(
        "--publish",
        default=None,
        help="also copy the report, per_seed.csv, results.csv, selection.json, environment.json and figures here "
        "(e.g. docs/results/benchmark_avdigits)",
    )
    p.add_argument("--methods", nargs="+", default=None, help="only these methods of the grid file (smoke tests)")
    p.add_argument(
        "--launcher",
        default="local",
        choices=tuple(LAUNCHERS),
        help="local: child processes here; slurm: one SLURM job per run (submitit); "
        "local_submitit: submitit's jobs on this machine (tests)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs at once (local: default the number of CPUs on CPU, --per_device per GPU on CUDA; "
        "slurm: the array's parallelism, default unlimited)",
    )
    p.add_argument("--per_device", type=int, default=1, help="local: concurrent runs per GPU when --jobs is not given")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (every GPU) or cuda:N; slurm: the job's GPUs")
    g = p.add_argument_group("slurm (--launcher slurm)")
    g.add_argument("--partition", default=None, help="SLURM partition")
    g.add_argument("--gpus_per_run", type=int, default=1, help="GPUs of one run (more than 1: train.py under torchrun)")
    g.add_argument("--cpus_per_run", type=int, default=8, help="CPU cores of one run (its data loaders)")
    g.add_argument(
        "--timeout_min",
        type=int,
        default=24 * 60,
        help="time limit of a job; a run that reaches it is requeued and resumes from its last.pt",
    )
    g.add_argument(
        "--slurm_extra",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="more submitit SLURM parameters, e.g. constraint=volta32gb account=myteam",
    )
    return p


def _local(args) -> Launcher:
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs must be >= 1 (got {args.jobs})")
    if args.per_device < 1:
        raise UserError(f"--per_device must be >= 1 (got {args.per_device})")
    return LocalLauncher(device_slots(args.device, args.jobs, args.per_device))


def _submitit(cluster: str) -> Callable:
    def make(args) -> Launcher:
        for name in ("jobs", "gpus_per_run", "cpus_per_run", "timeout_min"):
            value = getattr(args, name)
            if value is not None and value < (0 if name == "gpus_per_run" else 1):
                raise UserError(f"--{name} must be >= {0 if name == 'gpus_per_run' else 1} (got {value})")
        if cluster == "slurm" and not args.partition:
            raise UserError("--launcher slurm needs --partition")
        parameters = {
            "timeout_min": args.timeout_min,
            "tasks_per_node": 1,
            "nodes": 1,
            "cpus_per_task": args.cpus_per_run,
        }
        if cluster == "slurm":
            parameters.update(slurm_partition=args.partition, gpus_per_node=args.gpus_per_run, slurm_signal_delay_s=120)
            if args.jobs:
                parameters["slurm_array_parallelism"] = args.jobs
            for item in args.slurm_extra:
                key, sep, value = item.partition("=")
                if not sep or not key:
                    raise UserError(f"--slurm_extra {item}: expected KEY=VALUE")
                parameters[f"slurm_{key}"] = value
        elif args.partition or args.slurm_extra:
            raise UserError(f"--partition and --slurm_extra are for --launcher slurm, not {cluster}")
        device = ("cuda" if args.gpus_per_run else "cpu") if cluster == "slurm" else check_device(args.device)
        width = args.jobs or 1
        return SubmititLauncher(Path(args.out) / "submitit", cluster, device, parameters, width, args.gpus_per_run)

    return make


LAUNCHERS: dict[str, Callable] = {"local": _local, "slurm": _submitit("slurm"), "local_submitit": _submitit("local")}


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # a SIGTERM stops the children as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        args = get_args_parser().parse_args(argv)
        grid = with_overrides(load_grid(args.grid), args.set, args.methods)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out: not a directory: {out}")
        launcher = LAUNCHERS[args.launcher](args)
        if args.verify:
            scratch = Path(args.verify_out) if args.verify_out else out / VERIFY_DIR
            return run_verify(grid, out, scratch, launcher)
        run_protocol(grid, out, launcher, publish=Path(args.publish) if args.publish else None)
        return 0
    except UserError as e:
        print(f"sweep.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full --out, a name the file system refuses
        print(f"sweep.py: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2
    except RunsFailed as e:
        print(f"sweep.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sweep.py: interrupted; finished runs are kept, run the same command again to continue", file=sys.stderr)
        return 130
