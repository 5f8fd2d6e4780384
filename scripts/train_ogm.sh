#!/usr/bin/env bash
# OGM-GE on AV-Digits by default; any option given here overrides the defaults,
# e.g.  bash scripts/train_ogm.sh --modulation OGM --alpha 0.3 --fusion film
# With --config FILE (a recipe in configs/), the file decides the method: nothing is added.
set -euo pipefail
source "$(dirname "$0")/_env.sh"
method=(--modulation OGM_GE); has_config "$@" && method=()
exec "$PYTHON" code/train.py "${method[@]}" "$@"
