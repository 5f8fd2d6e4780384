#!/usr/bin/env bash
# The benchmark protocol on AV-Digits (configs/benchmark_avdigits.yaml, docs/benchmark.md): tune
# every method on validation (2 seeds per grid point), train the selected settings and the
# trained-alone references on 10 fresh seeds and evaluate them on test, probe the encoders,
# write the report (report.md, results.csv, per_seed.csv, environment.json, selection.json,
# runs.csv, PNG figures) into checkpoints/benchmark_avdigits/. Resumable: run the same command
# again after an interruption. Run as it is (no --out, --grid, --set, --methods), it also copies
# the report's files to docs/results/benchmark_avdigits/, the results the README cites.
#
#   bash scripts/benchmark_avdigits.sh                       # the whole protocol (87 min on 2 CPU cores)
#   bash scripts/benchmark_avdigits.sh --verify              # train its test phase again, compare every number
#   bash scripts/benchmark_avdigits.sh --jobs 2 --out DIR    # options of code/sweep.py (see --help)
#   bash scripts/benchmark_avdigits.sh --out /tmp/bm --methods none OPM --set epochs=1 limit_samples=128
#   bash scripts/benchmark_avdigits.sh --launcher slurm --partition gpu --gpus_per_run 1   # docs/cluster.md
set -euo pipefail
source "$(dirname "$0")/_env.sh"
publish=(--publish docs/results/benchmark_avdigits)
for arg in "$@"; do
    case "$arg" in
        --out|--out=*|--grid|--grid=*|--set|--set=*|--methods|--methods=*|--verify|--publish|--publish=*) publish=() ;;
    esac
done
exec "$PYTHON" code/sweep.py "${publish[@]}" "$@"
