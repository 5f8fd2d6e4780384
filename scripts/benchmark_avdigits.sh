#!/usr/bin/env bash
# The benchmark protocol on AV-Digits (configs/benchmark_avdigits.yaml): tune every method on
# validation (2 seeds per grid point), train the selected settings and the trained-alone
# references on 5 fresh seeds and evaluate them on test, probe the encoders, write the report
# (report.md, results.csv, selection.json, runs.csv, PNG figures) into
# checkpoints/benchmark_avdigits/. Resumable: run the same command again after an interruption.
#
#   bash scripts/benchmark_avdigits.sh                       # the whole protocol
#   bash scripts/benchmark_avdigits.sh --jobs 2 --out DIR    # options of code/sweep.py (see --help)
#   bash scripts/benchmark_avdigits.sh --out /tmp/bm --methods none OPM --set epochs=1 limit_samples=128
#   bash scripts/benchmark_avdigits.sh --launcher slurm --partition gpu --gpus_per_run 1   # docs/cluster.md
set -euo pipefail
source "$(dirname "$0")/_env.sh"
exec "$PYTHON" code/sweep.py "$@"
