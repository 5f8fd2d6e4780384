#!/usr/bin/env bash
# OPM on AV-Digits by default; any option given here overrides the defaults,
# e.g.  bash scripts/train_opm.sh --q_base 0.3 --lam 1.0 --p_exe 0.5
# With --config FILE (a recipe in configs/), the file decides the method: nothing is added.
set -euo pipefail
source "$(dirname "$0")/_env.sh"
method=(--modulation OPM); has_config "$@" && method=()
exec "$PYTHON" code/train.py "${method[@]}" "$@"
