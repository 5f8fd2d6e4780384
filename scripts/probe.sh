#!/usr/bin/env bash
# Linear probes on the frozen encoders of trained runs; writes <run>/probe.json next to each.
#   bash scripts/probe.sh                                     # the run of scripts/train_ogm.sh
#   bash scripts/probe.sh checkpoints/<run> [more runs or .pt files] [--limit_samples 64 ...]
set -euo pipefail
source "$(dirname "$0")/_env.sh"
checkpoints=()
while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do checkpoints+=("$1"); shift; done
[ ${#checkpoints[@]} -gt 0 ] || checkpoints=(checkpoints/avdigits_concat_OGM_GE_seed0)
exec "$PYTHON" code/probe.py --checkpoint "${checkpoints[@]}" "$@"
