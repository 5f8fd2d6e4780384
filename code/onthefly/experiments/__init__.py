"""Experiments: the benchmark protocol and where its runs execute.

  grid.py       the grid file (YAML): common options, per-method grids, seeds, references
  spec.py       one run of the protocol: its defining options, its folder, its state
  launchers.py  running the runs: child processes here, or jobs on a cluster (submitit)
  protocol.py   tune -> select on validation -> test on fresh seeds -> probes -> report
  cli.py        code/sweep.py's command line

Training never imports this package; the report (analysis/benchmark_report.py) reads grid.py
and spec.py only.
"""
