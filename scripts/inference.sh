#!/usr/bin/env bash
# Evaluate a checkpoint on the test split. Default: the run written by scripts/train_ogm.sh.
#   bash scripts/inference.sh --checkpoint checkpoints/<run>/best.pt --split val
set -euo pipefail
source "$(dirname "$0")/_env.sh"
exec "$PYTHON" code/inference.py --checkpoint checkpoints/avdigits_concat_OGM_GE_seed0/best.pt "$@"
