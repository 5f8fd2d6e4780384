#!/usr/bin/env bash
# OGM-GE on AV-Digits by default; any option given here overrides the defaults,
# e.g.  bash scripts/train_ogm.sh --modulation OGM --alpha 0.3 --fusion film
set -euo pipefail
source "$(dirname "$0")/_env.sh"
exec "$PYTHON" code/train.py --modulation OGM_GE "$@"
