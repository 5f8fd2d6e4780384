#!/usr/bin/env bash
# Plain joint training (no modulation) on AV-Digits by default; options pass through.
set -euo pipefail
# With --config FILE (a recipe in configs/), the file decides the method: nothing is added.
source "$(dirname "$0")/_env.sh"
method=(--modulation none); has_config "$@" && method=()
exec "$PYTHON" code/train.py "${method[@]}" "$@"
