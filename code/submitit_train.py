"""One long training run as a cluster job (SLURM through submitit), requeued with --resume when
preempted or out of time. Every option of train.py is accepted and checked here, before the
job is submitted; the cluster options are below. See docs/cluster.md.

  python code/submitit_train.py --partition gpu --gpus 1 --config configs/ks_tpami2024_opm.yaml --data DIR
"""

import sys
from pathlib import Path

import submitit

from onthefly.config import ArgumentParser, get_args_parser, resolve_config
from onthefly.errors import UserError
from onthefly.experiments.launchers import REPO_ROOT, TrainCommand, under_torchrun


def cluster_parser(add_help: bool) -> ArgumentParser:
    p = ArgumentParser(
        prog="submitit_train.py",
        add_help=add_help,
        allow_abbrev=False,
        parents=[] if not add_help else [get_args_parser()],
        conflict_handler="resolve",
        description="train.py as a cluster job, requeued with --resume when preempted or timed out",
    )
    g = p.add_argument_group("cluster")
    g.add_argument(
        "--cluster",
        default=None,
        choices=("slurm", "local", "debug"),
        help="default: slurm where sbatch exists, else this machine (local)",
    )
    g.add_argument("--partition", default=None, help="SLURM partition")
    g.add_argument("--gpus", type=int, default=1, help="GPUs of the run, on one node (more than 1: torchrun)")
    g.add_argument("--cpus", type=int, default=8, help="CPU cores of the run (its data loaders)")
    g.add_argument("--timeout_min", type=int, default=24 * 60, help="a job's time limit; requeued when reached")
    g.add_argument("--job_dir", default=None, help="submitit's files and the log (default: <run folder>.submitit)")
    return p


def submit(argv: list[str]) -> submitit.Job:
    cluster_parser(add_help=True).parse_known_args(argv)  # --help shows train.py's options and the cluster's
    opts, train_argv = cluster_parser(add_help=False).parse_known_args(argv)
    cfg = resolve_config(train_argv)  # train.py's own parser and checks, before anything is queued
    resume = Path(cfg.resume) if cfg.resume else None
    run_dir = (resume if resume.is_dir() else resume.parent) if resume else Path(cfg.output_dir) / cfg.run_name
    for name in ("gpus", "cpus", "timeout_min"):
        if getattr(opts, name) < (0 if name == "gpus" else 1):
            raise UserError(f"--{name} must be >= {0 if name == 'gpus' else 1} (got {getattr(opts, name)})")
    job_dir = Path(opts.job_dir or f"{run_dir}.submitit")
    executor = submitit.AutoExecutor(folder=job_dir, cluster=opts.cluster)
    executor.update_parameters(
        name=run_dir.name,
        timeout_min=opts.timeout_min,
        nodes=1,
        tasks_per_node=1,
        cpus_per_task=opts.cpus,
        gpus_per_node=opts.gpus,
        **({"slurm_partition": opts.partition, "slurm_signal_delay_s": 120} if executor.cluster == "slurm" else {}),
    )
    train = [sys.executable, str(REPO_ROOT / "code" / "train.py")]
    last = run_dir / "last.pt"
    resume = train_argv if cfg.resume else ["--resume", str(last)]
    command = TrainCommand(
        under_torchrun([*train, *train_argv], opts.gpus),
        job_dir / "train.log",
        under_torchrun([*train, *resume], opts.gpus),
        last,
    )
    return executor.submit(command)


def main(argv: list[str] | None = None) -> int:
    try:
        job = submit(list(sys.argv[1:] if argv is None else argv))
    except UserError as e:
        print(f"submitit_train.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"submitit_train.py: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2
    print(f"submitted job {job.job_id}; its output: {job.paths.stdout}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
